"""The worker's queue: abandoned jobs give their slot back (a waiting one at once, the running one at its
next step), without HTTP."""
import threading

import pytest

from diffusekit.interfaces.server.jobs import QueueFull, Worker


def test_abandoned_jobs_free_their_slot():
    w = Worker(queue_size=1)
    w.start()
    started, steps = threading.Event(), []

    def running(ctx):                      # a job that steps until it is told to stop, like a sampler
        started.set()
        while not ctx.should_stop():
            steps.append(1)
            threading.Event().wait(0.005)
        return "stopped" if ctx.interrupted else "done"

    try:
        first = w.submit("first", running)
        assert started.wait(10)
        second = w.submit("second", lambda ctx: "second ran")
        with pytest.raises(QueueFull):
            w.submit("third", lambda ctx: None)
        w.abandon(second)                  # its client left while it waited: the slot is free at once
        assert second.cancelled() and w.pending() == 0
        fourth = w.submit("fourth", lambda ctx: "fourth ran")
        w.abandon(first)                   # the running job's client left: interrupted at its next step
        assert first.result(10) == "stopped"
        assert fourth.result(10) == "fourth ran" and w.jobs_done == 2
        late = w.submit("late", lambda ctx: "late ran")
        assert late.result(10) == "late ran"
        w.abandon(late)                    # a finished job: nothing to do, nothing breaks
        assert w.snapshot()["state"]["interrupted"] is False
    finally:
        w.stop()
