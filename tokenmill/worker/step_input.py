"""The engine -> worker contract of one step: plain data only (no Request objects, no tensors), so it can cross
a process boundary as it is (pickle), as vLLM V1's NewRequestData / CachedRequestData do.

A request reaches the worker once, whole (NewRequestData: its tokens so far, sampling parameters, block table);
after that each step sends only what changed (CachedRequestData: the tokens appended since the worker last saw it,
the blocks added to its table). A request that finishes, is aborted or is preempted is dropped (`dropped_req_ids`);
preempted ones come back later as new. The worker keeps its own mirror of every request it holds
(worker/request_states.py); the engine side keeps track of what it has sent (engine/worker_mirror.py).

Invariant: per request, the worker's tokens and block table equal the engine's after each StepInput is applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.sampling_params import SamplingParams
from tokenmill.structured.bitmask import GrammarBitmask


@dataclass(frozen=True)
class NewRequestData:
    """A request the worker does not hold yet, whole."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # non-empty for a request resumed after preemption
    sampling_params: SamplingParams
    eos_token_id: int | None
    block_ids: list[int]


@dataclass(frozen=True)
class CachedRequestData:
    """What changed, since the previous step, for requests the worker holds (parallel lists)."""

    req_ids: list[str] = field(default_factory=list)
    new_token_ids: list[list[int]] = field(default_factory=list)  # appended to the request's tokens
    new_block_ids: list[list[int]] = field(default_factory=list)  # appended to its block table


@dataclass(frozen=True)
class ScheduledWork:
    """One request's share of the step: compute its tokens [start_pos, start_pos + num_new_tokens). With
    num_spec_tokens > 0 (speculative decoding) the last num_spec_tokens of those are slots for the worker's own
    drafts (spec/), which it guesses, computes and verifies in this step; it may guess fewer."""

    req_id: str
    start_pos: int
    num_new_tokens: int
    num_spec_tokens: int = 0


@dataclass(frozen=True)
class StepInput:
    """One step for the worker. Applied in order: dropped_req_ids, new_requests, cached; then `scheduled` (in
    batch order) names the work."""

    scheduled: list[ScheduledWork] = field(default_factory=list)
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached: CachedRequestData = field(default_factory=CachedRequestData)
    dropped_req_ids: list[str] = field(default_factory=list)
    # Structured output: the next-token masks of the scheduled requests that sample under a grammar (the one tensor
    # here, a small CPU int32 one that pickles as it is); None when no such request samples this step.
    grammar: GrammarBitmask | None = None

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(w.num_new_tokens for w in self.scheduled)
