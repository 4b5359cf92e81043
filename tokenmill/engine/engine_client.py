"""EngineClient: the event-loop side of a serving engine, shared by AsyncEngine (one engine thread) and
DataParallelEngine (replica processes behind one front end).

Callers on the event loop validate and tokenize their request (InputProcessor: immutable state only), then submit
it; the subclass hands the command to whatever runs an EngineLoop (engine/engine_loop.py), whose results come back
through _accept, _deliver and _fail_streams, always called on the event loop.

Invariants:
- every request accepted by submit() gets exactly one finished RequestOutput into its sink, or an
  EngineDeadError / EngineStepError if the engine could not produce one;
- an iterate() that is cancelled or closed early aborts its unfinished requests (freeing their KV
  blocks before the next step);
- shutdown() aborts whatever is still in flight (each caller still gets its final output);
- the engine is dead (dead_error set, is_alive False, /health 503) once its loop ended with an error, a replica
  process exited unasked, or the watchdog saw an engine side with requests in flight send nothing (no step's
  results, no acceptance) for more than watchdog_s; from then on every open request ends with EngineDeadError
  and none is accepted. An engine side that holds no request is idle, never stalled.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tokenmill.engine.engine_loop import AbortRequest, AddRequest, EngineStats
from tokenmill.engine.input_processor import InputProcessor, ProcessedPrompt, Prompt
from tokenmill.engine.metrics import EngineMetrics
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams
from tokenmill.worker.plan import ExecutionPlan

logger = logging.getLogger("tokenmill")


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should retry later (HTTP 429)."""


class EngineDeadError(RuntimeError):
    """The engine is shut down or its thread died; no request can be served (HTTP 503)."""


@dataclass
class ProgressClock:
    """When one engine side (the engine thread, a replica) last showed progress: written by whichever thread hears
    from it (one float, no lock), read by the watchdog on the event loop."""

    name: str
    last: float = field(default_factory=time.monotonic)

    def beat(self) -> None:
        self.last = time.monotonic()


class EngineClient:
    def __init__(self, inputs: InputProcessor, *, max_queue: int | None, metrics: EngineMetrics | None,
                 watchdog_s: float = 0.0) -> None:
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if watchdog_s < 0:
            raise ValueError(f"engine_watchdog_s must be >= 0 (0: off), got {watchdog_s}")
        self.inputs = inputs
        self.max_queue = max_queue
        self.metrics = metrics
        # Event-loop side: the sink of every request in flight, until its final output is delivered.
        self._streams: dict[str, asyncio.Queue] = {}
        self._accepts: dict[int, asyncio.Future] = {}  # ticket -> the submit() waiting for the engine's answer
        self._tickets = itertools.count()
        self._num_pending_adds = 0  # handed over, not yet answered by the engine
        self._num_waiting = 0  # the engine's waiting queue (all replicas) as last reported
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self.dead_error: BaseException | None = None
        self.watchdog_s = watchdog_s  # 0: no watchdog
        self._watchdog: asyncio.Task | None = None

    # -- what a subclass provides ------------------------------------------------------------------
    def _send(self, command: AddRequest | AbortRequest) -> None:
        """Hands a command to the engine side (called on the event loop; must not block)."""
        raise NotImplementedError

    def start(self) -> None:
        """Starts serving; call from the event loop that will consume outputs."""
        raise NotImplementedError

    @property
    def is_alive(self) -> bool:
        raise NotImplementedError

    async def shutdown(self) -> None:
        raise NotImplementedError

    def _finished(self, req_id: str) -> None:
        """Called once for every request that leaves _streams (final output or failure)."""

    def _progress_clocks(self) -> list[tuple[ProgressClock, bool]]:
        """Each engine side's clock, with whether it holds requests now (what the watchdog checks)."""
        raise NotImplementedError

    def _on_stall(self, clock: ProgressClock) -> None:
        """The watchdog declared `clock`'s side hung (called once, on the event loop, before open requests fail)."""

    # -- lifecycle -------------------------------------------------------------------------------
    def stop_accepting(self) -> None:
        self._accepting = False

    def abort_all(self) -> None:
        """Aborts every request in flight; each caller gets its final ("abort") output."""
        for req_id in list(self._streams):
            self._send(AbortRequest(req_id))

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def execution_plan(self) -> ExecutionPlan | None:
        """The worker's execution plan, read-only (for the dashboard); None where this process holds none: a GPU or
        --compile engine, or data-parallel replicas (each plans in its own process)."""
        return None

    def _start_watchdog(self) -> None:
        if self.watchdog_s > 0:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    async def _watch(self) -> None:
        """Declares the engine dead when a side with requests in flight sends nothing for more than watchdog_s."""
        period = min(1.0, self.watchdog_s / 4)
        while self.dead_error is None:
            await asyncio.sleep(period)
            now = time.monotonic()
            for clock, busy in self._progress_clocks():
                if not busy:
                    clock.beat()  # idle is not a stall: the clock starts at most `period` before work arrives
                elif now - clock.last > self.watchdog_s + period:  # so a stall is declared after >= watchdog_s
                    self._on_stall(clock)
                    self._engine_died(RuntimeError(
                        f"{clock.name} made no progress for {now - clock.last:.1f} s with requests in flight "
                        f"(watchdog: --engine-watchdog-s {self.watchdog_s:g})"))
                    return

    def _engine_died(self, error: BaseException) -> None:
        """Marks the engine dead and ends every open request with EngineDeadError (on the event loop)."""
        if self.dead_error is None:
            self.dead_error = error
            logger.error("the engine is dead: %s", error)
        self._fail_open_streams(EngineDeadError(self.dead_message))

    @property
    def dead_message(self) -> str:
        """Why no request can be served (for /health and 503 bodies); meaningful when is_alive is False."""
        if self.dead_error is not None:
            return f"the engine stopped and the server is exiting: {self.dead_error}"
        return "the engine is not running (shutting down or not started)"

    # -- requests --------------------------------------------------------------------------------
    def process_inputs(self, prompt: Prompt, params: SamplingParams, add_special_tokens: bool = True) -> ProcessedPrompt:
        return self.inputs.process_inputs(prompt, params, add_special_tokens)

    async def generate(
        self, prompt: Prompt | ProcessedPrompt, params: SamplingParams, *, req_id: str | None = None,
        priority: int = 0, arrival_time: float | None = None, add_special_tokens: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        """Submits one request and returns an iterator of its DELTA outputs (the last has
        finished=True). Raises, before returning, ValueError for bad input, QueueFullError when
        max_queue requests already wait, EngineDeadError when the engine is not running."""
        if not isinstance(prompt, ProcessedPrompt):
            prompt = self.process_inputs(prompt, params, add_special_tokens)
        sink: asyncio.Queue = asyncio.Queue()
        req_id = await self.submit(prompt, params, sink, req_id=req_id, priority=priority, arrival_time=arrival_time)
        return self._single(req_id, sink)

    async def _single(self, req_id: str, sink: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        async for _, output in self.iterate(sink, [req_id]):
            yield output

    async def submit(
        self, prompt: ProcessedPrompt, params: SamplingParams, sink: asyncio.Queue, *, req_id: str | None = None,
        priority: int = 0, arrival_time: float | None = None,
    ) -> str:
        """Hands a processed request to the engine; its (req_id, output) pairs will be put into `sink` (several
        requests may share one sink). Returns once the engine accepted it."""
        if not self._accepting or not self.is_alive:
            raise EngineDeadError(self.dead_message)
        if self.max_queue is not None and self._num_pending_adds + self._num_waiting >= self.max_queue:
            raise QueueFullError(f"{self.max_queue} requests are already waiting; retry later")
        req_id = req_id or f"req-{next(self._ids)}"
        if req_id in self._streams:
            raise ValueError(f"request id {req_id!r} is already in use")
        params = params.clone(output_kind=RequestOutputKind.DELTA)
        ticket = next(self._tickets)
        accepted = self._accepts[ticket] = asyncio.get_running_loop().create_future()
        self._streams[req_id] = sink
        self._num_pending_adds += 1
        self._send(AddRequest(req_id, prompt, params, priority,
                              time.monotonic() if arrival_time is None else arrival_time, ticket))
        try:
            await accepted
        except BaseException:
            self._accepts.pop(ticket, None)
            if self._streams.pop(req_id, None) is not None:
                if not (accepted.done() and not accepted.cancelled()):
                    self._send(AbortRequest(req_id))  # cancelled while being added
                self._finished(req_id)
            raise
        return req_id

    async def iterate(self, sink: asyncio.Queue, req_ids: list[str]) -> AsyncIterator[tuple[str, RequestOutput]]:
        """Yields (req_id, output) from `sink` until every request in req_ids has finished.
        Leaving early (break, cancellation, client gone) aborts the unfinished ones."""
        unfinished = set(req_ids)
        try:
            while unfinished:
                req_id, item = await sink.get()
                if isinstance(item, BaseException):
                    unfinished.discard(req_id)
                    raise item
                if item.finished:
                    unfinished.discard(req_id)
                yield req_id, item
        finally:
            for req_id in unfinished:
                self.abort(req_id)

    def abort(self, req_id: str) -> None:
        """Aborts a request in flight (synchronous, safe inside a cancelled task); its final
        output still reaches its sink."""
        if req_id in self._streams:
            self._send(AbortRequest(req_id))

    # -- results, on the event loop ------------------------------------------------------------------
    def _accept(self, ticket: int, error: BaseException | None) -> None:
        self._num_pending_adds -= 1
        accepted = self._accepts.pop(ticket, None)
        if accepted is None or accepted.done():
            return  # the caller was cancelled meanwhile (and sent an abort)
        if error is None:
            accepted.set_result(None)
        else:
            accepted.set_exception(error)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            sink = self._streams.get(output.request_id)
            if sink is None:
                continue  # nobody waits for it any more
            sink.put_nowait((output.request_id, output))
            if output.finished:
                del self._streams[output.request_id]
                self._finished(output.request_id)

    def _fail_streams(self, req_ids: list[str], error: BaseException) -> None:
        for req_id in req_ids:
            sink = self._streams.pop(req_id, None)
            if sink is not None:
                sink.put_nowait((req_id, error))
                self._finished(req_id)

    def _fail_open_streams(self, error: BaseException) -> None:
        """Ends every open request with `error`, those still waiting to be accepted too (an engine that died will
        never answer their AddRequest: without this their callers would wait until shutdown cancelled them)."""
        for accepted in self._accepts.values():
            if not accepted.done():
                accepted.set_exception(error)
        self._accepts.clear()
        self._num_pending_adds = 0
        self._fail_streams(list(self._streams), error)

    def _record(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        """Metrics of one step's (or abort's) results (any one thread at a time)."""
        self._num_waiting = stats.num_waiting
        if self.metrics is not None:
            now = time.monotonic()
            self.metrics.record_step(stats)
            for output in outputs:
                self.metrics.record_output(output, now)
