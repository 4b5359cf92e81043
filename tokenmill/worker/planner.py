"""Builds (or reads from the cache) the execution plan of a Llama-family model and applies it.

Two halves, as the engine starts (worker/plan.py lists the operations and candidates):
  plan_model   after loading and quantization: times the projection and lm_head candidates and installs
               the chosen kernels (a PlannedLinear where row-count buckets disagree);
  plan_attention  times the attention of whole-context prompts (C over the paged cache, torch's fused
               attention) and routes the attention backend by prompt length;
  plan_steps   once the KV cache is bound: times whole steps through the one-call C forward (worker/c_step.py)
               against layer by layer and sets the step sizes it takes (or leaves it out).
A cached plan is applied without timing anything.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.attention.torch_backend import (
    BF16_KERNEL,
    C_PREFILL_KERNEL,
    SDPA_KERNEL,
    TorchAttentionBackend,
    bf16_attention_allowed,
    whole_context_attention,
)
from tokenmill.config import EngineConfig
from tokenmill.distributed.communicator import SINGLE, Communicator
from tokenmill.kernels.cpu.bf16_gemm import bf16_panels_available
from tokenmill.kernels.cpu.bf16_prompt_attention import bf16_prompt_attention, bf16_prompt_attention_available
from tokenmill.kernels.cpu.build import kernel_sources_digest
from tokenmill.kernels.cpu.f32_gemm import f32_panels_available
from tokenmill.kernels.cpu.prefill_attention import paged_prefill_attention
from tokenmill.layers.linear import Linear
from tokenmill.layers.panel_linear import Bf16PanelLinear, PanelLinear, use_panel_head
from tokenmill.layers.planned_linear import PlannedLinear
from tokenmill.layers.screened_head import SCREEN_KERNEL, ScreenedGreedyHead, head_greedy_ids
from tokenmill.loader.cache import resolve_cache_dir
from tokenmill.models.interface import PROJECTIONS, CausalLM, Projection
from tokenmill.quant.int4_cpu import Int4GroupLinear, bf16_units_gemm_available
from tokenmill.worker import cpu_load
from tokenmill.worker.c_step import CStepForward
from tokenmill.worker.capabilities import detect_capabilities
from tokenmill.worker.plan import (
    DECODE_STEP_BUCKETS,
    GREEDY_BUCKETS,
    INT4_ROW_BUCKETS,
    LOGIT_BUCKETS,
    PROMPT_ATTENTION_BUCKETS,
    PROMPT_LEN,
    PROMPT_STEP_BUCKETS,
    PROMPT_STEP_TIMING_LAYERS,
    ROW_BUCKETS,
    STEP_CONTEXT,
    Choice,
    ExecutionPlan,
    choose,
    filter_family,
    load_plan,
    module_signature,
    plan_key,
    routes_from_choices,
    save_plan,
)

logger = logging.getLogger("tokenmill")

C_FORWARD = "c_forward"  # the plan's name of the one-call C forward of a step

_TORCH_NAMES = {torch.float32: "torch_fp32", torch.bfloat16: "torch_bf16", torch.float16: "torch_fp16"}


class TorchLogitsHead(nn.Module):
    """logits = h W^T through torch, as (W h^T)^T (transposed; MKL float32 ran it ~1.7x faster than h W^T at
    decode batch sizes on the AVX2 machine) or as h W^T (F.linear): two candidates of the plan."""

    def __init__(self, weight: torch.Tensor, transposed: bool = True) -> None:
        super().__init__()
        self.weight = weight
        self.transposed = transposed
        self.out_features, self.in_features = weight.shape

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return torch.mm(self.weight, hidden.t()).t().contiguous()
        return torch.nn.functional.linear(hidden, self.weight)


def _panel_candidates(weight: torch.Tensor, bias: torch.Tensor | None, panels_ok: bool,
                      head: bool = False) -> dict[str, Callable[[], nn.Module]]:
    """Builders of the C panel kernel this weight's dtype has (none elsewhere): the preferred candidates. head:
    the vocabulary projection, whose bf16 product writes float32 logits directly (no bf16 rounding, no copy)."""
    if not panels_ok or weight.device.type != "cpu":
        return {}
    if weight.dtype == torch.float32:
        return {"c_f32_panels": lambda: PanelLinear(weight, bias)}
    if weight.dtype == torch.bfloat16 and bf16_panels_available():
        out_dtype = torch.float32 if head else torch.bfloat16
        return {"c_bf16_panels": lambda: Bf16PanelLinear(weight, bias, out_dtype)}
    return {}


def _projection_candidates(module: nn.Module, panels_ok: bool, model_dtype: torch.dtype
                           ) -> dict[str, Callable[[], nn.Module]]:
    """Builders of every correct implementation of this projection (the module itself among them), in order of
    preference (plan.TIE_MARGIN)."""
    if isinstance(module, Int4GroupLinear):
        # The bf16 route (bf16 inputs, quant/int4_cpu.py) where the CPU multiplies bf16 or the model is bf16 (its
        # activations are already): beside 4-bit weights, bf16's rounding of the inputs is small, as int8 models'
        # 8-bit inputs are allowed; elsewhere it would only lose the timing.
        if model_dtype != torch.bfloat16 and not bf16_units_gemm_available():
            return {"c_int4": lambda: module}
        return {"c_int4": lambda: module, "c_int4_bf16": lambda: module.with_prefill_dtype(torch.bfloat16)}
    if type(module) is not Linear:  # int8 / fp8 modules: their own kernel is the candidate
        return {_quantized_name(module): lambda: module}
    candidates = _panel_candidates(module.weight, module.bias, panels_ok)
    candidates[_TORCH_NAMES[module.weight.dtype]] = lambda: module
    return candidates


# The kernels whose output row depends on its input row alone, bit for bit, whatever the rows beside it and their
# number (tests/kernels/test_batch_invariance.py): each output is one fixed-order reduction over the input row.
# torch's float32 GEMM (MKL) is not: it picks other kernels and blockings by row count. c_int4 is, once its
# dequantized-GEMM route for many rows is off (Int4GroupLinear.fused_max_rows).
BATCH_INVARIANT_KERNELS = ("c_f32_panels", "c_int8_panels", "c_int4")


def invariant_candidates(operation: str, builders: dict[str, Any]) -> dict[str, Any]:
    """The batch-invariant ones of `builders` (deterministic mode); ValueError when none is."""
    kept = {k: b for k, b in builders.items() if k in BATCH_INVARIANT_KERNELS}
    if not kept:
        raise ValueError(f"batch_invariant: no batch-invariant kernel for {operation} here (candidates: "
                         f"{', '.join(builders)}; batch-invariant: {', '.join(BATCH_INVARIANT_KERNELS)})")
    return kept


def _quantized_name(module: nn.Module) -> str:
    name = type(module).__name__
    return {"Int8DynamicLinear": "c_int8_panels", "Int4GroupLinear": "c_int4"}.get(name, name)


def _head_candidates(model: nn.Module, panels_ok: bool) -> dict[str, Callable[[], nn.Module]]:
    if model.logits_head is not None:  # a quantized head (quant/int8_cpu.py)
        head = model.logits_head
        return {_quantized_name(head): lambda: head}
    weight = model.vocab_projection.weight
    candidates = _panel_candidates(weight, model.vocab_projection.bias, panels_ok, head=True)  # in order of preference
    torch_name = _TORCH_NAMES[weight.dtype]
    candidates[torch_name] = lambda: TorchLogitsHead(weight)
    candidates[torch_name + "_linear"] = lambda: TorchLogitsHead(weight, transposed=False)
    return candidates


def _time_product(operation: str, buckets: tuple[int, ...], modules: dict[str, nn.Module],
                  dtype: torch.dtype) -> list[Choice]:
    in_features = next(iter(modules.values())).in_features
    choices = []
    for rows in buckets:
        x = torch.randn(rows, in_features).to(dtype)
        choices.append(choose(operation, rows, {name: (lambda m=m, x=x: m(x)) for name, m in modules.items()}))
    return choices


def _layer_projections(model: CausalLM) -> list[Projection]:
    """Every decoder projection slot."""
    return [p for part in model.decoder_layers() for p in part.projections]


def _install(modules: dict[str, nn.Module], routes: list[tuple[int, str]]) -> nn.Module:
    if len(routes) == 1:
        return modules[routes[0][1]]
    return PlannedLinear([(m, modules[k]) for m, k in routes], [k for _, k in routes])


def new_or_cached_plan(config: EngineConfig, model: nn.Module, kv_dtype: torch.dtype,
                       tp: Communicator = SINGLE) -> ExecutionPlan:
    """The cached plan of this machine (its key carries torch's thread count), model and configuration (a
    tensor-parallel rank's: its share), or an empty one to build."""
    caps = detect_capabilities()
    m = config.model
    settings = {"dtype": str(next(model.parameters()).dtype), "quantization": m.quantization,
                "activation_bits": m.int8_activation_bits, "quantize_lm_head": m.quantize_lm_head,
                "kernels": m.kernels, "panel_gemm": m.panel_gemm, "fused_decode": m.fused_decode,
                "huge_pages": m.huge_pages, "kv_dtype": str(kv_dtype), "block_size": config.cache.block_size,
                "c_kernels": kernel_sources_digest(), "tensor_parallel": [tp.rank, tp.world_size],
                "batch_invariant": m.batch_invariant}
    key = plan_key(caps, module_signature(model), settings)
    cached = load_plan(resolve_cache_dir(None), key)
    if cached is not None:
        logger.info("execution plan: read from the cache (%d choices)", len(cached.choices))
        return cached
    logger.info("execution plan: timing the candidate kernels on this machine (once; cached after)")
    return ExecutionPlan(key=key, machine=caps.summary(), timing_start=cpu_load.sample())


def finish_plan(plan: ExecutionPlan) -> None:
    """Caches a newly built plan, unless other work shared the cores while it was timed (its choices stand for this
    run; the next start times them again), and logs the plan once."""
    if not plan.cached:
        others = cpu_load.disturbed(plan.timing_start, cpu_load.sample(), torch.get_num_threads())
        left = [f"{c.operation} at {c.rows}" for c in plan.choices if c.disturbed]
        if others is None and not left:
            save_plan(resolve_cache_dir(None), plan)
        else:
            why = f"other work kept {others:.1f} cores busy" if others is not None else "other work shared the cores"
            logger.warning("execution plan: %s while the kernels were timed (%s); the plan is used but not cached "
                           "(the next start times it again)", why, ", ".join(left) or "throughout")
    logger.info("%s", plan.table())


@torch.no_grad()
def plan_model(model: nn.Module, plan: ExecutionPlan, family: str, keep_panels: bool, panels: bool = True,
               batch_invariant: bool = False) -> None:
    """Times (unless `plan` came from the cache) and installs the projection and lm_head kernels.
    keep_panels: also keep float32 panels where torch won (the C forward reads them); panels: False leaves
    the C panel GEMM out of the candidates (`--panel-gemm false`); batch_invariant: only BATCH_INVARIANT_KERNELS
    (deterministic mode)."""
    panels_ok = panels and f32_panels_available() and family != "torch"
    start = time.perf_counter()
    projections = _layer_projections(model)
    dtype = next(model.parameters()).dtype  # the model's compute dtype (quantized layers keep buffers, not parameters)
    for name in PROJECTIONS:
        group = [p for p in projections if p.name == name]
        if not group:
            continue
        if not plan.cached:
            builders = filter_family(_projection_candidates(group[0].module, panels_ok, dtype), family)
            if batch_invariant:
                builders = invariant_candidates(name, builders)
            logger.info("plan: timing %s (%s)", name, ", ".join(builders))
            modules = {k: b() for k, b in builders.items()}
            buckets = INT4_ROW_BUCKETS if isinstance(group[0].module, Int4GroupLinear) else ROW_BUCKETS
            plan.choices.extend(_time_product(name, buckets, modules, _input_dtype(group[0].module, dtype)))
        routes = routes_from_choices(plan.for_operation(name))
        chosen = {k for _, k in routes}
        for slot in group:
            builders = _projection_candidates(slot.module, panels_ok, dtype)
            if not chosen <= set(builders):
                raise ValueError(f"the execution plan chose {sorted(chosen - set(builders))} for {name}, which "
                                 "cannot be built here")
            built = {k: builders[k]() for k in chosen}
            installed = _install(built, routes)
            panels_kernel = next((k for k in ("c_f32_panels", "c_bf16_panels") if k in builders), None)
            if keep_panels and panels_kernel is not None and panels_kernel not in chosen:
                # torch won every bucket, but the C forward reads the panels: they ride along in a route for
                # zero rows, which forward never takes.
                installed = PlannedLinear([(0, builders[panels_kernel]()), *[(m, built[k]) for m, k in routes]],
                                          [panels_kernel, *[k for _, k in routes]])
            slot.replace(installed)
    _plan_head(model, plan, family, panels_ok, dtype, batch_invariant)
    plan.build_seconds += 0.0 if plan.cached else time.perf_counter() - start


def _input_dtype(module: nn.Module, model_dtype: torch.dtype) -> torch.dtype:
    return module.weight.dtype if type(module) is Linear else model_dtype


def _plan_head(model: nn.Module, plan: ExecutionPlan, family: str, panels_ok: bool, dtype: torch.dtype,
               batch_invariant: bool) -> None:
    builders = _head_candidates(model, panels_ok)
    if not plan.cached:
        timed = filter_family(builders, family)
        if batch_invariant:
            timed = invariant_candidates("lm_head", timed)
        logger.info("plan: timing lm_head (%s)", ", ".join(timed))
        modules = {k: b() for k, b in timed.items()}
        plan.choices.extend(_time_product("lm_head", LOGIT_BUCKETS, modules, dtype))
    routes = routes_from_choices(plan.for_operation("lm_head"))
    if model.logits_head is not None:  # quantized: its own kernel, nothing to install
        return
    weight = model.vocab_projection.weight
    built = {k: builders[k]() for _, k in routes}
    head = _install(built, routes)
    if not batch_invariant:
        _plan_greedy_head(model, plan, family, head, weight)
    if isinstance(head, TorchLogitsHead) and head.transposed:
        return  # compute_logits' own torch path
    if isinstance(head, PanelLinear):
        use_panel_head(model, head)
    else:
        model.logits_head = head


class _HeadArgmax(nn.Module):
    """The plan's candidate against the screen: the head's own greedy ids (screened_head.head_greedy_ids)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def greedy_ids(self, x: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        return head_greedy_ids(self.head, x, values)


def _plan_greedy_head(model: nn.Module, plan: ExecutionPlan, family: str, head: nn.Module,
                      weight: torch.Tensor) -> None:
    """Times (unless cached) greedy ids of GREEDY_BUCKETS rows through the head's own kernel against the int8 screen
    of its panels (layers/screened_head.py: the same ids), for the leading buckets whose rows (from 1 up) the head
    routes to one panel module, and gives the model the screen for the rows where it won (model.greedy_screen). (A
    vocabulary projection that is a panel product at 1 row and oneDNN's at 4, as bf16 on the AMX Xeon, still gets the
    screen at batch 1, where it halves the bytes read.)"""
    exact, buckets = head, GREEDY_BUCKETS
    if isinstance(head, PlannedLinear):
        exact = head.route(1)
        # A leading run of the buckets: if every n <= r routes to exact, so does every n <= a smaller bucket.
        buckets = tuple(r for r in GREEDY_BUCKETS if all(head.route(n) is exact for n in range(1, r + 1)))
    if not buckets or not ScreenedGreedyHead.takes(exact) or family == "torch":
        return
    screen = None
    if not plan.cached:
        screen = ScreenedGreedyHead(exact, weight)
        candidates = {"c_head_argmax": _HeadArgmax(exact), SCREEN_KERNEL: screen}
        logger.info("plan: timing greedy_head (%s)", ", ".join(candidates))
        gen = torch.Generator().manual_seed(0)
        for rows in buckets:
            # Rows like a decoder's last hidden states: each near one token's embedding, so that (as in decoding)
            # a few channels stand out; the screen's cost is its pass over the int8 weight either way.
            ids = torch.randint(0, weight.shape[0], (rows,), generator=gen)
            x = (weight[ids].float() * 8 + torch.randn(rows, weight.shape[1], generator=gen)).to(weight.dtype)
            plan.choices.append(choose("greedy_head", rows, {k: (lambda m=m, x=x: m.greedy_ids(x))
                                                            for k, m in candidates.items()}))
    limit = 0  # the screen takes the rows of the buckets it won up to the first it lost
    for choice in plan.for_operation("greedy_head"):
        if choice.kernel != SCREEN_KERNEL:
            break
        limit = choice.rows
    if limit:
        model.greedy_screen = (limit, screen if screen is not None else ScreenedGreedyHead(exact, weight))


def pin_batch_invariant(model: nn.Module) -> None:
    """Deterministic mode, past the plan's kernel choice (BATCH_INVARIANT_KERNELS): int4 projections keep their C
    kernel at every row count, and every attention layer attends row by row (attention/torch_backend.py)."""
    for module in model.modules():
        if isinstance(module, Int4GroupLinear):
            module.fused_max_rows = sys.maxsize
    for layer in model.attention_layers:
        pin = getattr(layer.backend, "pin_per_row_attention", None)
        if pin is None:
            raise ValueError(f"batch_invariant: the {layer.backend.name} attention backend has no per-row mode")
        pin()


@torch.no_grad()
def plan_attention(model: nn.Module, plan: ExecutionPlan, family: str, kv_dtype: torch.dtype, block_size: int,
                   quantized: bool = False) -> None:
    """Times (unless cached) the attention of one whole-context prompt per PROMPT_ATTENTION_BUCKETS length through
    the C prefill kernel, torch's fused attention and, where bf16 attention is allowed (a bf16 model, or quantized:
    int8/int4 projections) and runs here, our bf16 kernel, and routes the backend by prompt length. Backends without
    the C prefill kernel (the GPU, `--kernels torch`, no compiler) have nothing to choose."""
    layer = model.attention_layers[0]
    backend = layer.backend
    if not (isinstance(backend, TorchAttentionBackend) and backend.use_c_prefill):
        return
    dtype = next(model.parameters()).dtype
    if not plan.cached:
        start = time.perf_counter()
        heads, kv_heads, head_dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
        for rows in PROMPT_ATTENTION_BUCKETS:
            rows = min(rows, model.rotary.cos.shape[0])
            num_blocks = -(-rows // block_size)
            shape = backend.kv_cache_shape(num_blocks, block_size, kv_heads, head_dim, kv_dtype)
            cache = (torch.randn(shape).to(kv_dtype), torch.randn(shape).to(kv_dtype))
            query, key, value = (torch.randn(rows, n, head_dim) for n in (heads, kv_heads, kv_heads))
            out = torch.empty_like(query)
            start_row, length = torch.zeros(1, dtype=torch.int64), torch.full((1,), rows, dtype=torch.int64)
            table = torch.arange(num_blocks, dtype=torch.int64).unsqueeze(0)
            fns = {
                C_PREFILL_KERNEL: lambda o=out, q=query, c=cache, s=start_row, n=length, t=table: paged_prefill_attention(
                    o, q, c, s, n, n, t, layer.scale),
                SDPA_KERNEL: lambda o=out, q=query, k=key, v=value: o.copy_(
                    whole_context_attention(q, k, v, layer.scale, dtype)),
            }
            if bf16_attention_allowed(dtype, quantized) and bf16_prompt_attention_available(head_dim):
                fns[BF16_KERNEL] = lambda o=out, q=query, k=key, v=value, n=rows: bf16_prompt_attention(
                    o, q, k, v, [0], [n], layer.scale)
            logger.info("plan: timing prompt_attention of %d rows", rows)
            plan.choices.append(choose("prompt_attention", rows, filter_family(fns, family)))
        plan.build_seconds += time.perf_counter() - start
    backend.route_prompt_attention(routes_from_choices(plan.for_operation("prompt_attention")), dtype, quantized)


def _synthetic_step(num_reqs: int, q_len: int, context: int, block_size: int, vocab: int
                    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A step of num_reqs requests, each with q_len new tokens ending a context of `context` tokens, all
    reading the same blocks 1.. (block 0 may be the null block). For timing only: the requests' K/V writes
    share slots, so with several requests what attention reads depends on which write lands last."""
    blocks = torch.arange(1, -(-context // block_size) + 1, dtype=torch.int64)
    tables = blocks.repeat(num_reqs, 1)
    positions = torch.arange(context - q_len, context, dtype=torch.int64).repeat(num_reqs)
    slots = (blocks[positions // block_size] * block_size + positions % block_size)
    meta = AttentionMetadata(
        num_tokens=num_reqs * q_len, block_size=block_size,
        query_start_loc=torch.arange(num_reqs + 1, dtype=torch.int64) * q_len,
        seq_lens=torch.full((num_reqs,), context, dtype=torch.int64), block_tables=tables, slot_mapping=slots,
        query_lens_list=[q_len] * num_reqs, seq_lens_list=[context] * num_reqs)
    ids = torch.randint(0, vocab, (num_reqs * q_len,), dtype=torch.int64)
    return ids, positions, meta


def _step_buckets(num_blocks: int, block_size: int, max_len: int) -> list[tuple[str, int, int, int, int]]:
    """(operation, bucket, requests, new tokens each, context) of the timed steps, their contexts cut to the
    model's length and the cache's blocks (every request reads the same blocks)."""
    context = min(STEP_CONTEXT + 1, max_len, (num_blocks - 1) * block_size)
    prompt_len = min(PROMPT_LEN, context)
    if context < 2:
        return []
    return [("decode_step", r, r, 1, context) for r in DECODE_STEP_BUCKETS] + [
        ("prompt_step", tokens, max(1, tokens // prompt_len), min(tokens, prompt_len), min(tokens, prompt_len))
        for tokens in PROMPT_STEP_BUCKETS]


@torch.no_grad()
def plan_steps(model: nn.Module, c_step: CStepForward, plan: ExecutionPlan, family: str, num_blocks: int,
               block_size: int) -> bool:
    """Times steps through the C forward and layer by layer (unless cached), then sets the step sizes c_step
    takes to those where it won; False when it won none (the runner then leaves it out)."""
    if not plan.cached:
        start = time.perf_counter()
        depth = len(model.decoder_layers())
        for operation, bucket, reqs, q_len, context in _step_buckets(num_blocks, block_size, model.rotary.cos.shape[0]):
            if any(c.kernel != C_FORWARD for c in plan.for_operation(operation)):
                # The C forward keeps only the sizes below its first loss (_won_up_to), so a larger step's timing
                # could not change the plan; the largest prompt steps cost most of a plan's build time.
                logger.info("plan: %s of %d not timed (the C forward lost a smaller one)", operation, bucket)
                continue
            ids, positions, meta = _synthetic_step(reqs, q_len, context, block_size, model.config.vocab_size)
            if not c_step.takes(meta.num_reqs, meta.num_tokens):
                continue
            logger.info("plan: timing %s of %d %s", operation, bucket, "requests" if q_len == 1 else "tokens")
            # As the runner runs it: the C forward's last layer takes only the rows that sample (each request's
            # last row; every row at a decode step), the layer-by-layer forward every row.
            keep = None if q_len == 1 else torch.arange(q_len - 1, reqs * q_len, q_len)
            fns = filter_family({C_FORWARD: lambda ids=ids, p=positions, m=meta, k=keep: c_step.forward(ids, p, m, k),
                                 "layers": lambda ids=ids, p=positions, m=meta: model(ids, p, m)}, family)
            # Prompt steps run on the first PROMPT_STEP_TIMING_LAYERS layers, their times scaled to the whole depth:
            # both candidates' time is the layers' (the embedding and the final norm are a fraction of a percent),
            # and a whole 2048-token step took 1.2-2.3 s per call on the 2-core Zen 4 (most of a plan's build time).
            # Decode steps keep the whole depth: the C forward's one call per step is part of what is timed.
            timed_depth = min(depth, PROMPT_STEP_TIMING_LAYERS) if operation == "prompt_step" else depth
            with model.first_layers(timed_depth), c_step.kernel.first_layers(timed_depth):
                choice = choose(operation, bucket, fns)
            plan.choices.append(replace(choice, seconds={k: v * depth / timed_depth for k, v in choice.seconds.items()}))
        plan.build_seconds += time.perf_counter() - start
    # Untimed kinds (no step fitted the cache) keep the C forward's own limits.
    c_step.max_rows = _won_up_to(plan.for_operation("decode_step"), c_step.max_rows)
    c_step.max_prompt_tokens = min(c_step.max_prompt_tokens,
                                   _won_up_to(plan.for_operation("prompt_step"), c_step.max_prompt_tokens))
    return c_step.max_rows > 0 or c_step.max_prompt_tokens > 0


def _won_up_to(choices: list[Choice], own_limit: int) -> int:
    """The step size the C forward keeps: up to the first bucket it lost (the largest bucket it won; its own
    limit when it won them all, or when nothing was timed)."""
    if not choices:
        return own_limit
    limit = 0
    for c in choices:
        if c.kernel != C_FORWARD:
            break
        limit = c.rows if c is not choices[-1] else own_limit
    return limit
