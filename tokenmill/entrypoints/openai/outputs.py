"""Engine outputs -> OpenAI response bodies: logprob shapes, usage, and per-choice accumulation.

The engine hands out DELTA RequestOutputs. ChoiceState accumulates them for non-streaming responses
and turns each delta into a chunk's worth of text/logprobs for streaming ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tokenmill.entrypoints.openai.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptTokensDetails,
    RequestTimings,
    TopLogprob,
    Usage,
)
from tokenmill.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics

Decode = Callable[[int], str]  # token id -> its text


@dataclass
class ChoiceState:
    """One OpenAI choice (one sample of one prompt) as its deltas arrive."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, delta: CompletionOutput) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason


def usage(num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int = 0) -> Usage:
    """OpenAI's usage; prompt_tokens_details.cached_tokens is always there (0 without a prefix-cache hit)."""
    return Usage(
        prompt_tokens=num_prompt_tokens, completion_tokens=num_completion_tokens,
        total_tokens=num_prompt_tokens + num_completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=num_cached_tokens),
    )


def _span(starts: list[float | None], ends: list[float | None]) -> float | None:
    """From the earliest start to the latest end; None unless every request has both."""
    if not starts or any(t is None for t in starts + ends):
        return None
    return max(ends) - min(starts)  # type: ignore[type-var,operator]


def timings(metrics: list[RequestMetrics]) -> RequestTimings:
    """The `timings` of one HTTP request from its engine requests' metrics (one per prompt)."""
    arrival = [m.arrival_time for m in metrics]
    scheduled = [m.first_scheduled_time for m in metrics]
    first_token = [m.first_token_time for m in metrics]
    num_drafts = sum(m.num_draft_tokens for m in metrics)
    num_accepted = sum(m.num_accepted_tokens for m in metrics)
    return RequestTimings(
        queue_time=_span(arrival, scheduled), prefill_time=_span(scheduled, first_token),
        decode_time=_span(first_token, [m.last_token_time for m in metrics]),
        time_to_first_token=_span(arrival, first_token), e2e_latency=_span(arrival, [m.finished_time for m in metrics]),
        num_preemptions=sum(m.num_preemptions for m in metrics),
        num_draft_tokens=num_drafts or None, num_accepted_tokens=num_accepted if num_drafts else None,
        acceptance_rate=num_accepted / num_drafts if num_drafts else None,
    )


def _chosen(position: PositionLogprobs, token_id: int, decode: Decode) -> tuple[str, float]:
    entry = position.get(token_id)
    if entry is None:  # the sampler always includes the chosen token; be safe anyway
        return decode(token_id), float("-inf")
    return (entry.decoded_token if entry.decoded_token is not None else decode(token_id)), entry.logprob


def _ranked(position: PositionLogprobs, limit: int) -> list[tuple[int, Logprob]]:
    ordered = sorted(position.items(), key=lambda kv: (kv[1].rank or 1 << 30, -kv[1].logprob))
    return ordered[:limit]


def completion_logprobs(
    token_ids: list[int], positions: list[PositionLogprobs | None], num_top: int, decode: Decode,
    text_offset: int = 0,
) -> CompletionLogprobs:
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs, text_offset.
    A None position (the first prompt token under echo) has no logprob."""
    result = CompletionLogprobs()
    offset = text_offset
    for token_id, position in zip(token_ids, positions):
        if position is None:
            token, logprob, top = decode(token_id), None, None
        else:
            token, logprob = _chosen(position, token_id, decode)
            # top-N plus the chosen token when it is outside the top-N (as vLLM returns).
            top = {}
            for tid, lp in _ranked(position, num_top):
                top[lp.decoded_token if lp.decoded_token is not None else decode(tid)] = lp.logprob
            top.setdefault(token, logprob)
        result.tokens.append(token)
        result.token_logprobs.append(logprob)
        result.top_logprobs.append(top)
        result.text_offset.append(offset)
        offset += len(token)
    return result


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], num_top: int,
                  decode: Decode) -> ChatLogprobs:
    """OpenAI's chat logprobs: content = [{token, logprob, bytes, top_logprobs: [...num_top]}]."""
    content = []
    for token_id, position in zip(token_ids, positions):
        token, logprob = _chosen(position, token_id, decode)
        top = [
            TopLogprob(token=(lp.decoded_token if lp.decoded_token is not None else decode(tid)),
                       logprob=lp.logprob, bytes=_utf8(lp.decoded_token or ""))
            for tid, lp in _ranked(position, num_top)
        ]
        content.append(ChatTokenLogprob(token=token, logprob=logprob, bytes=_utf8(token), top_logprobs=top))
    return ChatLogprobs(content=content)
