"""The contract between the scheduler and the model runner. Plain data, no tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.engine.request import Request
from tokenmill.outputs import PositionLogprobs


@dataclass
class ScheduledRequest:
    """One request's share of a step: compute tokens
    request.all_token_ids[start_pos : start_pos + num_new_tokens - num_spec_tokens], writing their K/V into the
    slots of block_ids (the request's whole block table, in order). The last num_spec_tokens of num_new_tokens
    are slots (in the budget and the block table) for the worker's speculative drafts, which it may leave unused."""

    request: Request
    start_pos: int  # == request.num_computed_tokens when scheduled
    num_new_tokens: int
    block_ids: list[int]
    num_spec_tokens: int = 0

    @property
    def req_id(self) -> str:
        return self.request.req_id

    @property
    def token_ids(self) -> list[int]:
        return self.request.all_token_ids[self.start_pos : self.start_pos + self.num_new_tokens - self.num_spec_tokens]

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the known tokens, so a new token is sampled."""
        return self.start_pos + self.num_new_tokens - self.num_spec_tokens >= self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # Requests preempted while building this step (their blocks are already freed).
    preempted_req_ids: list[str] = field(default_factory=list)
    # Requests that finished since the previous step (runner may drop per-request state).
    finished_req_ids: list[str] = field(default_factory=list)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class EngineCoreOutput:
    """What one step produced for one request (a delta), as returned by Scheduler.update_from_output."""

    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[PositionLogprobs] | None = None
    new_prompt_logprobs: list[PositionLogprobs | None] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" once finished
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    first_scheduled_time: float | None = None  # time.monotonic() when first admitted to a step
    num_preemptions: int = 0  # times the request was preempted so far
    # Speculative decoding: drafts this step verified for the request, and how many of them it accepted.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
