"""Per-step sampling tensors, built from the requests that sample this step (one row each).

Everything here is built once per step by `SamplingMetadata.from_requests`; the sampler then works on
whole-batch tensors. Stages no row needs are left as None so the sampler can skip them.
Token-level state (logit_bias, min_tokens masks, penalties) is stored sparsely as (row, token, value)
triples, so its cost scales with the number of tokens involved, never with rows x vocab.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Protocol

import torch

from tokenmill.sampling_params import SamplingParams
from tokenmill.structured.bitmask import GrammarBitmask

_MASK64 = (1 << 64) - 1


class SamplingRequest(Protocol):
    """What sampling reads of a request: the worker's RequestState (worker/request_states.py), or the engine's
    Request."""

    @property
    def sampling_params(self) -> SamplingParams: ...
    @property
    def eos_token_id(self) -> int | None: ...
    @property
    def all_token_ids(self) -> list[int]: ...
    @property
    def output_token_ids(self) -> list[int]: ...
    @property
    def num_output_tokens(self) -> int: ...


@dataclass
class TokenUpdates:
    """Sparse per-(row, token) data: row_ids[j], token_ids[j] and values[j] (None where not needed)."""

    row_ids: torch.Tensor  # [M] long
    token_ids: torch.Tensor  # [M] long
    values: torch.Tensor | None = None  # [M] float32


@dataclass
class SamplingMetadata:
    """Tensors for the rows that sample this step, one row per request, in batch order."""

    num_rows: int
    vocab_size: int
    all_greedy: bool  # every row is greedy: argmax only, no noise drawn
    all_random: bool  # no row is greedy
    greedy_mask: torch.Tensor | None  # [R] bool; None when all_greedy or all_random
    temperature: torch.Tensor | None  # [R] float32, 1.0 on greedy rows; None when no row needs it
    top_k: torch.Tensor | None  # [R] long in [1, V]; V means disabled; None when no row uses it
    top_p: torch.Tensor | None  # [R] float32; 1.0 means disabled
    min_p: torch.Tensor | None  # [R] float32; 0.0 means disabled
    logit_bias: TokenUpdates | None  # values: bias to add
    min_tokens_mask: TokenUpdates | None  # (row, token) set to -inf
    repetition_penalty: TokenUpdates | None  # unique (row, token) over prompt+output; values: penalty
    additive_penalty: TokenUpdates | None  # unique (row, token) over output; values: amount to subtract
    # Row -> generator for seeded random rows, seeded from (seed, num_output_tokens): stateless.
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    global_generator: torch.Generator | None = None  # unseeded rows (None: torch default)
    num_logprobs: list[int | None] = field(default_factory=list)  # per row
    max_num_logprobs: int | None = None  # None when no row asks for logprobs
    # Structured output (structured/bitmask.py): int32 [G, ceil(V / 32)] next-token masks, mask i for row
    # grammar_rows[i] (grammar_rows None: mask i for row i, every row). None when no row samples under a grammar.
    grammar_bitmask: torch.Tensor | None = None
    grammar_rows: torch.Tensor | None = None

    @property
    def argmax_under_masks_only(self) -> bool:
        """As argmax_only, except that rows may have grammar masks: each row takes the argmax of its raw logits over
        the tokens its mask allows (which is the raw argmax wherever the mask allows that)."""
        return (self.all_greedy and self.max_num_logprobs is None and self.logit_bias is None
                and self.min_tokens_mask is None and self.repetition_penalty is None and self.additive_penalty is None)

    @property
    def argmax_only(self) -> bool:
        """Every row takes the argmax of its raw logits: greedy, nothing changes the logits first, no logprobs (so
        the vocabulary projection may hand over the argmax without the logits)."""
        return self.argmax_under_masks_only and self.grammar_bitmask is None

    def set_grammar(self, grammar: GrammarBitmask, row_req_ids: Sequence[str | None]) -> None:
        """Takes the step's grammar masks; row_req_ids[r] is the request whose next token row r samples (None for
        rows that do not: a draft's row, spec/verify.py)."""
        first_row: dict[str, int] = {}
        for row, req_id in enumerate(row_req_ids):
            if req_id is not None:
                first_row.setdefault(req_id, row)
        picked = [(i, first_row[r]) for i, r in enumerate(grammar.req_ids) if r in first_row]
        if not picked:
            return
        masks, rows = zip(*picked)
        bitmask = grammar.bitmask if len(masks) == len(grammar.req_ids) else grammar.bitmask[list(masks)]
        self.grammar_bitmask = bitmask  # on the CPU; the sampler moves it to the logits' device
        identity = list(rows) == list(range(self.num_rows))
        self.grammar_rows = None if identity else torch.tensor(rows, dtype=torch.long)

    @classmethod
    def from_requests(
        cls,
        requests: Sequence[SamplingRequest],
        vocab_size: int,
        device: torch.device,
        global_generator: torch.Generator | None = None,
    ) -> SamplingMetadata:
        device = torch.device(device)
        params = [r.sampling_params for r in requests]
        num_rows = len(requests)
        greedy = [p.is_greedy for p in params]
        all_greedy = all(greedy)
        all_random = not any(greedy)

        def row_tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        greedy_mask = None if (all_greedy or all_random) else row_tensor(greedy, torch.bool)
        # Sampling-only stages; greedy rows get neutral values.
        temps = [1.0 if g else p.temperature for g, p in zip(greedy, params)]
        top_ks = [vocab_size if (g or p.top_k <= 0) else min(p.top_k, vocab_size) for g, p in zip(greedy, params)]
        top_ps = [1.0 if g else p.top_p for g, p in zip(greedy, params)]
        min_ps = [0.0 if g else p.min_p for g, p in zip(greedy, params)]

        num_logprobs = [p.logprobs for p in params]
        asked = [n for n in num_logprobs if n is not None]

        generators: dict[int, torch.Generator] = {}
        for row, (req, p, g) in enumerate(zip(requests, params, greedy)):
            if p.seed is not None and not g:
                gen = torch.Generator(device=device)
                gen.manual_seed(seed_for_step(p.seed, req.num_output_tokens))
                generators[row] = gen

        return cls(
            num_rows=num_rows,
            vocab_size=vocab_size,
            all_greedy=all_greedy,
            all_random=all_random,
            greedy_mask=greedy_mask,
            temperature=row_tensor(temps, torch.float32) if any(t != 1.0 for t in temps) else None,
            top_k=row_tensor(top_ks, torch.long) if any(k < vocab_size for k in top_ks) else None,
            top_p=row_tensor(top_ps, torch.float32) if any(p < 1.0 for p in top_ps) else None,
            min_p=row_tensor(min_ps, torch.float32) if any(m > 0.0 for m in min_ps) else None,
            logit_bias=_logit_bias(params, vocab_size, device),
            min_tokens_mask=_min_tokens_mask(requests, vocab_size, device),
            repetition_penalty=_repetition_penalty(requests, vocab_size, device),
            additive_penalty=_additive_penalty(requests, vocab_size, device),
            generators=generators,
            global_generator=global_generator,
            num_logprobs=num_logprobs,
            max_num_logprobs=max(asked) if asked else None,
        )


def seed_for_step(seed: int, step: int) -> int:
    """A 63-bit generator seed for output token number `step` of a request seeded with `seed`."""
    return _splitmix64(_splitmix64(seed & _MASK64) + step) >> 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _triples(
    rows: list[int], tokens: list[int], values: list[float] | None, vocab_size: int, device: torch.device
) -> TokenUpdates | None:
    """Drop out-of-vocab tokens (they cannot be sampled) and move to the device."""
    keep = [j for j, t in enumerate(tokens) if 0 <= t < vocab_size]
    if not keep:
        return None
    if len(keep) < len(tokens):
        rows, tokens = [rows[j] for j in keep], [tokens[j] for j in keep]
        values = None if values is None else [values[j] for j in keep]
    return TokenUpdates(
        row_ids=torch.tensor(rows, dtype=torch.long, device=device),
        token_ids=torch.tensor(tokens, dtype=torch.long, device=device),
        values=None if values is None else torch.tensor(values, dtype=torch.float32, device=device),
    )


def _logit_bias(params: list, vocab_size: int, device: torch.device) -> TokenUpdates | None:
    rows: list[int] = []
    tokens: list[int] = []
    values: list[float] = []
    for row, p in enumerate(params):
        for tok, bias in (p.logit_bias or {}).items():
            rows.append(row)
            tokens.append(int(tok))
            values.append(float(bias))
    return _triples(rows, tokens, values, vocab_size, device)


def _min_tokens_mask(
    requests: Sequence[SamplingRequest], vocab_size: int, device: torch.device
) -> TokenUpdates | None:
    rows: list[int] = []
    tokens: list[int] = []
    for row, req in enumerate(requests):
        p = req.sampling_params
        if req.num_output_tokens >= p.min_tokens:
            continue
        banned = set(p.stop_token_ids or ())
        if not p.ignore_eos:
            banned.update(p.all_stop_token_ids)
            if req.eos_token_id is not None:
                banned.add(req.eos_token_id)
        rows.extend([row] * len(banned))
        tokens.extend(sorted(banned))
    return _triples(rows, tokens, None, vocab_size, device)


def _unique_pairs(
    token_lists: list[list[int]], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Unique (row, token) pairs over rows' token lists, with their counts; out-of-vocab tokens dropped."""
    lengths = [len(t) for t in token_lists]
    if sum(lengths) == 0:
        return None
    # array -> frombuffer is ~6x faster than torch.tensor on a long list of Python ints.
    flat = torch.frombuffer(array("q", chain.from_iterable(token_lists)), dtype=torch.long).to(device)
    row_ids = torch.repeat_interleave(torch.arange(len(token_lists), device=device), torch.tensor(lengths).to(device))
    valid = (flat >= 0) & (flat < vocab_size)
    # sort + unique_consecutive: torch.unique(return_counts=True) can be 40x slower on CPU.
    keys = (row_ids[valid] * vocab_size + flat[valid]).sort().values
    keys, counts = torch.unique_consecutive(keys, return_counts=True)
    if keys.numel() == 0:
        return None
    return keys // vocab_size, keys % vocab_size, counts


def _repetition_penalty(
    requests: Sequence[SamplingRequest], vocab_size: int, device: torch.device
) -> TokenUpdates | None:
    penalties = [r.sampling_params.repetition_penalty for r in requests]
    if all(p == 1.0 for p in penalties):
        return None
    token_lists = [r.all_token_ids if p != 1.0 else [] for r, p in zip(requests, penalties)]
    pairs = _unique_pairs(token_lists, vocab_size, device)
    if pairs is None:
        return None
    rows, tokens, _ = pairs
    row_penalty = torch.tensor(penalties, dtype=torch.float32, device=device)
    return TokenUpdates(rows, tokens, row_penalty[rows])


def _additive_penalty(
    requests: Sequence[SamplingRequest], vocab_size: int, device: torch.device
) -> TokenUpdates | None:
    """OpenAI presence/frequency penalties: subtract frequency * count + presence * (count > 0)."""
    freq = [r.sampling_params.frequency_penalty for r in requests]
    pres = [r.sampling_params.presence_penalty for r in requests]
    needed = [f != 0.0 or p != 0.0 for f, p in zip(freq, pres)]
    if not any(needed):
        return None
    token_lists = [r.output_token_ids if n else [] for r, n in zip(requests, needed)]
    pairs = _unique_pairs(token_lists, vocab_size, device)
    if pairs is None:
        return None
    rows, tokens, counts = pairs
    freq_t = torch.tensor(freq, dtype=torch.float32, device=device)
    pres_t = torch.tensor(pres, dtype=torch.float32, device=device)
    return TokenUpdates(rows, tokens, freq_t[rows] * counts.to(torch.float32) + pres_t[rows])
