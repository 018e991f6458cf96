"""What every router receives: the service (model + jobs), the worker thread, the limits and listings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .checkpoints import ModelStore
from .jobs import JobContext, Worker
from .loras import LoraCatalog
from .schemas import Limits
from .service import Service


@dataclass
class ServerState:
    """The pieces one server instance shares between its routers (A1111's, diffusekit's, the web UI, and
    any other API that sits beside them)."""

    service: Service
    worker: Worker
    limits: Limits
    store: ModelStore
    loras: LoraCatalog | None
    flags: dict

    async def run_job(self, label: str, fn: Callable[[JobContext], Any]) -> Any:
        """Queue `fn(ctx)` on the worker and wait for it without blocking the event loop (`errors.run_job`:
        a client that leaves drops its job; what the job raises besides RequestError is a 500)."""
        from .errors import run_job
        return await run_job(self.worker, label, fn, self.service.folders())
