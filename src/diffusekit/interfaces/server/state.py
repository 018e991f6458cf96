"""What every router receives: the service (model + jobs), the worker thread, the limits and listings."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Callable

from .checkpoints import ModelStore
from .jobs import JobContext, Worker
from .loras import LoraCatalog
from .schemas import Limits, RequestError
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
        """Queue `fn(ctx)` on the worker and wait for it without blocking the event loop."""
        future = self.worker.submit(label, fn)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()                      # the client left: drop the job if it has not started
            raise
        except RequestError:
            raise
        except (ValueError, FileNotFoundError) as e:  # the library's "this input is invalid" errors
            raise RequestError(str(e)) from None
