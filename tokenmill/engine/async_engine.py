"""AsyncEngine: one background engine thread serving many asyncio callers (in-flight batching).

The LLMEngine is owned by the engine thread alone, which runs an EngineLoop (engine/engine_loop.py). Callers on the
event loop validate and tokenize their request, then hand it over through a command queue (engine/engine_client.py
holds that side and its invariants); the engine thread drains that queue before every step, so a new request joins
the running batch at the next step and an abort (client gone) takes effect before the next step. Outputs go back
to the event loop with one call_soon_threadsafe per step; metrics are recorded on the engine thread.

shutdown() aborts whatever is still in flight (each caller still gets its final output) and joins the engine thread
(a thread the watchdog declared hung is waited for HUNG_JOIN_S at most, then left behind: it is a daemon).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any

from tokenmill.engine.engine_client import EngineClient, EngineDeadError, ProgressClock, QueueFullError
from tokenmill.engine.engine_loop import (
    STOP,
    AbortRequest,
    AddRequest,
    Command,
    EngineLoop,
    EngineStats,
    EngineStepError,
)
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.metrics import EngineMetrics
from tokenmill.engine.openmp_pool import release_openmp_pool
from tokenmill.outputs import RequestOutput
from tokenmill.worker.plan import ExecutionPlan

logger = logging.getLogger("tokenmill")

__all__ = ["AsyncEngine", "EngineDeadError", "EngineStepError", "QueueFullError"]

HUNG_JOIN_S = 5.0


class AsyncEngine(EngineClient):
    def __init__(self, engine: LLMEngine, *, max_queue: int | None = None, metrics: EngineMetrics | None = None,
                 log_steps: bool = False, watchdog_s: float = 0.0) -> None:
        super().__init__(engine.inputs, max_queue=max_queue, metrics=metrics, watchdog_s=watchdog_s)
        self.engine = engine
        self.log_steps = log_steps
        self._clock = ProgressClock("the engine thread")  # beaten on the engine thread by everything it reports
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the engine thread; call from the event loop that will consume outputs."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        # From here on the engine thread does the tensor work: the caller's OpenMP pool, left from
        # building the engine, would throttle the engine thread's (engine/openmp_pool.py).
        release_openmp_pool()
        self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
        self._thread.start()
        self._start_watchdog()

    async def shutdown(self) -> None:
        """Stops accepting, aborts in-flight requests, and joins the engine thread."""
        self._accepting = False
        self._stop_watchdog()
        self.abort_all()
        thread = self._thread
        if thread is None:
            return
        self._commands.put(STOP)
        await asyncio.to_thread(thread.join, None if self.dead_error is None else HUNG_JOIN_S)
        if thread.is_alive():
            logger.error("the engine thread is still stuck after %.0f s; leaving it behind", HUNG_JOIN_S)
        self._thread = None
        self.engine.close()  # the other tensor-parallel ranks, if any
        # Deliveries scheduled by the thread's last iteration run before this point; anything
        # still open now can never get an output.
        self._fail_open_streams(EngineDeadError("the engine was shut down"))

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead_error is None

    @property
    def execution_plan(self) -> ExecutionPlan | None:
        return self.engine.core.plan  # built before the engine thread starts, never changed after

    def _send(self, command: AddRequest | AbortRequest) -> None:
        self._commands.put(command)

    def _progress_clocks(self) -> list[tuple[ProgressClock, bool]]:
        return [(self._clock, self.num_in_flight > 0)]

    # -- engine thread ---------------------------------------------------------------------------
    def _call_loop(self, fn: Any, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the event loop is closed: nobody is left to deliver to

    def _next_command(self, block: bool) -> Command | None:
        try:
            return self._commands.get(block=block)
        except queue.Empty:
            return None

    def _run(self) -> None:
        try:
            EngineLoop(self.engine, self._next_command, _ThreadListener(self), log_steps=self.log_steps).run()
        except BaseException as exc:  # the thread must report any death
            logger.exception("engine thread died")
            self.dead_error = exc  # at once: no submit() is accepted from here on
            self._call_loop(self._engine_died, exc)


class _ThreadListener:
    """The engine thread's results, passed to the event loop (metrics recorded here, off the loop)."""

    def __init__(self, client: AsyncEngine) -> None:
        self.client = client

    def accepted(self, ticket: int, error: ValueError | None) -> None:
        self.client._clock.beat()
        self.client._call_loop(self.client._accept, ticket, error)

    def delivered(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        self.client._clock.beat()
        self.client._record(outputs, stats)
        if outputs:
            self.client._call_loop(self.client._deliver, outputs)

    def failed(self, req_ids: list[str], error: BaseException) -> None:
        self.client._clock.beat()
        self.client._call_loop(self.client._fail_streams, req_ids, error)
