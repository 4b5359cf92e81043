"""A step's requests (worker/request_states.py) -> flat tensors -> model -> logits -> sampler -> ModelRunnerOutput.

The only place where requests become tensors. Per step it builds input_ids, positions,
query_start_loc, seq_lens, block_tables and slot_mapping once, runs the model over the flat batch,
and computes logits only for rows that sample (plus prompt rows of requests asking prompt_logprobs).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.engine.step_timer import NULL_TIMER, AnyStepTimer
from tokenmill.kernels.cpu.kv_cache import kv_row_width
from tokenmill.outputs import PositionLogprobs
from tokenmill.spec.verify import accepted_tokens, sampling_rows
from tokenmill.structured.bitmask import GrammarBitmask, allowed, apply_token_bitmask
from tokenmill.worker.huge_pages import prefaulted_zeros
from tokenmill.worker.request_states import StepRequest
from tokenmill.worker.runner_output import ModelRunnerOutput
from tokenmill.worker.sampler import Sampler, SamplingMetadata, compute_logprobs, greedy_ids_of
from tokenmill.worker.step_paths import WholeStepPath

logger = logging.getLogger("tokenmill")


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, huge_pages: bool = False) -> torch.Tensor:
    """A zero-filled KV cache tensor. Slots are read before they are written only where attention
    masks them out, so they must hold finite values: zeros. On CPU every page is mapped at start-up (the OS
    zero-fills them: no step stalls on a page fault later), in 2 MiB pages where asked and cheap to map
    (worker/huge_pages.py). Zero bytes are a zero of every dtype, FP8 included."""
    nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
    if device.type != "cpu":
        return torch.zeros(nbytes, dtype=torch.uint8, device=device).view(dtype).view(shape)
    raw, _ = prefaulted_zeros(nbytes, huge_pages)
    return raw.view(dtype).view(shape)


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        row = kv_row_width(self.dtype, self.head_dim)  # int8 rows carry their scale
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * row * elem


@dataclass
class _PromptLogprobsRows:
    req_id: str
    start_pos: int
    rows: list[int]  # flat-batch rows whose logits predict the next prompt token
    targets: list[int]  # the prompt tokens those rows predict
    num_logprobs: int


class ModelRunner:
    def __init__(
        self, model: nn.Module, kv_spec: KVCacheSpec, num_blocks: int, vocab_size: int,
        device: torch.device, seed: int = 0, max_model_len: int = 0, cuda_graph_sizes: list[int] | None = None,
        step_timer: AnyStepTimer = NULL_TIMER, huge_pages: bool = False,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.model = model
        self.timer = step_timer
        self.kv_spec = kv_spec
        self.block_size = kv_spec.block_size
        self.vocab_size = vocab_size
        self.device = device
        self.sampler = Sampler()
        self.generator = torch.Generator(device=device).manual_seed(seed)
        attention_layers = model.attention_layers
        shape = attention_layers[0].backend.kv_cache_shape(
            num_blocks, kv_spec.block_size, kv_spec.num_kv_heads, kv_spec.head_dim, kv_spec.dtype)
        if kv_caches is not None:  # another runner's cache (a self-draft writes and reads its target's K/V)
            if len(kv_caches) != kv_spec.num_layers or any(
                    k.shape != shape or k.dtype != kv_spec.dtype for k, _ in kv_caches):
                raise ValueError("a shared K/V cache must have this model's layers, shape and dtype")
            self.kv_caches = list(kv_caches)
        else:
            self.kv_caches = [
                (_zeros(shape, kv_spec.dtype, device, huge_pages), _zeros(shape, kv_spec.dtype, device, huge_pages))
                for _ in range(kv_spec.num_layers)
            ]
        for layer, cache in zip(attention_layers, self.kv_caches, strict=True):
            layer.kv_cache = cache
        # Whole-step fast paths (worker/step_paths.py), asked in order; a step none takes runs layer by layer.
        self.step_paths: list[WholeStepPath] = []
        if cuda_graph_sizes:  # only on cuda with the triton backend (see worker/device.py)
            from tokenmill.worker.cuda_graphs import DecodeCudaGraphs

            graphs = DecodeCudaGraphs(model, cuda_graph_sizes, kv_spec.block_size, max_model_len, device)
            seconds = graphs.capture()
            logger.info("captured %d CUDA graphs for decode batch sizes %s in %.2f s",
                        len(cuda_graph_sizes), cuda_graph_sizes, seconds)
            self.step_paths.append(graphs)

    def build_inputs(self, scheduled: Sequence[StepRequest]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The step as one flat batch: input ids [T], positions [T] and the attention metadata.

        Computed on Python lists, then one torch.tensor per field: a step starts right after the previous one's
        kernels streamed the weights through the caches, so every torch op here runs cold (measured on the AMX
        Xeon: ~30-40 us each, against ~3 warm), and a few list passes over the step's requests cost less than the
        dozen index and arithmetic ops the same fields take as tensors."""
        bs = self.block_size
        query_lens = [s.num_new_tokens for s in scheduled]
        seq_lens = [s.start_pos + s.num_new_tokens for s in scheduled]
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        padded: list[int] = []  # the block tables row by row, zero past each one's end: one tensor built at once
        max_blocks = max(len(s.block_ids) for s in scheduled)
        for s in scheduled:
            token_ids.extend(s.token_ids)
            blocks = s.block_ids
            start, end = s.start_pos, s.start_pos + s.num_new_tokens
            if end - start == 1:
                positions.append(start)
                slots.append(blocks[start // bs] * bs + start % bs)
            else:
                span = range(start, end)
                positions.extend(span)
                slots.extend([blocks[p // bs] * bs + p % bs for p in span])
            padded.extend(blocks)
            padded.extend([0] * (max_blocks - len(blocks)))
        dev = self.device
        meta = AttentionMetadata(
            num_tokens=len(token_ids), block_size=bs,
            query_start_loc=torch.tensor(list(itertools.accumulate(query_lens, initial=0)), dtype=torch.int64,
                                         device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.int64, device=dev).view(len(scheduled), max_blocks),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_lens_list=query_lens, seq_lens_list=seq_lens,
        )
        return (torch.tensor(token_ids, dtype=torch.int64, device=dev),
                torch.tensor(positions, dtype=torch.int64, device=dev), meta)

    @staticmethod
    def _prompt_logprobs_rows(scheduled: list[StepRequest], row_starts: list[int]) -> list[_PromptLogprobsRows]:
        plans = []
        for s, row0 in zip(scheduled, row_starts):
            k = s.state.sampling_params.prompt_logprobs
            num_prompt = s.state.num_prompt_tokens
            if k is None or s.start_pos >= num_prompt:
                continue
            # Row for position p predicts prompt token p + 1; the last prompt position predicts output.
            last = min(s.start_pos + s.num_new_tokens, num_prompt - 1)
            positions = range(s.start_pos, last)
            plans.append(_PromptLogprobsRows(
                s.req_id, s.start_pos, [row0 + p - s.start_pos for p in positions],
                [s.state.all_token_ids[p + 1] for p in positions], k,
            ))
        return plans

    @torch.inference_mode()
    def forward(self, scheduled: Sequence[StepRequest], rows: Sequence[int] | None = None) -> torch.Tensor:
        """The step's final hidden states [T, hidden] (its K/V written): through the first whole-step path that takes
        it, else layer by layer. rows: None, or the rows (ascending) the caller reads; a whole-step path may leave the
        others undefined."""
        path = next((p for p in self.step_paths if p.can_run(scheduled)), None)
        if path is not None:
            return path.run(scheduled, self.timer, rows)
        with self.timer.section("prepare_inputs"):
            input_ids, positions, meta = self.build_inputs(scheduled)
        with self.timer.section("forward"):
            return self.model(input_ids, positions, meta)

    @torch.inference_mode()
    def execute(self, scheduled: list[StepRequest], grammar: GrammarBitmask | None = None) -> ModelRunnerOutput:
        """`grammar`: structured output's next-token masks for the requests that sample under a grammar."""
        if not scheduled:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        timer = self.timer
        row_starts = list(itertools.accumulate((s.num_new_tokens for s in scheduled), initial=0))
        sampling = [i for i, s in enumerate(scheduled) if s.samples]
        prompt_plans = self._prompt_logprobs_rows(scheduled, row_starts)
        # Each sampling request's last row, or with drafts its last 1 + len(drafts) rows (spec/verify.py).
        sample_rows = [r for i in sampling
                       for r in range(row_starts[i + 1] - scheduled[i].num_sampled_rows, row_starts[i + 1])]
        prompt_rows = [r for plan in prompt_plans for r in plan.rows]
        hidden = self.forward(scheduled, sorted(set(sample_rows + prompt_rows)))  # only the rows read below
        with timer.section("sample"):
            return self._sample(scheduled, hidden, sampling, sample_rows, prompt_plans, prompt_rows, grammar)

    def _sample(self, scheduled: list[StepRequest], hidden: torch.Tensor, sampling: list[int],
                sample_rows: list[int], prompt_plans: list[_PromptLogprobsRows], prompt_rows: list[int],
                grammar: GrammarBitmask | None = None) -> ModelRunnerOutput:
        """Logits for the rows that sample (request indices `sampling`, their rows `sample_rows`) and the
        prompt-logprob rows -> sampled tokens and logprobs."""
        read = sample_rows + prompt_rows
        # The rows read, in order; all of hidden's as they lie where every row is read (a decode step): each torch
        # op here runs cold after the forward (see build_inputs), so no index copy then.
        picked = hidden if read == list(range(hidden.shape[0])) else hidden[torch.tensor(read, dtype=torch.int64,
                                                                                         device=hidden.device)]
        sampled: list[list[int]] = [[] for _ in scheduled]
        logprobs: list[list[PositionLogprobs] | None] = [None] * len(scheduled)
        num_drafts = [len(s.draft_token_ids) for s in scheduled]
        num_draft_tokens = num_drafts if any(num_drafts) else None
        metadata = None
        if sampling:
            requests = [row for i in sampling for row in sampling_rows(scheduled[i].state, scheduled[i].draft_token_ids)]
            metadata = SamplingMetadata.from_requests(requests, self.vocab_size, self.device, self.generator)
            if grammar is not None:  # structured output: each request's first sampled row (drafts' rows: None)
                metadata.set_grammar(grammar, [req_id for i in sampling for req_id in
                                               [scheduled[i].req_id] + [None] * len(scheduled[i].draft_token_ids)])
            # Greedy: the ids straight from the vocabulary projection (under grammar masks: see _masked_greedy, which
            # computes logits of some rows alone: not across tensor-parallel ranks).
            masked = metadata.grammar_bitmask is not None
            if (metadata.argmax_under_masks_only and not (masked and self.model.tp.is_parallel)
                    and not prompt_plans):
                ids = self.model.greedy_token_ids(picked)
                if ids is not None:
                    if masked:
                        ids = self._masked_greedy(picked, ids, metadata)
                    _verify(scheduled, sampling, ids.tolist(), None, sampled, logprobs)
                    return ModelRunnerOutput(req_ids=[s.req_id for s in scheduled], sampled_token_ids=sampled,
                                             logprobs=logprobs, prompt_logprobs={}, num_draft_tokens=num_draft_tokens)
        logits = self.model.compute_logits(picked)
        if logits is None:  # a tensor-parallel rank other than 0: rank 0 samples for all
            return ModelRunnerOutput(req_ids=[s.req_id for s in scheduled], sampled_token_ids=sampled)
        logits = logits.float()
        if metadata is not None:
            result = self.sampler(logits[: len(sample_rows)], metadata)
            _verify(scheduled, sampling, result.sampled_token_ids, result.logprobs, sampled, logprobs)

        prompt_logprobs: dict[str, list[PositionLogprobs | None]] = {}
        offset = len(sample_rows)
        for plan in prompt_plans:
            rows = logits[offset : offset + len(plan.rows)]
            offset += len(plan.rows)
            entries: list[PositionLogprobs | None] = [None] if plan.start_pos == 0 else []
            if plan.rows:
                entries.extend(compute_logprobs(rows, plan.targets, plan.num_logprobs))
            prompt_logprobs[plan.req_id] = entries
        return ModelRunnerOutput(
            req_ids=[s.req_id for s in scheduled], sampled_token_ids=sampled,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, num_draft_tokens=num_draft_tokens,
        )


    def _masked_greedy(self, picked: torch.Tensor, ids: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """Greedy ids under grammar masks from the raw argmax `ids` of the sampled rows (their hidden states `picked`):
        a row whose raw argmax its mask allows keeps it (the masked argmax is the same token); only the others get
        their logits computed, masked and argmaxed. A constrained step then skips most of the vocabulary projection's
        logits, as unconstrained ones do."""
        bitmask = metadata.grammar_bitmask
        assert bitmask is not None
        masked_rows = metadata.grammar_rows if metadata.grammar_rows is not None else torch.arange(bitmask.shape[0])
        ok = allowed(bitmask, ids[masked_rows.to(ids.device)])
        if bool(ok.all()):
            return ids
        redo = masked_rows[~ok.cpu()]
        logits = self.model.compute_logits(picked[redo.to(picked.device)]).float()
        apply_token_bitmask(logits, bitmask[~ok.cpu()])
        ids = ids.clone()
        ids[redo.to(ids.device)] = greedy_ids_of(logits).to(ids.device)
        return ids

def _verify(scheduled: list[StepRequest], sampling: list[int], token_ids: list[int],
            row_logprobs: list[PositionLogprobs | None] | None, sampled: list[list[int]],
            logprobs: list[list[PositionLogprobs] | None]) -> None:
    """Per sampling request (indices `sampling`, their rows consecutive in token_ids / row_logprobs): the tokens it
    emits into sampled[i] (one, or with drafts the verified run, spec/verify.py) and their logprobs into logprobs[i].
    No token ids: a tensor-parallel rank other than 0, which samples nothing."""
    row = 0
    if not token_ids:
        return
    for i in sampling:
        s = scheduled[i]
        num_rows = 1 + len(s.draft_token_ids)
        tokens = token_ids[row : row + num_rows]
        sampled[i] = accepted_tokens(s.draft_token_ids, tokens) if s.draft_token_ids else tokens
        if row_logprobs is not None and row_logprobs[row] is not None:
            logprobs[i] = row_logprobs[row : row + len(sampled[i])]
        row += num_rows
