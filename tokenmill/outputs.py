"""What the engine hands back to callers."""

from __future__ import annotations

from dataclasses import dataclass

FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1-based rank in the (unprocessed) distribution
    decoded_token: str | None = None


# One position's logprobs: token id -> Logprob. Contains the top-N and the chosen token.
PositionLogprobs = dict[int, Logprob]


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    # Speculative decoding: draft tokens verified for the request (all its samples) and how many were accepted.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_preemptions: int = 0  # times its KV was freed to make room (recomputed later), all samples together

    @property
    def acceptance_rate(self) -> float | None:
        return None if self.num_draft_tokens == 0 else self.num_accepted_tokens / self.num_draft_tokens

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def prefill_time(self) -> float | None:
        """First scheduled -> first token: the prompt's computation (all its chunks, and waits between them)."""
        if self.first_token_time is None or self.first_scheduled_time is None:
            return None
        return self.first_token_time - self.first_scheduled_time

    @property
    def decode_time(self) -> float | None:
        if self.last_token_time is None or self.first_token_time is None:
            return None
        return self.last_token_time - self.first_token_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # one of FINISH_REASONS once finished
    stop_reason: int | str | None = None  # the stop string or stop token that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
