"""ComfyUI's prompt queue on the server's one worker: prompt numbers, the pending/running lists, the history,
and the websocket messages, with ComfyUI's shapes (server.py, execution.py PromptQueue).

A queued prompt is a job of the shared `jobs.Worker` (so /sdapi/v1 jobs and workflows take turns, and its
bounded queue refuses a prompt with 503 when full). A queue item is ComfyUI's tuple
[number, prompt_id, prompt, extra_data, outputs_to_execute]; a history entry {"prompt": item, "outputs":
{node_id: ui}, "status": {"status_str", "completed", "messages"}, "meta": {node_id: {...}}}. Messages go
to the websockets (`/ws?clientId=`): "status" to everyone, a prompt's execution messages and binary
previews to the client that queued it (its client_id), as ComfyUI does.
"""
from __future__ import annotations

import asyncio
import io
import logging
import struct
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any

from ...graph import Environment, GraphExecutor

log = logging.getLogger("diffusekit.server")

MAX_HISTORY = 1000                   # ComfyUI keeps 10000; entries hold whole prompts
PREVIEW_IMAGE, JPEG = 1, 1           # ComfyUI's BinaryEventTypes.PREVIEW_IMAGE and its JPEG image type
PREVIEW_MAX_SIDE = 512


def preview_frame(image) -> bytes:
    """ComfyUI's binary preview: big-endian uint32 event type 1, uint32 image type 1 (JPEG), the JPEG bytes."""
    img = image.convert("RGB")
    if max(img.size) > PREVIEW_MAX_SIDE:
        img.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return struct.pack(">II", PREVIEW_IMAGE, JPEG) + buf.getvalue()


class Sockets:
    """The connected websockets by client id; `send` is safe from any thread."""

    def __init__(self):
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()        # the event loop adds/removes, the worker thread reads
        self.loop: asyncio.AbstractEventLoop | None = None

    def add(self, sid: str, ws) -> None:
        with self._lock:
            self._clients[sid] = ws

    def remove(self, sid: str, ws) -> None:
        with self._lock:
            if self._clients.get(sid) is ws:
                del self._clients[sid]

    def __contains__(self, sid) -> bool:
        with self._lock:
            return sid in self._clients

    def send(self, event: str | None, data: Any, sid: str | None = None) -> None:
        """JSON {"type": event, "data": data} (bytes: a binary frame) to `sid`, or to everyone when None."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        with self._lock:
            targets = list(self._clients.values()) if sid is None else \
                [self._clients[sid]] if sid in self._clients else []
        if not targets:
            return
        msg = data if isinstance(data, (bytes, bytearray)) else {"type": event, "data": data}

        async def deliver():
            for ws in targets:
                try:
                    if isinstance(msg, (bytes, bytearray)):
                        await ws.send_bytes(bytes(msg))
                    else:
                        await ws.send_json(msg)
                except Exception as e:                  # a closed socket must not stop the others
                    log.debug("websocket send failed: %s", e)
        try:
            asyncio.run_coroutine_threadsafe(deliver(), loop)
        except RuntimeError:                            # the loop is shutting down
            pass


class ComfyQueue:
    """Queue, history and messages of ComfyUI's API over the server's worker."""

    def __init__(self, worker, env: Environment, service=None):
        self.worker, self.env, self.service = worker, env, service
        self.executor = GraphExecutor(env)
        self.sockets = Sockets()
        self._lock = threading.RLock()
        self._number = 0
        self.pending: OrderedDict[str, tuple[list, Future]] = OrderedDict()
        self.running: dict[str, list] = {}
        self.history: OrderedDict[str, dict] = OrderedDict()
        self.executing: tuple[str, str, str | None] | None = None    # (prompt_id, node_id, client id) now
        self._pipe_seen = None

    # ------------------------------------------------------------------ queue
    def remaining(self) -> int:
        with self._lock:
            return len(self.pending) + len(self.running)

    def queue_info(self) -> dict:
        return {"exec_info": {"queue_remaining": self.remaining()}}

    def status_changed(self) -> None:
        self.sockets.send("status", {"status": self.queue_info()})

    def submit(self, prompt: dict, outputs: list[str], extra_data: dict, number: float | None = None,
               front: bool = False) -> tuple[str, float]:
        """Queue a validated prompt; raises jobs.QueueFull when the worker's queue is full."""
        with self._lock:
            if number is None:
                number = -self._number if front else self._number
                self._number += 1
            prompt_id = str(uuid.uuid4())
            item = [number, prompt_id, prompt, extra_data, outputs]
            future = self.worker.submit(f"workflow {prompt_id[:8]}", lambda ctx: self._run(ctx, item))
            self.pending[prompt_id] = (item, future)
        future.add_done_callback(lambda f, pid=prompt_id: self._finished(pid, f))
        self.status_changed()
        return prompt_id, number

    def delete(self, prompt_ids: list[str]) -> None:
        """POST /queue {"delete": [...]}: drop waiting prompts (a running one is left to /interrupt)."""
        for pid in prompt_ids:
            with self._lock:
                entry = self.pending.get(str(pid))
            if entry is not None and entry[1].cancel():
                with self._lock:
                    self.pending.pop(str(pid), None)
        self.status_changed()

    def clear(self) -> None:
        with self._lock:
            ids = list(self.pending)
        self.delete(ids)

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt: stop the running prompt (only `prompt_id`'s, when one is given)."""
        with self._lock:
            if prompt_id is not None and prompt_id not in self.running:
                return
        self.worker.interrupt()

    def current_queue(self) -> dict:
        with self._lock:
            return {"queue_running": [list(i) for i in self.running.values()],
                    "queue_pending": sorted((list(i) for i, _ in self.pending.values()), key=lambda i: i[0])}

    # ------------------------------------------------------------------ running (worker thread)
    def _run(self, ctx, item: list):
        number, prompt_id, prompt, extra_data, outputs = item
        with self._lock:
            self.pending.pop(prompt_id, None)
            self.running[prompt_id] = item
        self.status_changed()
        sid = extra_data.get("client_id")
        loaded = self.service.loaded if self.service is not None else None
        if loaded is not self._pipe_seen:                # the A1111 side swapped the model: drop stale outputs
            self.executor.clear_cache()
        ctx.start_batch(0, f"workflow {prompt_id[:8]}")

        def send(event, data):
            if event == "executing" and data.get("node") is not None:
                ctx.start_batch(0, f"workflow: node {data['node']}")
                self.executing = (prompt_id, data["node"], sid)
            self.sockets.send(event, data, sid)

        def preview(render):
            if sid in self.sockets:
                try:
                    self.sockets.send(None, preview_frame(render()), sid)
                except Exception as e:                  # a preview is a nicety
                    log.warning("preview failed: %s", e)

        try:
            record = self.executor.run(prompt, prompt_id, outputs, extra_data=extra_data, send=send, preview=preview,
                                       should_stop=ctx.should_stop)
        finally:
            self._pipe_seen = self.service.loaded if self.service is not None else None
            self.executing = None
        return record

    def _finished(self, prompt_id: str, future: Future) -> None:
        with self._lock:
            pending = self.pending.pop(prompt_id, None)
            item = self.running.pop(prompt_id, None) or (pending[0] if pending else None)
        if future.cancelled():
            self.status_changed()
            return
        error = future.exception()
        if item is not None:
            if error is None:
                record = future.result()
                outputs, status = record.outputs, record.status()
            else:                                        # the job failed outside the graph (a bug, shutdown)
                log.error("workflow %s failed: %s", prompt_id, error)
                outputs = {}
                status = {"status_str": "error", "completed": False,
                          "messages": [["execution_error", {"prompt_id": prompt_id, "exception_message": str(error),
                                                            "exception_type": type(error).__name__,
                                                            "timestamp": int(time.time() * 1000)}]]}
            meta = {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n} for n in outputs}
            with self._lock:
                self.history[prompt_id] = {"prompt": item, "outputs": outputs, "status": status, "meta": meta}
                while len(self.history) > MAX_HISTORY:
                    self.history.popitem(last=False)
            sid = item[3].get("client_id")
            if error is not None:
                self.sockets.send("execution_error", status["messages"][0][1], sid)
            self.sockets.send("executing", {"node": None, "prompt_id": prompt_id}, sid)
        self.status_changed()

    # ------------------------------------------------------------------ history
    def get_history(self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1) -> dict:
        with self._lock:
            if prompt_id is not None:
                return {prompt_id: self.history[prompt_id]} if prompt_id in self.history else {}
            keys = list(self.history)
            if offset < 0 and max_items is not None:
                offset = len(keys) - max_items
            keys = keys[max(offset, 0):]
            if max_items is not None:
                keys = keys[:max_items]
            return {k: self.history[k] for k in keys}

    def edit_history(self, clear: bool = False, delete: list | None = None) -> None:
        with self._lock:
            if clear:
                self.history.clear()
            for pid in delete or []:
                self.history.pop(str(pid), None)
