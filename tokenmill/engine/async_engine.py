"""AsyncEngine: one background engine thread serving many asyncio callers (in-flight batching).

The LLMEngine is owned by the engine thread alone. Callers on the event loop validate and tokenize
their request (LLMEngine.process_inputs only reads immutable state), then hand it over through a
command queue; the engine thread drains that queue before every step, so a new request joins the
running batch at the next step and an abort (client gone) takes effect before the next step.
Outputs go back to the event loop with one call_soon_threadsafe per step.

Invariants:
- every request accepted by submit() gets exactly one finished RequestOutput into its sink, or an
  EngineDeadError / EngineStepError if the engine could not produce one;
- an iterate() that is cancelled or closed early aborts its unfinished requests (freeing their KV
  blocks before the next step);
- shutdown() aborts whatever is still in flight (each caller still gets its final output) and
  joins the engine thread.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from tokenmill.distributed.worker_group import WorkerGroupDied
from tokenmill.engine.llm_engine import LLMEngine, ProcessedPrompt, Prompt
from tokenmill.engine.metrics import EngineMetrics
from tokenmill.engine.openmp_pool import release_openmp_pool
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("tokenmill")


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should retry later (HTTP 429)."""


class EngineDeadError(RuntimeError):
    """The engine is shut down or its thread died; no request can be served (HTTP 503)."""


class EngineStepError(RuntimeError):
    """The engine failed while running this request (HTTP 500); other requests go on."""


@dataclass
class _Add:
    req_id: str
    prompt: ProcessedPrompt
    params: SamplingParams
    priority: int
    arrival_time: float
    accepted: asyncio.Future  # result None, or the ValueError the engine raised


@dataclass
class _Abort:
    req_id: str


_STOP = object()


class AsyncEngine:
    def __init__(self, engine: LLMEngine, *, max_queue: int | None = None, metrics: EngineMetrics | None = None,
                 log_steps: bool = False) -> None:
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics
        self.log_steps = log_steps
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # Event-loop side: the sink of every request in flight, until its final output is delivered.
        self._streams: dict[str, asyncio.Queue] = {}
        self._num_pending_adds = 0  # event-loop side: handed over, not yet added by the engine thread
        self._num_waiting = 0  # engine side snapshot: scheduler's waiting queue after the last step
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._accepting = False
        self.dead_error: BaseException | None = None

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

    def stop_accepting(self) -> None:
        self._accepting = False

    def abort_all(self) -> None:
        """Aborts every request in flight; each caller gets its final ("abort") output."""
        for req_id in list(self._streams):
            self._commands.put(_Abort(req_id))

    async def shutdown(self) -> None:
        """Stops accepting, aborts in-flight requests, and joins the engine thread."""
        self._accepting = False
        self.abort_all()
        thread = self._thread
        if thread is None:
            return
        self._commands.put(_STOP)
        await asyncio.to_thread(thread.join)
        self._thread = None
        self.engine.close()  # the other tensor-parallel ranks, if any
        # Deliveries scheduled by the thread's last iteration run before this point; anything
        # still open now can never get an output.
        self._fail_open_streams(EngineDeadError("the engine was shut down"))

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead_error is None

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # -- requests --------------------------------------------------------------------------------
    def process_inputs(self, prompt: Prompt, params: SamplingParams, add_special_tokens: bool = True) -> ProcessedPrompt:
        return self.engine.process_inputs(prompt, params, add_special_tokens)

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
        """Hands a processed request to the engine thread; its (req_id, output) pairs will be put
        into `sink` (several requests may share one sink). Returns once the engine accepted it."""
        if not self._accepting or not self.is_alive:
            raise EngineDeadError(self._dead_message())
        if self.max_queue is not None and self._num_pending_adds + self._num_waiting >= self.max_queue:
            raise QueueFullError(f"{self.max_queue} requests are already waiting; retry later")
        req_id = req_id or f"req-{next(self._ids)}"
        if req_id in self._streams:
            raise ValueError(f"request id {req_id!r} is already in use")
        params = params.clone(output_kind=RequestOutputKind.DELTA)
        accepted = asyncio.get_running_loop().create_future()
        self._streams[req_id] = sink
        self._num_pending_adds += 1
        self._commands.put(_Add(req_id, prompt, params, priority,
                                time.monotonic() if arrival_time is None else arrival_time, accepted))
        try:
            await accepted
        except BaseException:
            if self._streams.pop(req_id, None) is not None and not (accepted.done() and not accepted.cancelled()):
                self._commands.put(_Abort(req_id))  # cancelled while being added
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
            self._commands.put(_Abort(req_id))

    # -- event-loop side of deliveries -------------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            sink = self._streams.get(output.request_id)
            if sink is None:
                continue  # nobody waits for it any more
            sink.put_nowait((output.request_id, output))
            if output.finished:
                del self._streams[output.request_id]

    def _fail_streams(self, req_ids: list[str], error: BaseException) -> None:
        for req_id in req_ids:
            sink = self._streams.pop(req_id, None)
            if sink is not None:
                sink.put_nowait((req_id, error))

    def _fail_open_streams(self, error: BaseException) -> None:
        self._fail_streams(list(self._streams), error)

    def _accept(self, command: _Add, error: BaseException | None) -> None:
        self._num_pending_adds -= 1
        if command.accepted.done():
            return  # the caller was cancelled meanwhile (and queued an abort)
        if error is None:
            command.accepted.set_result(None)
        else:
            command.accepted.set_exception(error)

    def _dead_message(self) -> str:
        if self.dead_error is not None:
            return f"the engine stopped after an internal error: {self.dead_error}"
        return "the engine is not running (shutting down or not started)"

    # -- engine thread ---------------------------------------------------------------------------
    def _call_loop(self, fn: Any, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the event loop is closed: nobody is left to deliver to

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                if self._drain_commands(block=not engine.has_unfinished_requests()):
                    return
                if engine.has_unfinished_requests():
                    outputs = self._step()
                    if outputs:
                        self._call_loop(self._deliver, outputs)
        except BaseException as exc:  # the thread must report any death
            logger.exception("engine thread died")
            self.dead_error = exc
            self._call_loop(self._fail_open_streams, EngineDeadError(self._dead_message()))

    def _drain_commands(self, block: bool) -> bool:
        """Applies queued adds and aborts; True when asked to stop."""
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return False
            block = False
            if command is _STOP:
                return True
            if isinstance(command, _Abort):
                self._abort_in_engine(command.req_id)
            else:
                self._add_in_engine(command)

    def _add_in_engine(self, command: _Add) -> None:
        try:
            self.engine.add_request(command.req_id, command.prompt, command.params, priority=command.priority,
                                    arrival_time=command.arrival_time)
        except ValueError as exc:
            self._call_loop(self._accept, command, exc)
            return
        self._call_loop(self._accept, command, None)

    def _abort_in_engine(self, req_id: str) -> None:
        final = self.engine.abort_request(req_id)
        if final is not None:
            if self.metrics is not None:
                self.metrics.record_output(final)
            self._call_loop(self._deliver, [final])

    def _step(self) -> list[RequestOutput]:
        engine = self.engine
        start = time.perf_counter()
        try:
            outputs = engine.step()
        except WorkerGroupDied:
            raise  # the engine cannot run another step: the thread dies, the server reports it and exits
        except Exception as exc:  # fail the requests in flight, keep serving
            logger.exception("engine step failed; failing the requests in flight")
            self._reset_after_failure(exc)
            return []
        core = engine.core
        if self.log_steps and core.last_step.num_scheduled_reqs:
            logger.info("step: %d requests, %d tokens, %.1f ms", core.last_step.num_scheduled_reqs,
                        core.last_step.num_scheduled_tokens, 1000.0 * (time.perf_counter() - start))
        self._num_waiting = core.scheduler.num_waiting
        if self.metrics is not None:
            now = time.monotonic()
            kv = core.kv_cache_manager
            self.metrics.record_step(core.last_step, core.scheduler.num_running, self._num_waiting,
                                     kv.usage, kv.prefix_cache_queries, kv.prefix_cache_hits)
            for output in outputs:
                self.metrics.record_output(output, now)
        return outputs

    def _reset_after_failure(self, exc: Exception) -> None:
        """Aborts everything the engine holds; the callers get EngineStepError instead of output."""
        req_ids = list(self.engine.output_processor.requests)
        for req_id in req_ids:
            try:
                self.engine.abort_request(req_id)
            except Exception:
                logger.exception("could not abort %s after a failed step", req_id)
        while self.engine.core.has_unfinished_requests():  # deliver the queued final outputs
            self.engine.core.step()
        self._call_loop(self._fail_streams, req_ids, EngineStepError(f"engine step failed: {exc}"))
