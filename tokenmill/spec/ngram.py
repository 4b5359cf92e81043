"""n-gram (prompt lookup) drafts: the tokens that followed the latest earlier occurrence of the request's last n
tokens, for the longest n from prompt_lookup_max down to prompt_lookup_min that occurs. Free to compute, and
right often where the output copies its input (summaries, edits, extraction, code)."""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence

from tokenmill.worker.request_states import StepRequest

_ITEM = 4  # bytes per token id in the searched buffer (int32)


def ngram_proposal(token_ids: Sequence[int], num_tokens: int, min_n: int, max_n: int) -> list[int]:
    """Up to num_tokens drafts continuing token_ids, or [] when no suffix of min_n..max_n tokens occurred before."""
    length = len(token_ids)
    if num_tokens < 1 or length < min_n + 1:
        return []
    buf = array("i", token_ids).tobytes()  # bytes.rfind is a C search: ~100x a Python scan over 1,000 tokens
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        pattern = buf[-n * _ITEM:]
        end = (length - 1) * _ITEM  # an occurrence must end before the last token: it needs a continuation
        while True:
            pos = buf.rfind(pattern, 0, end)
            if pos < 0:
                break
            if pos % _ITEM == 0:  # a match at a token boundary (not straddling two ids)
                start = pos // _ITEM + n
                return list(token_ids[start : start + num_tokens])
            end = pos + len(pattern) - 1
    return []


class NgramProposer:
    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.min_n, self.max_n = prompt_lookup_min, prompt_lookup_max

    def propose(self, scheduled: Sequence[StepRequest]) -> None:
        """Fills each request's speculative slots (StepRequest.add_drafts) with what its own tokens suggest."""
        for s in scheduled:
            if s.num_spec_tokens and s.samples:
                drafts = ngram_proposal(s.state.all_token_ids, s.num_spec_tokens, self.min_n, self.max_n)
                if drafts:
                    s.add_drafts(drafts)

    def follow(self, scheduled: Sequence[StepRequest]) -> None:
        """Nothing to compute ahead: n-grams come from the tokens themselves."""

    def drop(self, req_ids: Iterable[str]) -> None:
        """Nothing is kept per request."""
