"""The contract between the model runner and the scheduler. Plain data, easy to fake in tests."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.outputs import PositionLogprobs


@dataclass
class ModelRunnerOutput:
    req_ids: list[str]
    # One list per req_id: the tokens sampled this step (empty for a request mid-prefill).
    sampled_token_ids: list[list[int]]
    # Per req_id, one PositionLogprobs per sampled token; None where logprobs were not asked for.
    logprobs: list[list[PositionLogprobs] | None] | None = None
    # Per req_id, prompt logprobs for the prompt positions computed this step (position p holds the
    # distribution of token p given tokens < p; the very first prompt position gets None).
    prompt_logprobs: dict[str, list[PositionLogprobs | None]] = field(default_factory=dict)
    # Speculative decoding: per req_id, how many drafts the step verified (None: no request had any). Of a request's
    # d drafts, len(sampled_token_ids[i]) - 1 were accepted (the last sampled token is the target's own).
    num_draft_tokens: list[int] | None = None
