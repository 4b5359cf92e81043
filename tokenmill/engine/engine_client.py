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
- shutdown() aborts whatever is still in flight (each caller still gets its final output).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

from tokenmill.engine.engine_loop import AbortRequest, AddRequest, EngineStats
from tokenmill.engine.input_processor import InputProcessor, ProcessedPrompt, Prompt
from tokenmill.engine.metrics import EngineMetrics
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should retry later (HTTP 429)."""


class EngineDeadError(RuntimeError):
    """The engine is shut down or its thread died; no request can be served (HTTP 503)."""


class EngineClient:
    def __init__(self, inputs: InputProcessor, *, max_queue: int | None, metrics: EngineMetrics | None) -> None:
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
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

    def _dead_message(self) -> str:
        if self.dead_error is not None:
            return f"the engine stopped after an internal error: {self.dead_error}"
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
            raise EngineDeadError(self._dead_message())
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
        self._fail_streams(list(self._streams), error)

    def _record(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        """Metrics of one step's (or abort's) results (any one thread at a time)."""
        self._num_waiting = stats.num_waiting
        if self.metrics is not None:
            now = time.monotonic()
            self.metrics.record_step(stats)
            for output in outputs:
                self.metrics.record_output(output, now)
