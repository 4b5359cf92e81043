"""One sequence being generated: its tokens, progress and status. Plain Python, no torch."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenmill.outputs import PositionLogprobs, RequestMetrics
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenmill.structured.manager import RequestGrammar


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Everything from here on is finished.
    FINISHED_STOPPED = 10
    FINISHED_LENGTH = 11
    FINISHED_ABORTED = 12
    FINISHED_ERROR = 13

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASON.get(self)


_FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(eq=False)
class Request:
    """Invariant: all_token_ids == prompt_token_ids + output_token_ids, and
    0 <= num_computed_tokens <= num_tokens. Tokens in [num_computed_tokens, num_tokens) still need
    a forward pass; when a step computes up to num_tokens the runner samples one new token.
    """

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    max_model_len: int | None = None  # generation stops ("length") when num_tokens reaches it
    priority: int = 0  # lower value = scheduled earlier (vLLM convention) under the priority policy
    arrival_time: float = field(default_factory=time.monotonic)
    # Requests sharing a group_id are the n samples of one prompt; see Scheduler for how they share KV.
    group_id: str | None = None

    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit in tokens, set at first admission
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    # Chained hashes of this request's full blocks, maintained by the KV cache manager.
    block_hashes: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    # Structured output (structured/manager.py): its grammar's compilation and matcher; None when unconstrained.
    grammar: RequestGrammar | None = None
    # Speculative decoding (spec/governor.py): drafts verified and accepted so far, the slots it gets per step
    # (0: not decoding yet) and its recent acceptance rate (None before its first verified draft).
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    spec_num_tokens: int = 0
    spec_acceptance: float | None = None
    spec_paused_steps: int = 0  # decode steps left without drafts (the governor's pause)
    metrics: RequestMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.all_token_ids = self.prompt_token_ids + list(self.output_token_ids)
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    @property
    def max_tokens(self) -> int:
        """Most output tokens this request may produce (sampling max_tokens capped by the context)."""
        limit = self.sampling_params.max_tokens
        if self.max_model_len is not None:
            room = self.max_model_len - self.num_prompt_tokens
            limit = room if limit is None else min(limit, room)
        if limit is None:
            raise ValueError("max_tokens is unbounded: set SamplingParams.max_tokens or max_model_len")
        return limit

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)
