"""The one-call C forward of a whole step of a Llama-family model (kernels/cpu/step_forward.c), as one of the
runner's whole-step paths (worker/step_paths.py, beside CUDA graphs).

A step it takes skips the layer-by-layer forward: the embeddings go to step_forward.c, which runs every
layer in one OpenMP region and returns the final hidden states. It takes steps of at most
`max_rows` tokens (decode steps of that many requests, speculative verification of a few tokens per request, short
chunks), and steps with prompt rows (prefill, chunked prefill, mixed with
decode rows) of at most `max_prompt_tokens` tokens (48 when a projection is int4 and the plan kept its W4A16 C
kernel at every size, a kernel for small batches; where the plan chose int4's bf16 route from some row count on,
the C forward multiplies steps that large the same way, and takes prompts as a bf16 model's). Other steps run
models/llama.py's forward. Both compute the same arithmetic; the C path only removes the per-op dispatch
(about half of a batch-1 token's time on a 2-core CPU) and, for prompt steps, the other threads' waits
while the host dispatches the ~10 OpenMP regions per layer.

It applies on the CPU to float32 and bfloat16 models with a float32, float16, int8 or bfloat16 K/V cache
(kernels/cpu/kv_cache.py) in the torch backend's head-major layout, with projections that are
layers/panel_linear.py's PanelLinear (float32) or Bf16PanelLinear (bf16 weights; activations stay float32
and are rounded to bf16 at each product's input), quant/int8_cpu.py's Int8DynamicLinear or quant/int4_cpu.py's
Int4GroupLinear; anything else (plain Linears, fp8, the triton backend, no C compiler) keeps the
layer-by-layer forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.attention.torch_backend import BF16_KERNEL, TorchAttentionBackend, max_rows_routed
from tokenmill.engine.step_timer import NULL_TIMER, AnyStepTimer
from tokenmill.kernels.cpu.bf16_prompt_attention import AMX_ATTENTION_MAX_KEYS, bf16_prompt_attention_available
from tokenmill.kernels.cpu.kv_cache import KV_DTYPES
from tokenmill.kernels.cpu.step_forward import (
    DEFAULT_ROW_CHUNK_BYTES,
    FLOAT32,
    LayerWeights,
    LinearWeights,
    StepForwardKernel,
    step_forward_available,
)
from tokenmill.layers.linear import Linear
from tokenmill.layers.panel_linear import Bf16PanelLinear, PanelLinear
from tokenmill.layers.planned_linear import PlannedLinear
from tokenmill.quant.int4_cpu import Int4GroupLinear, bf16_units_gemm_available
from tokenmill.quant.int8_cpu import Int8DynamicLinear
from tokenmill.worker.capabilities import detect_capabilities
from tokenmill.worker.request_states import StepRequest

logger = logging.getLogger("tokenmill")

# Most requests a step may have to take the C forward. Measured on the 2-core AVX2 machine, SmolLM2-135M,
# decode tok/s of the C forward against layer by layer in the same process (benchmarks/step_forward_ab.py;
# at commit 65fcaa1, before the panel kernels, which both paths now share):
#   rows     1      4      8     16     32     64
#   int8   88/43 231/130    -  277/196 308/223 348/272
#   fp32   42/19 128/44 155/67 183/111 227/156 252/202
# Larger batches are unmeasured and keep the layer-by-layer forward.
MAX_ROWS = 64
# Most tokens a step with prompt rows may have to take the C forward (its scratch grows ~35 KB a token
# for SmolLM2-135M); the engine's default step budget (max_num_batched_tokens) is 2048.
MAX_PROMPT_TOKENS = 4096
# The same with int4 projections on their W4A16 C kernel at every size (no bf16 route), which multiplies rows in
# blocks of up to 4: one request's prompt step through the C forward against layer by layer (int4 dequantized to
# float32 products), SmolLM2-135M on the AMX Xeon: 16 tokens 28 against 37 ms, 32: 55 against 104, 64: 114 against
# 104, 128: 232 against 134 (a draft model's catch-up steps and short prompts are this small).
INT4_MAX_PROMPT_TOKENS = 48


class CStepUnsupported(ValueError):
    """The model cannot run through the C forward; the reason says why."""


def _linear_weights(module: nn.Module, name: str) -> LinearWeights:
    if isinstance(module, PlannedLinear):  # the execution plan's routes: the C forward reads the panels
        # (int4: its routes differ only in their many-row GEMM's dtype and share the weights the C forward reads)
        panels = module.impl_of(PanelLinear) or module.impl_of(Bf16PanelLinear) or module.impl_of(Int4GroupLinear)
        if panels is None:
            raise CStepUnsupported(f"{name} runs {module.kernels} and keeps no panels")
        module = panels
    if isinstance(module, Bf16PanelLinear):
        return LinearWeights(module.panels, module.bias, features=(module.out_features, module.in_features))
    if isinstance(module, Int4GroupLinear):
        return LinearWeights(module.packed, module.bias, scale=module.group_scale, group_min=module.group_min,
                             features=(module.out_features, module.in_features))
    if isinstance(module, Int8DynamicLinear):
        return LinearWeights(module.panels, module.bias, module.row_sums, module.scale, module.rotation_block,
                             features=(module.out_features, module.in_features),
                             activation_bits=module.activation_bits)
    if isinstance(module, PanelLinear):
        return LinearWeights(module.panels, module.bias, features=(module.out_features, module.in_features))
    if type(module) is Linear:
        raise CStepUnsupported(f"{name} is a plain {module.weight.dtype} Linear (the C forward takes float32 "
                                    "projections packed in panels, layers/panel_linear.py)")
    raise CStepUnsupported(f"{name} is a {type(module).__name__}")


def _norm_weight(norm: nn.Module) -> torch.Tensor:
    """A norm's weight as the float32 the C forward reads (a bf16 model's: its exact values, converted once)."""
    weight = norm.weight.detach()
    if weight.dtype == torch.bfloat16:
        return norm.float32_weight()
    if weight.dtype != torch.float32:
        raise CStepUnsupported(f"the norm weights are {weight.dtype}")
    return weight


def build_step_kernel(model: nn.Module) -> StepForwardKernel:
    """The C forward's view of `model` (a CausalLM, models/interface.py, whose K/V caches are bound); raises
    CStepUnsupported when it cannot take this model."""
    if not step_forward_available():
        raise CStepUnsupported("the C step-forward kernel is not available (no C compiler?)")
    layers = []
    parts = model.decoder_layers()
    for i, part in enumerate(parts):
        attn = part.attention
        if attn.backend.name != "torch":
            raise CStepUnsupported(f"the attention backend is {attn.backend.name}")
        if attn.kv_cache is None:
            raise CStepUnsupported("the K/V cache is not bound yet")
        if attn.kv_cache[0].dtype not in KV_DTYPES or attn.kv_cache[0].device.type != "cpu":
            raise CStepUnsupported(f"the K/V cache is {attn.kv_cache[0].dtype} on {attn.kv_cache[0].device}")
        norms = (_norm_weight(part.input_norm), _norm_weight(part.post_attention_norm))
        if any(w.device.type != "cpu" for w in norms):
            raise CStepUnsupported("the norm weights are not CPU tensors")
        weights = {p.name: _linear_weights(p.module, f"layers.{i}.{p.name}") for p in part.projections}
        layers.append(LayerWeights(
            input_norm=norms[0].detach(), post_norm=norms[1].detach(), qkv=weights["qkv_proj"], o=weights["o_proj"],
            gate_up=weights["gate_up_proj"], down=weights["down_proj"], kv_cache=attn.kv_cache))
    attn0 = parts[0].attention
    rotary = model.rotary
    if rotary.cos.dtype != torch.float32:
        raise CStepUnsupported(f"the rotary tables are {rotary.cos.dtype}")
    if model.tp.is_parallel and (model.tp.shm is None or model.tp.spans_nodes):
        raise CStepUnsupported("tensor-parallel ranks without one shared-memory all-reduce over all of them")
    return StepForwardKernel(
        layers, _norm_weight(model.final_norm), rotary.cos, rotary.sin, attn0.num_heads, attn0.num_kv_heads,
        attn0.head_dim, float(model.final_norm.eps), float(attn0.scale), row_chunk_bytes=_row_chunk_bytes(),
        amx_attention_max_rows=_amx_attention_max_rows(attn0.backend, layers, attn0.head_dim), tp_shm=model.tp.shm,
        kv_row_shares=parts[0].row_shares, int4_bf16_min_rows=int4_bf16_min_rows(model))


def int4_bf16_min_rows(model: nn.Module) -> int:
    """The fewest rows from which the C forward multiplies int4 weights on the bf16 units: where the execution plan
    routed the first layer's gate_up projection (the largest) to c_int4_bf16 (int4_bf16_route_start); 0 (never) where
    the CPU does not multiply bf16 in hardware."""
    gate_up = next(p.module for p in model.decoder_layers()[0].projections if p.name == "gate_up_proj")
    return int4_bf16_route_start(gate_up) if bf16_units_gemm_available() else 0


def int4_bf16_route_start(projection: nn.Module) -> int:
    """The fewest rows `projection` multiplies through int4's bf16 route: past its c_int4 routes where the plan gave
    it both (a PlannedLinear), 1 where that route takes every row count, 0 where none does (W4A16 only, or not
    int4)."""
    if isinstance(projection, Int4GroupLinear):  # one route for every row count
        return 1 if projection.prefill_dtype == torch.bfloat16 else 0
    if not isinstance(projection, PlannedLinear):
        return 0
    after = 0  # the largest row count of the c_int4 routes before the first c_int4_bf16 one
    for max_rows, kernel in zip(projection.max_rows, projection.kernels):
        if kernel == "c_int4_bf16":
            return after + 1
        after = max_rows
    return 0


def _amx_attention_max_rows(backend: TorchAttentionBackend, layers: list[LayerWeights], head_dim: int) -> int:
    """The prompt lengths (1 .. this) whose whole-context attention the C forward runs in the bf16 kernel (AMX tiles
    or vdpbf16ps): where the execution plan routed them to BF16_KERNEL (a bf16 or int8/int4 model on a CPU with
    AMX-BF16 or AVX512-BF16: the backend's route_prompt_attention allows no other); 0 elsewhere."""
    if any(layer.qkv.format == FLOAT32 for layer in layers) or not bf16_prompt_attention_available(head_dim):
        return 0
    return max_rows_routed(backend.prompt_routes, BF16_KERNEL, AMX_ATTENTION_MAX_KEYS)


def _row_chunk_bytes() -> int:
    """3/8 of the core's L2 (192 KiB on the AVX2 Zen 3's 512 KiB, where the chunks were tuned; 768 KiB on the AMX
    Xeon's 2 MiB, where 192 KiB made a 256-token prompt stream its weights 2-4 times: projections 51 -> 41 ms)."""
    l2_kib = detect_capabilities().l2_kib
    return l2_kib * 1024 * 3 // 8 if l2_kib > 0 else DEFAULT_ROW_CHUNK_BYTES


StepInputs = Callable[[Sequence[StepRequest]], tuple[torch.Tensor, torch.Tensor, AttentionMetadata]]


class CStepForward:
    """The steps it can run (`can_run`: pure decode steps of up to max_rows requests, steps with prompt rows of
    up to max_prompt_tokens tokens) through the C forward; `build_inputs` is the runner's flat-batch builder."""

    def __init__(self, model: nn.Module, build_inputs: StepInputs) -> None:
        self.model = model
        self.kernel = build_step_kernel(model)
        self.build_inputs = build_inputs
        self.max_rows = MAX_ROWS
        int4 = any(isinstance(m, Int4GroupLinear) for part in model.decoder_layers() for p in part.projections
                   for m in p.module.modules())
        w4a16_only = int4 and self.kernel.int4_bf16_min_rows == 0
        self.max_prompt_tokens = INT4_MAX_PROMPT_TOKENS if w4a16_only else MAX_PROMPT_TOKENS

    def can_run(self, scheduled: Sequence[StepRequest]) -> bool:
        num_tokens = sum(s.num_new_tokens for s in scheduled)
        return self.takes(len(scheduled), num_tokens)

    def takes(self, num_reqs: int, num_tokens: int) -> bool:
        if num_tokens <= self.max_rows:  # decode steps, and steps as small (speculative verification, short chunks)
            return True
        if num_tokens == num_reqs:  # a larger pure decode step
            return False
        return num_tokens <= self.max_prompt_tokens

    def run(self, scheduled: Sequence[StepRequest], timer: AnyStepTimer = NULL_TIMER,
            rows: Sequence[int] | None = None) -> torch.Tensor:
        """The step's final hidden states [T, hidden] (what the model's forward returns); with `rows`, only those
        rows' (the others undefined)."""
        with timer.section("prepare_inputs"):
            inputs = self.build_inputs(scheduled)
            keep = None if rows is None or len(rows) == inputs[0].shape[0] else torch.tensor(rows, dtype=torch.int64)
        with timer.section("forward"):
            return self.forward(*inputs, keep_rows=keep)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                keep_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The model's forward for one step, through the C kernel (it must take the step: `takes`). keep_rows:
        None, or the rows (ascending) whose hidden states the caller reads; the others are then undefined (the last
        layer skips them past its attention)."""
        embeddings = self.model.embed(input_ids)  # the vocabulary-parallel lookup under tensor parallelism
        q_lens = meta.scratch.get("q_lens")
        if q_lens is None:
            q_lens = meta.scratch["q_lens"] = torch.tensor(meta.query_lens_list, dtype=torch.int64)
        dtype = embeddings.dtype  # a bf16 model's: the C forward computes in float32 and returns its dtype
        hidden = self.kernel.run(embeddings if dtype == torch.float32 else embeddings.float(), positions,
                                 meta.slot_mapping, meta.query_start_loc[:-1], q_lens, meta.seq_lens, meta.block_tables,
                                 keep_rows)
        return hidden if dtype == torch.float32 else hidden.to(dtype)

    def describe(self) -> str:
        prompts = f", steps with prompt rows of up to {self.max_prompt_tokens} tokens" if self.max_prompt_tokens else ""
        bound = self.kernel.int4_bf16_min_rows
        int4 = f" (int4 products on the bf16 units in steps of at least {bound} rows)" if bound else ""
        return f"decode steps of up to {self.max_rows} requests{prompts} run through the one-call C forward{int4}"


def build_c_step(model: nn.Module, build_inputs: StepInputs) -> CStepForward | None:
    """The C whole-step path for `model` (its K/V caches bound), or None when it cannot take the model (logged)."""
    try:
        return CStepForward(model, build_inputs)
    except ValueError as exc:  # CStepUnsupported, or a layout StepForwardKernel does not take
        logger.info("every step runs layer by layer: %s", exc)
        return None
