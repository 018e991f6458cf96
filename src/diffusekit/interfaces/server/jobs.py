"""One model, one job at a time: a worker thread, a bounded queue in front of it, and the progress state.

A1111 serialises generation with a lock and lets requests pile up without bound (#3786, #13413); here a
request that finds `queue_size` jobs already waiting is refused at once (503 + Retry-After) instead of
holding a connection for an unknown time. Generation runs in the worker thread, so the event loop stays
free to answer /progress, /interrupt and the other cheap endpoints while a job runs.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import contextvars
import io
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("diffusekit.server")

PREVIEW_WATCH_SECONDS = 10.0   # render step previews while someone polled /progress for one this recently


class QueueFull(Exception):
    """The bounded queue is full; `retry_after` is an estimate in whole seconds."""

    def __init__(self, capacity: int, retry_after: int):
        super().__init__(f"the server is busy: the job queue is full (queue_size={capacity}); "
                         f"retry in about {retry_after} s")
        self.capacity = capacity
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The worker was stopped while the job was waiting."""


class ClientGone(Exception):
    """The client disconnected while its job waited or ran; the job was dropped or interrupted."""


# the ASGI `receive` of the request being handled (set by `ClientWatch`): after the body it yields only
# http.disconnect, which is how a handler learns that its client went away while its job waits or runs
_CLIENT_RECEIVE: contextvars.ContextVar = contextvars.ContextVar("diffusekit_client_receive", default=None)


class ClientWatch:
    """ASGI middleware that lets `wait_for_job` see the client disconnect (Starlette does not cancel a
    handler whose client left; A1111 runs such jobs to the end)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        token = _CLIENT_RECEIVE.set(receive if scope["type"] == "http" else None)
        try:
            return await self.app(scope, receive, send)
        finally:
            _CLIENT_RECEIVE.reset(token)


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass                                  # a body the handler did not read


async def wait_for_job(worker: "Worker", future: Future):
    """Await a submitted job's result without blocking the event loop. When the client disconnects first,
    the job is abandoned (`Worker.abandon`: dropped if waiting, interrupted if running) and ClientGone
    raised; when the handler itself is cancelled, likewise."""
    job = asyncio.wrap_future(future)
    job.add_done_callback(lambda f: f.cancelled() or f.exception())   # a dropped job's outcome is no one's
    receive = _CLIENT_RECEIVE.get()
    gone = asyncio.ensure_future(_until_disconnect(receive)) if receive is not None else None
    try:
        if gone is not None:
            await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not job.done():
                worker.abandon(future)
                raise ClientGone("the client disconnected; its job was dropped")
        return await job
    except asyncio.CancelledError:
        worker.abandon(future)
        raise
    finally:
        if gone is not None:
            gone.cancel()


@dataclass
class _Task:
    label: str
    fn: Callable[["JobContext"], Any]
    future: Future = field(default_factory=Future)


@dataclass
class _State:
    """What A1111's `shared.state` reports, written by the worker under `Worker._lock`."""

    job: str = ""
    job_count: int = 0
    job_no: int = 0
    job_timestamp: str = "0"
    sampling_step: int = 0
    sampling_steps: int = 0
    interrupted: bool = False
    skipped: bool = False
    time_start: float = 0.0
    textinfo: str | None = None
    current_image: str | None = None      # base64 PNG of the latest step preview
    preview_key: tuple = ()


class JobContext:
    """Handed to a running task: report progress, render previews, and ask whether to stop."""

    def __init__(self, worker: "Worker"):
        self._w = worker

    def set_job_count(self, n: int) -> None:
        with self._w._lock:
            self._w._state.job_count = max(1, int(n))

    def start_batch(self, job_no: int, textinfo: str | None = None) -> None:
        """A new batch (A1111 'job' within n_iter): clears `skip`, which applies to one batch only."""
        with self._w._lock:
            s = self._w._state
            s.job_no, s.skipped, s.sampling_step = int(job_no), False, 0
            if textinfo is not None:
                s.textinfo = textinfo

    @property
    def interrupted(self) -> bool:
        return self._w._state.interrupted

    def should_stop(self) -> bool:
        s = self._w._state
        return s.interrupted or s.skipped

    def on_step(self, info, job_no: int | None = None) -> None:
        """The pipeline callback (a StepInfo). Renders the preview in this thread, only when watched."""
        w = self._w
        with w._lock:
            s = w._state
            s.sampling_step, s.sampling_steps = int(info.step) + 1, int(info.steps)
            if job_no is not None:
                s.job_no = job_no
            s.textinfo = f"{info.pass_name}: step {info.step + 1}/{info.steps}"
            watched = time.monotonic() < w._preview_watched_until
        if watched and info.preview is not None:
            try:
                img = info.preview()[0]
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                b64 = base64.b64encode(buf.getvalue()).decode("ascii")
            except Exception as e:  # a preview is a nicety: never let it fail the job
                log.warning("step preview failed: %s", e)
                return
            with w._lock:
                w._state.current_image = b64


class Worker:
    """Runs submitted tasks one by one in a daemon thread; at most `queue_size` tasks wait
    (0: none waits, a job is accepted only when the worker is idle)."""

    def __init__(self, queue_size: int = 8):
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 0:
            raise ValueError(f"queue_size={queue_size!r}: must be an integer >= 0")
        self.queue_size = queue_size
        self._waiting: collections.deque[_Task] = collections.deque()   # bounded by `submit`
        self._wake = threading.Condition()                  # guards _waiting; the worker waits on it
        self._lock = threading.Lock()
        self._state = _State()
        self._running: _Task | None = None
        self._preview_watched_until = 0.0
        self._durations: list[float] = []        # recent job durations, for Retry-After and eta
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.jobs_done = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="diffusekit-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Interrupt the running job, fail the waiting ones, and end the thread."""
        self._stopping = True
        self.interrupt()
        with self._wake:
            waiting = list(self._waiting)
            self._waiting.clear()
            self._wake.notify_all()
        for t in waiting:
            if t.future.set_running_or_notify_cancel():
                t.future.set_exception(ShuttingDown("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ submitting
    def submit(self, label: str, fn: Callable[[JobContext], Any]) -> Future:
        """Queue `fn(ctx)`; the returned Future gets its result or exception. Raises QueueFull at once."""
        if self._stopping:
            raise ShuttingDown("the server is shutting down")
        task = _Task(label, fn)
        with self._wake:
            waiting = len(self._waiting)
            if waiting >= self.queue_size and (self.queue_size > 0 or waiting or self._running is not None):
                raise QueueFull(self.queue_size, self._retry_after())
            self._waiting.append(task)
            self._wake.notify()
        return task.future

    def abandon(self, future: Future) -> None:
        """The client of `future`'s job went away: a waiting job leaves the queue (its slot is free at once);
        the running one is interrupted at its next step, as /interrupt does (and frees the worker then)."""
        with self._wake:
            for t in self._waiting:
                if t.future is future:
                    self._waiting.remove(t)
                    t.future.cancel()
                    return
        with self._lock:
            if self._running is not None and self._running.future is future:
                self._state.interrupted = True

    def pending(self) -> int:
        return len(self._waiting)

    def _retry_after(self) -> int:
        typical = sorted(self._durations)[len(self._durations) // 2] if self._durations else 5.0
        return max(1, min(600, round(typical * (self.pending() + 1))))

    # ------------------------------------------------------------------ control
    def interrupt(self) -> None:
        """Stop the running job at its next step; it returns what it has made (A1111 /interrupt)."""
        with self._lock:
            if self._running is not None:
                self._state.interrupted = True

    def skip(self) -> None:
        """Stop the current batch of the running job and go on with its next one (A1111 /skip)."""
        with self._lock:
            if self._running is not None:
                self._state.skipped = True

    # ------------------------------------------------------------------ progress
    def snapshot(self, include_image: bool = False) -> dict:
        """The A1111 /sdapi/v1/progress body."""
        now = time.monotonic()
        with self._lock:
            if include_image:
                self._preview_watched_until = now + PREVIEW_WATCH_SECONDS
            s = self._state
            running = self._running is not None
            state = {"skipped": s.skipped, "interrupted": s.interrupted, "stopping_generation": False,
                     "job": s.job, "job_count": s.job_count if running else 0, "job_timestamp": s.job_timestamp,
                     "job_no": s.job_no, "sampling_step": s.sampling_step, "sampling_steps": s.sampling_steps,
                     "queue_pending": self.pending(), "queue_size": self.queue_size}
            if not running:
                return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
                        "textinfo": s.textinfo if s.textinfo else None}
            # A1111's formula: a small head start, finished batches, then the current batch's steps
            progress = 0.01 + s.job_no / s.job_count
            if s.sampling_steps > 0:
                progress += s.sampling_step / s.sampling_steps / s.job_count
            elapsed = time.time() - s.time_start
            eta = elapsed / progress - elapsed
            image = s.current_image if include_image else None
            return {"progress": min(progress, 1.0), "eta_relative": max(eta, 0.0), "state": state,
                    "current_image": image, "textinfo": s.textinfo}

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                task = self._waiting.popleft()
            if not task.future.set_running_or_notify_cancel():
                continue                                   # the client went away before it started
            with self._lock:
                self._running = task
                self._state = _State(job=task.label, job_count=1, time_start=time.time(),
                                     job_timestamp=time.strftime("%Y%m%d%H%M%S"), textinfo="starting")
            t0 = time.perf_counter()
            result = error = None
            try:
                result = task.fn(JobContext(self))
            except BaseException as e:  # the future carries it to the request; the worker lives on
                if not isinstance(e, Exception):
                    log.exception("worker task %s raised %s", task.label, type(e).__name__)
                error = e if isinstance(e, Exception) else RuntimeError(repr(e))
            # idle again before the answer goes out, so a client that asks right after sees an idle worker
            self._durations = (self._durations + [time.perf_counter() - t0])[-20:]
            self.jobs_done += 1
            with self._lock:
                self._running = None
                self._state.textinfo = None
                self._state.current_image = None
            if error is not None:
                task.future.set_exception(error)
            else:
                task.future.set_result(result)
