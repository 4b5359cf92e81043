"""The engine side of structured output (vLLM V1's design): one grammar matcher per request, held on the engine's
Request, advanced by every token the scheduler accepts; each step's next-token masks filled here, for the rows that
sample, and sent to the worker in the StepInput (structured/bitmask.py), where the sampler applies them.

Life of a constrained request:
1. EngineCore.add_request -> add_request(): its grammar starts compiling (structured/compiler.py) and the request
   gets a RequestGrammar (request.grammar);
2. the scheduler leaves it in the waiting queue, in its place, until request.grammar.is_ready() (which creates the
   matcher); a compilation that failed finishes it with an error (failed_requests());
3. each step, grammar_bitmask() fills the masks of the scheduled requests that sample, in one batched call;
4. Scheduler.update_from_output -> request.grammar.accept(token) for each token appended; once the grammar has
   ended (it accepted a stop token, or nothing can follow), request.grammar.terminated and the request stops ("stop").
Preemption keeps a request's output tokens, so its matcher stays as it is.

Requests without structured_outputs never reach anything here beyond one `is None` test, and an engine that never
saw a constrained request neither imports xgrammar nor starts a thread.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from tokenmill.structured.bitmask import GrammarBitmask
from tokenmill.structured.grammar import import_xgrammar

if TYPE_CHECKING:
    from tokenmill.engine.request import Request
    from tokenmill.engine.scheduler_output import ScheduledRequest
    from tokenmill.structured.compiler import GrammarCompiler

logger = logging.getLogger("tokenmill")


class RequestGrammar:
    """One request's grammar: its compilation, then its matcher. `terminated` once the grammar has ended."""

    def __init__(self, req_id: str, compiled: Future) -> None:
        self.req_id = req_id
        self.compiled = compiled
        self.matcher: Any = None  # xgrammar.GrammarMatcher, once compiled
        self.terminated = False

    @property
    def failed(self) -> bool:
        return self.compiled.done() and (self.compiled.cancelled() or self.compiled.exception() is not None)

    def is_ready(self) -> bool:
        """Whether the request may be scheduled: its grammar is compiled (the matcher is created on the first True)."""
        if self.matcher is not None:
            return True
        if not self.compiled.done() or self.failed:
            return False
        self.matcher = import_xgrammar().GrammarMatcher(self.compiled.result())
        return True

    def accept(self, token_id: int) -> None:
        """Advances the matcher by one sampled token. The masks allow only tokens the grammar accepts, so a refusal
        is a bug; it is logged and ends the grammar (the request stops rather than produce unconstrained text)."""
        if self.terminated:
            return
        if not self.matcher.accept_token(token_id):
            logger.error("request %s: the grammar refused sampled token %d; stopping it", self.req_id, token_id)
            self.terminated = True
        elif self.matcher.is_terminated():
            self.terminated = True


class StructuredOutputManager:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        """vocab_size: the model's logits width (the masks' width)."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(set(stop_token_ids))
        self.compiler: GrammarCompiler | None = None  # built on the first constrained request
        self._batch: Any = None  # xgrammar.BatchGrammarMatcher
        self._compiling: list[Request] = []  # requests whose grammar was not ready when last looked at

    def add_request(self, request: Request) -> None:
        """Starts compiling the grammar of a request that asks for structured output (others: nothing)."""
        params = request.sampling_params.structured_outputs
        if params is None:
            return
        if self.compiler is None:
            from tokenmill.structured.compiler import GrammarCompiler

            self.compiler = GrammarCompiler(self.tokenizer, self.vocab_size, self.stop_token_ids)
            self._batch = import_xgrammar().BatchGrammarMatcher()
        request.grammar = RequestGrammar(request.req_id, self.compiler.compile(params))
        if not request.grammar.compiled.done():
            self._compiling.append(request)

    @property
    def num_compiling(self) -> int:
        return len(self._compiling)

    def failed_requests(self) -> list[str]:
        """Unfinished requests whose grammar failed to compile (each logged once; the caller finishes them)."""
        failed: list[str] = []
        still: list[Request] = []
        for request in self._compiling:
            grammar = request.grammar
            if request.is_finished or (grammar.compiled.done() and not grammar.failed):
                continue
            if grammar.failed:
                logger.error("request %s: its grammar failed to compile: %s", request.req_id,
                             "cancelled" if grammar.compiled.cancelled() else grammar.compiled.exception())
                failed.append(request.req_id)
            else:
                still.append(request)
        self._compiling = still
        return failed

    def wait_for_compiles(self, timeout: float) -> None:
        """Blocks up to `timeout` s until a pending compilation completes: for an engine with nothing else to run,
        instead of spinning on empty steps while the compile thread needs the CPU."""
        pending = [r.grammar.compiled for r in self._compiling if not r.is_finished]
        if pending:
            concurrent.futures.wait(pending, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)

    def grammar_bitmask(self, scheduled: Sequence[ScheduledRequest]) -> GrammarBitmask | None:
        """The next-token masks of the scheduled requests that sample this step under a grammar, filled in one
        batched call; None when there are none."""
        if self.compiler is None:
            return None
        requests = [s.request for s in scheduled if s.request.grammar is not None and s.samples]
        if not requests:
            return None
        xgr = import_xgrammar()
        bitmask = xgr.allocate_token_bitmask(len(requests), self.vocab_size)
        self._batch.batch_fill_next_token_bitmask([r.grammar.matcher for r in requests], bitmask)
        return GrammarBitmask([r.req_id for r in requests], bitmask)

    def close(self) -> None:
        if self.compiler is not None:
            self.compiler.close()
