"""EngineLoop: the life of whatever owns an LLMEngine while serving — the engine thread of an AsyncEngine, or a
data-parallel replica's process (engine/replica.py).

Each turn it applies the queued commands (adds and aborts; it blocks for one when the engine is idle), then runs one
step when requests are unfinished, and hands every result to its listener: acceptances, outputs with the engine's
state after them (EngineStats), and requests failed by a step. Everything it sends is plain data, so a listener may
forward it over a pipe.

Invariants:
- every AddRequest gets exactly one accepted() call (error None, or the ValueError the engine raised);
- every accepted request gets exactly one finished output through delivered(), or its id in one failed() call;
- a step that raises fails the requests the engine holds (failed()) and the loop goes on, except WorkerGroupDied
  (a tensor-parallel rank is lost): that, and anything raised outside a step, ends run() with the exception;
- the last EngineStats delivered is the engine's state whenever the loop waits for a command: every step and every
  abort delivers fresh stats, and before blocking idle the loop delivers them again (with no outputs) if they
  changed otherwise (a failed step), so gauges read from them never describe requests that are gone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from tokenmill.distributed.worker_group import WorkerGroupDied
from tokenmill.engine.core import StepStats
from tokenmill.engine.input_processor import ProcessedPrompt
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec.governor import SpecDecodingStats

logger = logging.getLogger("tokenmill")


class EngineStepError(RuntimeError):
    """The engine failed while running this request (HTTP 500); other requests go on."""


@dataclass(frozen=True)
class AddRequest:
    req_id: str
    prompt: ProcessedPrompt
    params: SamplingParams
    priority: int
    arrival_time: float  # time.monotonic() of the caller (one clock for every process of the machine)
    ticket: int  # echoed in accepted(): which submission this answers


@dataclass(frozen=True)
class AbortRequest:
    req_id: str


STOP = "stop"  # a string, not a sentinel object: it must survive pickling

Command = AddRequest | AbortRequest | str


@dataclass(frozen=True)
class EngineStats:
    """The engine's state after a step or an abort (what metrics and routing read)."""

    step: StepStats = field(default_factory=StepStats)  # what the step ran (empty after an abort)
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    prefix_queries: int = 0  # cumulative, in tokens
    prefix_hits: int = 0
    spec: SpecDecodingStats | None = None  # cumulative speculative-decoding counts (None: no speculation)


def _state_of(stats: EngineStats) -> tuple[int, int, float, int, int]:
    """The part of EngineStats that describes the engine now (not what a step ran)."""
    return stats.num_running, stats.num_waiting, stats.kv_usage, stats.prefix_queries, stats.prefix_hits


class LoopListener(Protocol):
    def accepted(self, ticket: int, error: ValueError | None) -> None: ...

    def delivered(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        """outputs may be empty: a step that finished nothing, or fresh stats on going idle."""

    def failed(self, req_ids: list[str], error: BaseException) -> None: ...


class InjectedFault(BaseException):
    """Raised by inject_fault's "die_after" hook: a BaseException, so no per-request handler catches it."""


def inject_fault(engine: LLMEngine, spec: str | None) -> None:
    """Test hook, inert unless spec is set (`tokenmill serve` reads it from $TOKENMILL_FAULT_INJECT): after N engine
    steps, "hang_step_after:N" makes every later step sleep forever (the watchdog's case) and "die_after:N" makes
    the next step raise InjectedFault, which ends the engine loop (an engine thread or replica that dies)."""
    if not spec:
        return
    kind, _, count = spec.partition(":")
    if kind not in ("hang_step_after", "die_after") or not count.isdigit():
        raise ValueError(f"fault injection: expected hang_step_after:N or die_after:N, got {spec!r}")
    step, budget = engine.step, [int(count)]
    logger.warning("fault injection (a test hook): %s", spec)

    def faulty_step() -> list[RequestOutput]:
        if budget[0] > 0:
            budget[0] -= 1
            return step()
        if kind == "die_after":
            raise InjectedFault(f"injected fault: {spec}")
        while True:
            time.sleep(3600.0)

    engine.step = faulty_step  # type: ignore[method-assign]


class EngineLoop:
    def __init__(self, engine: LLMEngine, next_command: Callable[[bool], Command | None], listener: LoopListener,
                 *, log_steps: bool = False) -> None:
        """next_command(block) returns the next command, or None when none is queued and block is False."""
        self.engine = engine
        self.next_command = next_command
        self.listener = listener
        self.log_steps = log_steps
        self._published = _state_of(EngineStats())  # what the listener last heard (a new engine holds nothing)

    def run(self) -> None:
        """Serves commands until STOP; raises whatever stops the engine for good."""
        engine = self.engine
        while True:
            idle = not engine.has_unfinished_requests()
            if idle:
                self._publish_if_changed()
            if self._drain_commands(block=idle):
                return
            if engine.has_unfinished_requests():
                outputs = self._step()
                if outputs is not None:
                    self._deliver(outputs)

    def stats(self, step: StepStats | None = None) -> EngineStats:
        """The engine's state now; `step` (default: the last step's) is what it ran."""
        core = self.engine.core
        kv = core.kv_cache_manager
        spec = None if core.governor is None else core.governor.stats.copy()
        return EngineStats(core.last_step if step is None else step, core.scheduler.num_running,
                           core.scheduler.num_waiting, kv.usage, kv.prefix_cache_queries, kv.prefix_cache_hits, spec)

    def _deliver(self, outputs: list[RequestOutput], step: StepStats | None = None) -> None:
        stats = self.stats(step)
        self._published = _state_of(stats)
        self.listener.delivered(outputs, stats)

    def _publish_if_changed(self) -> None:
        """Delivers the engine's state (no outputs) when it differs from the last delivered."""
        stats = self.stats(StepStats())
        if _state_of(stats) != self._published:
            self._published = _state_of(stats)
            self.listener.delivered([], stats)

    def _drain_commands(self, block: bool) -> bool:
        """Applies queued adds and aborts; True when asked to stop."""
        while True:
            command = self.next_command(block)
            if command is None:
                return False
            block = False
            if command == STOP:
                return True
            if isinstance(command, AbortRequest):
                self._abort(command.req_id)
            else:
                self._add(command)

    def _add(self, command: AddRequest) -> None:
        try:
            self.engine.add_request(command.req_id, command.prompt, command.params, priority=command.priority,
                                    arrival_time=command.arrival_time)
        except ValueError as exc:
            self.listener.accepted(command.ticket, exc)
            return
        self.listener.accepted(command.ticket, None)

    def _abort(self, req_id: str) -> None:
        final = self.engine.abort_request(req_id)
        if final is not None:
            self._deliver([final], StepStats())

    def _step(self) -> list[RequestOutput] | None:
        """One engine step's outputs; None when the step failed (its requests were failed instead)."""
        engine = self.engine
        start = time.perf_counter()
        try:
            outputs = engine.step()
        except WorkerGroupDied:
            raise  # the engine cannot run another step: the owner reports it and stops
        except Exception as exc:  # fail the requests in flight, keep serving
            logger.exception("engine step failed; failing the requests in flight")
            self._reset_after_failure(exc)
            return None
        last = engine.core.last_step
        if self.log_steps and last.num_scheduled_reqs:
            logger.info("step: %d requests, %d tokens, %.1f ms", last.num_scheduled_reqs, last.num_scheduled_tokens,
                        1000.0 * (time.perf_counter() - start))
        return outputs

    def _reset_after_failure(self, exc: Exception) -> None:
        """Aborts everything the engine holds; their callers get EngineStepError instead of output."""
        req_ids = list(self.engine.output_processor.requests)
        for req_id in req_ids:
            try:
                self.engine.abort_request(req_id)
            except Exception:
                logger.exception("could not abort %s after a failed step", req_id)
        while self.engine.core.has_unfinished_requests():  # let the scheduler drop the aborted requests
            self.engine.core.step()
        self.listener.failed(req_ids, EngineStepError(f"engine step failed: {exc}"))
