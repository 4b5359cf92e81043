"""Verification of drafts: lossless by construction.

The target samples every drafted position as it would without speculation: row j of a request is the target's
distribution after its known tokens and its first j drafts, processed and sampled by the ordinary sampler (with the
penalties, logit bias, min_tokens and per-step seed of output position num_output_tokens + j; DraftRowView below).
The output is the target's tokens up to and including the first position where the draft differs. Each emitted token
is then exactly the token the target samples at that position given the tokens before it, so greedy output is
token-identical to decoding without speculation, and sampled output has the target's distribution (seeded requests
even give the same tokens). Draft j is accepted with probability p_target(draft_j): for drafts that are a single
guess (n-grams, a draft model's greedy token) this is rejection sampling with a one-hot proposal, residual included.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.request_states import RequestState


def accepted_tokens(draft_token_ids: Sequence[int], sampled_token_ids: Sequence[int]) -> list[int]:
    """sampled_token_ids[j] is the target's token after the first j drafts (len(drafts) + 1 of them): the tokens to
    emit, the accepted drafts then the target's own token at the first mismatch (or after the last draft)."""
    num_accepted = 0
    while num_accepted < len(draft_token_ids) and draft_token_ids[num_accepted] == sampled_token_ids[num_accepted]:
        num_accepted += 1
    return list(sampled_token_ids[: num_accepted + 1])


class DraftRowView:
    """A request as the sampler sees it at a drafted row: its tokens followed by its first `num_drafts` drafts
    (worker/sampling_metadata.py's SamplingRequest)."""

    __slots__ = ("_drafts", "_state")

    def __init__(self, state: RequestState, drafts: Sequence[int]) -> None:
        self._state = state
        self._drafts = drafts

    @property
    def sampling_params(self) -> SamplingParams:
        return self._state.sampling_params

    @property
    def eos_token_id(self) -> int | None:
        return self._state.eos_token_id

    @property
    def all_token_ids(self) -> list[int]:
        return self._state.all_token_ids + list(self._drafts)

    @property
    def output_token_ids(self) -> list[int]:
        return self._state.output_token_ids + list(self._drafts)

    @property
    def num_output_tokens(self) -> int:
        return self._state.num_output_tokens + len(self._drafts)


def sampling_rows(state: RequestState, draft_token_ids: Sequence[int]) -> list[RequestState | DraftRowView]:
    """The sampler's request per sampled row of a request with drafts (the plain state for its first row)."""
    return [state, *(DraftRowView(state, draft_token_ids[:j]) for j in range(1, len(draft_token_ids) + 1))]
