"""Drafts from a second model: its greedy tokens, one forward per draft position for the whole batch.

The draft is a whole worker of its own (worker/worker.py: weights, quantization, execution plan, C forward) whose
K/V cache has the target's number of blocks, indexed by the target's block tables: the engine hands out blocks once,
for both, and reserves each step's speculative slots in the table before the draft writes them.

A self-draft (the target's own checkpoint in a cheaper form: SpeculativeConfig.is_self_draft) has no cache of its
own: it reads the K/V the target computed for every position before the step and writes its guesses' K/V into the
step's own slots, which the target's verification then overwrites with its own before it reads them (each layer
writes a step's K/V before its attention reads it), and slots past what the target accepts count for nothing. So a
self-draft has no prefill and no catch-up: each step's first forward is the one token the step starts from, and its
guesses are conditioned on the target's exact K/V (for prompt tokens too, and prefix-cache hits).

Any other draft keeps, per request, the tokens whose K/V it has written (`_DraftState`). Each step it first catches
up on what it has not computed (the whole prompt the first time, later the accepted drafts' successor tokens: usually
one or two), which also gives its first draft, then runs one single-token forward per further draft. Positions whose
tokens the target did not accept are recomputed: the draft's K/V counts only up to the first token that differs.
Blocks that a request shares through the prefix cache hold the draft's K/V only where it computed them itself, so a
new request (or one resumed after preemption) starts from position 0.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tokenmill.config import EngineConfig, SpeculativeOptions
from tokenmill.loader import LoadedModel
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec.config import SpeculativeConfig
from tokenmill.worker.request_states import RequestState, StepRequest
from tokenmill.worker.sampler import greedy_ids_of

if TYPE_CHECKING:
    from tokenmill.worker.worker import Worker

logger = logging.getLogger("tokenmill")

_GREEDY = SamplingParams(temperature=0.0, max_tokens=None)


_KV_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.int8: "int8",
                   torch.bfloat16: "bfloat16"}


def draft_engine_config(config: EngineConfig, spec: SpeculativeConfig, num_blocks: int | None = None,
                        kv_dtype: torch.dtype | None = None) -> EngineConfig:
    """The draft worker's configuration: the target's, with the draft's checkpoint and quantization, the target's
    context length and (once the target sized its cache) the target's number of blocks; no speculation of its own.
    `kv_dtype`: the target's K/V element type, for a draft that shares the target's cache."""
    quantized = spec.quantization != "none"
    model = dataclasses.replace(
        config.model, model=None if spec.model == "default" else spec.model, quantization=spec.quantization,
        dtype="auto" if quantized else config.model.dtype, batch_invariant=False)  # guesses never reach the output
    cache = dataclasses.replace(config.cache, num_blocks=num_blocks)
    if kv_dtype is not None:
        if kv_dtype not in _KV_DTYPE_NAMES:
            raise ValueError(f"a self-draft cannot share a {kv_dtype} K/V cache")
        cache = dataclasses.replace(cache, kv_cache_dtype=_KV_DTYPE_NAMES[kv_dtype])
    return dataclasses.replace(
        config, model=model, cache=cache, parallel=dataclasses.replace(config.parallel, compile=False),
        speculative=SpeculativeOptions())


def load_draft_model(config: EngineConfig, spec: SpeculativeConfig) -> LoadedModel:
    """The draft's checkpoint, loaded in the compute dtype its configuration resolves to."""
    from tokenmill.engine.llm_engine import load_engine_model

    return load_engine_model(draft_engine_config(config, spec))


@dataclass
class _DraftState:
    state: RequestState  # the tokens the draft has seen and guessed; block table shared with the target's state
    num_computed: int = 0  # leading positions whose K/V the draft holds (tokens state.all_token_ids[:num_computed])
    num_agreed: int = 0  # leading positions known to hold the target's tokens


class DraftModelProposer:
    def __init__(self, draft: Worker, vocab_size: int, max_requests: int, shares_target_kv: bool = False) -> None:
        if draft.runner.vocab_size != vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft.runner.vocab_size} tokens) is not the target's "
                             f"({vocab_size}); a draft must share the target's tokenizer")
        self.draft = draft
        self.runner = draft.runner
        self.states: dict[str, _DraftState] = {}
        self.max_requests = max_requests  # the governor's disable_by_batch_size: larger steps do not speculate
        # A self-draft reading the target's K/V: no state across steps (self.states stays empty).
        self.shares_target_kv = shares_target_kv

    @classmethod
    def for_target(cls, config: EngineConfig, target: Worker, loaded: LoadedModel) -> DraftModelProposer:
        """The draft worker for `target` from the draft's checkpoint `loaded` (built, its K/V cache the size of the
        target's in blocks)."""
        from tokenmill.worker.worker import Worker

        spec = config.speculative.spec
        assert spec is not None
        shared = spec.is_self_draft(config.model.model)
        draft = Worker(draft_engine_config(config, spec, target.num_blocks, target.runner.kv_spec.dtype if shared
                                           else None), loaded, kv_caches=target.runner.kv_caches if shared else None)
        logger.info("speculative decoding: draft model %s (%s), %d tokens per step%s", spec.model, spec.quantization,
                    spec.num_speculative_tokens, ", sharing the target's K/V cache" if shared else "")
        return cls(draft, target.runner.vocab_size, spec.disable_by_batch_size, shares_target_kv=shared)

    def drop(self, req_ids: Iterable[str]) -> None:
        for req_id in req_ids:
            self.states.pop(req_id, None)

    def follow(self, scheduled: Sequence[StepRequest]) -> None:
        """Computes, in the draft, the prompt tokens the target computes this step (as it prefills them), so that a
        request's first drafts need no catch-up over its whole prompt: the draft's prefill runs with the target's
        (as vLLM's draft models do), in the time to first token rather than between tokens. Only for steps of at
        most `max_requests` requests (larger batches do not speculate: the governor), and not for requests under a
        grammar (never drafted for). A self-draft needs none of it: the target's prefill writes the K/V it reads."""
        if self.shares_target_kv or len(scheduled) > self.max_requests:
            return
        work, ends = [], []
        for s in scheduled:
            end = s.start_pos + s.num_new_tokens
            prefilling = s.start_pos < s.state.num_prompt_tokens and not s.num_spec_tokens
            if not prefilling or s.state.sampling_params.structured_outputs is not None:
                continue
            d = self._caught_up(s)
            if end > d.num_computed:
                work.append(StepRequest(d.state, d.num_computed, end - d.num_computed))
                ends.append((d, end))
        if work:
            self.runner.forward(work)  # its K/V is what is wanted; the hidden states are dropped
            for d, end in ends:
                d.num_computed = end

    def propose(self, scheduled: Sequence[StepRequest]) -> None:
        work = [s for s in scheduled if s.num_spec_tokens and s.samples]
        if not work:
            return
        states = [self._from_target(s) if self.shares_target_kv else self._caught_up(s) for s in work]
        # First forward: each request's uncomputed tokens (at least its last), whose last row gives draft 1.
        steps = [StepRequest(d.state, d.num_computed, d.state.num_tokens - d.num_computed) for d in states]
        drafts: list[list[int]] = [[] for _ in work]
        active = list(range(len(work)))
        while active:
            for j, token in zip(active, self._greedy_tokens(steps), strict=True):
                d = states[j]
                d.num_computed = d.state.num_tokens
                d.state.all_token_ids.append(token)
                drafts[j].append(token)
            active = [j for j in active if len(drafts[j]) < work[j].num_spec_tokens]
            steps = [StepRequest(states[j].state, states[j].num_computed, 1) for j in active]
        for s, proposal in zip(work, drafts, strict=True):
            s.add_drafts(proposal)

    @torch.inference_mode()
    def _greedy_tokens(self, steps: list[StepRequest]) -> list[int]:
        """The draft's greedy next token after each step's rows: the runner's forward (its whole-step path when one
        takes the step) and the argmax of the vocabulary projection, without the sampler (drafts are greedy: no
        sampling parameters apply, and only the last row of each request needs logits)."""
        rows = [r - 1 for r in itertools.accumulate(s.num_new_tokens for s in steps)]
        hidden = self.runner.forward(steps, rows)
        hidden = hidden[torch.tensor(rows, dtype=torch.int64, device=hidden.device)]
        ids = self.runner.model.greedy_token_ids(hidden)
        if ids is None:
            ids = greedy_ids_of(self.runner.model.compute_logits(hidden).float())
        return ids.tolist()

    @staticmethod
    def _from_target(s: StepRequest) -> _DraftState:
        """A self-draft's view of `s` for this step: the target's tokens, and the target's K/V up to where the step
        starts (the step's one known token, then the draft slots)."""
        state = RequestState(s.req_id, s.state.prompt_token_ids, list(s.state.all_token_ids), _GREEDY, None,
                             s.state.block_ids)
        return _DraftState(state, num_computed=s.start_pos, num_agreed=s.start_pos)

    def _caught_up(self, s: StepRequest) -> _DraftState:
        """The draft's state of `s`, its tokens set to the target's and its computed count cut to the first position
        where what it computed differs from them."""
        target = s.state.all_token_ids
        d = self.states.get(s.req_id)
        if d is None:
            d = self.states[s.req_id] = _DraftState(RequestState(
                s.req_id, list(s.state.prompt_token_ids), list(target), _GREEDY, None, s.state.block_ids))
            return d
        seen = d.state.all_token_ids
        n = min(d.num_computed, len(target))
        for p in range(d.num_agreed, n):
            if seen[p] != target[p]:
                n = p
                break
        d.num_computed = d.num_agreed = n
        d.state.all_token_ids = list(target)
        return d
