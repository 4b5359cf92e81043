"""ctypes binding of step_forward.c: a whole Llama decoder forward for one engine step in one call (decode
rows, prompt chunks or both).

The caller describes the model once (StepForwardKernel: pointers to every layer's weights and K/V cache,
kept alive by the object) and then runs steps with per-step tensors. Tensors are float32 (float32
weights in 16-channel panels, int8 weights with their int32 row sums, int4 weights with float16 group
scales and minima, bf16 weights in panels of input pairs) and contiguous; see step_forward.c for the arithmetic
and the invariants.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tokenmill.distributed.shm_all_reduce import ShmAllReduce
from tokenmill.kernels.cpu.bf16_gemm import bf16_panels_shape
from tokenmill.kernels.cpu.build import load_kernel_library
from tokenmill.kernels.cpu.f32_gemm import check_panels
from tokenmill.kernels.cpu.int4_gemm import check_int4_weights
from tokenmill.kernels.cpu.int8_gemm import ACTIVATION_LEVELS, check_int8_panels
from tokenmill.kernels.cpu.kv_cache import cache_head_dim, kv_type_code

_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


class _Linear(ctypes.Structure):
    _fields_ = [("weight", _ptr), ("rowsum", _ptr), ("scale", _ptr), ("group_scale", _ptr), ("group_min", _ptr),
                ("bias", _ptr), ("n", _i64), ("k", _i64), ("rotation_block", _i64), ("format", _i64),
                ("levels", _i64)]


FLOAT32, INT8, INT4, BF16 = 0, 1, 2, 3  # step_forward.c's tm_linear formats
# step_forward.c's phases (TM_PHASE_*), in order, as StepForwardKernel.phase_seconds reports them.
PHASES = ("per-row work (norms, quantization, silu)", "projections", "rotary + K/V write", "attention",
          "tensor-parallel all-reduces (waits included)")


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _ptr), ("post_norm", _ptr), ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear),
                ("down", _Linear), ("k_cache", _ptr), ("v_cache", _ptr)]


class _Model(ctypes.Structure):
    _fields_ = [("num_layers", _i64), ("hidden", _i64), ("num_heads", _i64), ("num_kv_heads", _i64),
                ("head_dim", _i64), ("intermediate", _i64), ("num_blocks", _i64), ("block_size", _i64),
                ("kv_type", _i64), ("eps", _f32), ("attn_scale", _f32), ("layers", ctypes.POINTER(_Layer)),
                ("final_norm", _ptr),
                ("rope_cos", _ptr), ("rope_sin", _ptr), ("row_chunk_bytes", _i64),
                ("amx_attention_max_rows", _i64), ("tp_segment", _ptr), ("tp_rank", _i64), ("tp_world", _i64),
                ("tp_capacity", _i64), ("tp_seq", _ptr), ("tp_timeout_s", ctypes.c_double), ("kv_row_shares", _ptr),
                ("fuse_int8_mlp", _i64), ("int4_bf16_min_rows", _i64), ("prefetch_weights", _i64),
                ("amx_cache_prompts", _i64), ("amx_direct_o", _i64)]

# Input-row bytes a projection keeps in L2 per pass over its weights when no L2 size is known (192 KiB: 3/8 of the
# AVX2 Zen 3's 512 KiB, where it was tuned).
DEFAULT_ROW_CHUNK_BYTES = 192 << 10


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = load_kernel_library("step_forward")
    if lib is None:
        return None
    lib.tm_step_forward.argtypes = [ctypes.POINTER(_Model), _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _i64,
                                   _ptr, _i64, ctypes.c_int, _ptr]
    lib.tm_step_forward.restype = ctypes.c_int
    return lib


def step_forward_available() -> bool:
    return _lib() is not None


@dataclass
class LinearWeights:
    """One projection y = x W^T (+ b), with features = (n, k). Float32 (layers/panel_linear.py): weight panels
    [ceil(n / 16), k, 16]. Int8 (quant/int8_cpu.py's pair-budget weights): weight panels int8
    [ceil(n / 16), ceil(k / 4), 16, 4], row_sums int32 and scale float32 padded to whole panels, and the
    Hadamard block the input is rotated by (0: none), and the activations' bits (8 or 7). Int4
    (quant/int4_cpu.py's groups): weight packed uint8 [n_pad, k / 2], scale and group_min float16
    [n_pad / 4, k / 32, 4]. Bf16 (layers/panel_linear.py's Bf16PanelLinear): weight panels bf16
    [ceil(n / 16), k_pad / 2, 16, 2] (kernels/cpu/bf16_panels.h)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    row_sums: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    rotation_block: int = 0
    group_min: torch.Tensor | None = None
    features: tuple[int, int] | None = None  # (n, k): every format is packed
    activation_bits: int = 8  # int8

    @property
    def format(self) -> int:
        if self.weight.dtype == torch.int8:
            return INT8
        if self.weight.dtype == torch.bfloat16:
            return BF16
        return INT4 if self.weight.dtype == torch.uint8 else FLOAT32

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features)."""
        if self.features is None:
            raise ValueError("decode step: packed weights need their features (n, k)")
        return self.features


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: LinearWeights  # output rows: q (num_heads * head_dim) | k | v (num_kv_heads * head_dim each)
    o: LinearWeights
    gate_up: LinearWeights  # output rows: gate (intermediate) | up (intermediate)
    down: LinearWeights
    kv_cache: tuple[torch.Tensor, torch.Tensor]  # [num_kv_heads, num_blocks, block_size, row] each (kv_cache.py)


def _checked(t: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    if t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"decode step: {what} must be a contiguous {dtype} CPU tensor, got {t.dtype} {t.device}")
    return t


class StepForwardKernel:
    """The model as step_forward.c reads it. Holds every tensor it points to, so the pointers stay valid
    as long as this object lives; the tensors must not be reallocated (weights and caches never are)."""

    def __init__(
        self, layers: list[LayerWeights], final_norm: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
        num_heads: int, num_kv_heads: int, head_dim: int, eps: float, attn_scale: float,
        row_chunk_bytes: int = DEFAULT_ROW_CHUNK_BYTES, amx_attention_max_rows: int = 0,
        tp_shm: ShmAllReduce | None = None, kv_row_shares: Sequence[tuple[int, int]] | None = None,
        int4_bf16_min_rows: int = 0,
    ) -> None:
        """row_chunk_bytes: input-row bytes of a projection kept in L2 while its weights pass (steps of more rows
        take their rows in chunks, each streaming the weights again). amx_attention_max_rows: prompts of up to this many
        rows whose whole context is in the step attend in bf16 on AMX tiles or vdpbf16ps
        (kernels/cpu/bf16_attention_amx.h; for a bf16 or int8/int4 model where the plan chose it); 0: the float32
        kernels for all. kv_row_shares: per KV head (i, n), this rank attends only share i of n of the step's rows of
        that head's group (distributed/sharding.py). int4_bf16_min_rows: steps of at least this many rows multiply
        int4 weights as bf16 panels dequantized pass by pass (kernels/cpu/int4_bf16.h; inputs rounded to bf16, for an
        int4 model where the plan chose c_int4_bf16 from that size); 0: the W4A16 products at every size."""
        if head_dim % 8:
            raise ValueError(f"decode step: head_dim must be a multiple of 8, got {head_dim}")
        if amx_attention_max_rows and any(layer.qkv.format == FLOAT32 for layer in layers):
            raise ValueError("decode step: bf16 prompt attention is for a bf16 or an int8/int4 model, not float32 "
                             "projections")
        self._keep: list[torch.Tensor] = []
        hidden = final_norm.shape[0]
        intermediate = layers[0].down.shape[1]
        num_kv_heads_, num_blocks, block_size, _ = layers[0].kv_cache[0].shape
        kv_type = kv_type_code(layers[0].kv_cache)  # float32, float16, int8 or bfloat16 (kernels/cpu/kv_cache.py)
        if cache_head_dim(layers[0].kv_cache[0]) != head_dim:
            raise ValueError(f"decode step: the K/V cache holds heads of {cache_head_dim(layers[0].kv_cache[0])}, "
                             f"the model {head_dim}")
        kv_dtype = layers[0].kv_cache[0].dtype
        if num_kv_heads_ != num_kv_heads:
            raise ValueError(f"decode step: the K/V cache has {num_kv_heads_} heads, the model {num_kv_heads}")
        self._layers = (_Layer * len(layers))()
        for dst, layer in zip(self._layers, layers):
            dst.input_norm = self._ptr(layer.input_norm, torch.float32, "a norm weight")
            dst.post_norm = self._ptr(layer.post_norm, torch.float32, "a norm weight")
            for name in ("qkv", "o", "gate_up", "down"):
                setattr(dst, name, self._linear(getattr(layer, name), name))
            for cache in layer.kv_cache:
                if cache.shape != layer.kv_cache[0].shape or cache.shape[1:3] != (num_blocks, block_size):
                    raise ValueError("decode step: every layer's K/V cache must have the same shape")
            if kv_type_code(layer.kv_cache) != kv_type:
                raise ValueError("decode step: every layer's K/V cache must have the same dtype")
            dst.k_cache = self._ptr(layer.kv_cache[0], kv_dtype, "the K cache")
            dst.v_cache = self._ptr(layer.kv_cache[1], kv_dtype, "the V cache")
        expected = {"qkv": ((num_heads + 2 * num_kv_heads) * head_dim, hidden), "o": (hidden, num_heads * head_dim),
                    "gate_up": (2 * intermediate, hidden), "down": (hidden, intermediate)}
        for layer in layers:
            for name, shape in expected.items():
                if tuple(getattr(layer, name).shape) != shape:
                    raise ValueError(f"decode step: {name} weight is {tuple(getattr(layer, name).shape)}, "
                                     f"expected {shape}")
        self._model = _Model(
            num_layers=len(layers), hidden=hidden, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            intermediate=intermediate, num_blocks=num_blocks, block_size=block_size, kv_type=kv_type, eps=eps,
            attn_scale=attn_scale,
            layers=self._layers, final_norm=self._ptr(final_norm, torch.float32, "the final norm weight"),
            rope_cos=self._ptr(rope_cos, torch.float32, "the rotary cos table"),
            rope_sin=self._ptr(rope_sin, torch.float32, "the rotary sin table"), row_chunk_bytes=row_chunk_bytes,
            amx_attention_max_rows=amx_attention_max_rows, tp_world=1, fuse_int8_mlp=1,
            int4_bf16_min_rows=int4_bf16_min_rows, prefetch_weights=1, amx_cache_prompts=1,
            amx_direct_o=1)
        if tp_shm is not None:  # a tensor-parallel rank: row-parallel outputs summed through shared memory
            self._tp_shm = tp_shm
            self._model.tp_segment, self._model.tp_rank = tp_shm.address, tp_shm.rank
            self._model.tp_world, self._model.tp_capacity = tp_shm.world_size, tp_shm.capacity
            self._model.tp_seq, self._model.tp_timeout_s = tp_shm.seq.data_ptr(), tp_shm.timeout_s
        if kv_row_shares is not None and any(n > 1 for _, n in kv_row_shares):
            if len(kv_row_shares) != num_kv_heads:
                raise ValueError(f"kv_row_shares has {len(kv_row_shares)} entries for {num_kv_heads} KV heads")
            self._model.kv_row_shares = self._ptr(torch.tensor(kv_row_shares, dtype=torch.int64).reshape(-1),
                                                   torch.int64, "the KV heads' row shares")
        self.hidden_size = hidden
        self.max_positions = rope_cos.shape[0]
        # None, or float64 [len(PHASES)]: run() adds each phase's wall time (seconds) to it.
        self.phase_seconds: torch.Tensor | None = None

    @property
    def int4_bf16_min_rows(self) -> int:
        """Steps of at least this many rows multiply int4 weights on the bf16 units (0: never)."""
        return int(self._model.int4_bf16_min_rows)

    @contextmanager
    def first_layers(self, n: int) -> Iterator[None]:
        """While open, run() takes the first n layers only (the execution plan's step timings)."""
        full = self._model.num_layers
        self._model.num_layers = max(1, min(n, full))
        try:
            yield
        finally:
            self._model.num_layers = full

    def _ptr(self, t: torch.Tensor, dtype: torch.dtype, what: str) -> int:
        self._keep.append(_checked(t, dtype, what))
        return t.data_ptr()

    def _linear(self, lin: LinearWeights, name: str) -> _Linear:
        n, k = lin.shape
        out = _Linear(n=n, k=k, format=lin.format, rotation_block=lin.rotation_block)
        if lin.bias is not None:
            out.bias = self._ptr(lin.bias, torch.float32, f"{name} bias")
        if lin.format == INT4:
            if lin.scale is None or lin.group_min is None or lin.rotation_block:
                raise ValueError(f"decode step: int4 {name} needs its group scales and minima, and takes no rotation")
            check_int4_weights(lin.weight, lin.scale, lin.group_min, n, k)
            out.weight = self._ptr(lin.weight, torch.uint8, f"{name} weight")
            out.group_scale = self._ptr(lin.scale, torch.float16, f"{name} group scales")
            out.group_min = self._ptr(lin.group_min, torch.float16, f"{name} group minima")
        elif lin.format == INT8:
            if lin.row_sums is None or lin.scale is None:
                raise ValueError(f"decode step: int8 {name} needs its row sums and scales")
            rb = lin.rotation_block
            if rb < 0 or (rb and (rb & (rb - 1) or k % rb)):
                raise ValueError(f"decode step: {name} rotation_block must be 0 or a power of 2 dividing {k}")
            check_int8_panels(lin.weight, lin.row_sums, lin.scale, n, k)
            if lin.activation_bits not in ACTIVATION_LEVELS:
                raise ValueError(f"decode step: int8 {name} activation_bits must be 8 or 7, got {lin.activation_bits}")
            out.levels = ACTIVATION_LEVELS[lin.activation_bits]
            out.weight = self._ptr(lin.weight, torch.int8, f"{name} weight")
            out.rowsum = self._ptr(lin.row_sums, torch.int32, f"{name} row sums")
            out.scale = self._ptr(lin.scale, torch.float32, f"{name} scales")
        elif lin.format == BF16:
            if lin.rotation_block:
                raise ValueError(f"decode step: bf16 {name} takes no rotation")
            if tuple(lin.weight.shape) != bf16_panels_shape(n, k):
                raise ValueError(f"decode step: bf16 {name} panels must be {list(bf16_panels_shape(n, k))}, got "
                                 f"{tuple(lin.weight.shape)}")
            out.weight = self._ptr(lin.weight, torch.bfloat16, f"{name} weight")
        else:
            if lin.rotation_block:
                raise ValueError(f"decode step: float32 {name} takes no rotation")
            check_panels(lin.weight, n, k)
            out.weight = self._ptr(lin.weight, torch.float32, f"{name} weight")
        return out

    def run(
        self, hidden: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, q_starts: torch.Tensor,
        q_lens: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor, keep_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden [T, hidden] float32 (the embeddings of the step's tokens; overwritten) -> the final normed
        hidden states, in place. positions, slots: [T] int64, per row. q_starts, q_lens, seq_lens: [N] int64,
        per request: request r owns rows q_starts[r] .. + q_lens[r] - 1 (the requests' rows in order, together
        all T), the last q_lens[r] of its seq_lens[r] positions. block_tables: [N, max_blocks] int64
        contiguous. keep_rows: None, or the rows (int64, strictly ascending) whose hidden states the caller reads:
        the last layer runs only those past its attention, and the other rows of the result are undefined."""
        num_rows, num_reqs = hidden.shape[0], q_lens.shape[0]
        _checked(hidden, torch.float32, "hidden")
        if hidden.shape != (num_rows, self.hidden_size):
            raise ValueError(f"decode step: hidden must be [T, {self.hidden_size}], got {tuple(hidden.shape)}")
        for t, what, rows in ((positions, "positions", num_rows), (slots, "slots", num_rows),
                              (q_starts, "q_starts", num_reqs), (q_lens, "q_lens", num_reqs),
                              (seq_lens, "seq_lens", num_reqs), (block_tables, "block_tables", num_reqs)):
            _checked(t, torch.int64, what)
            if t.shape[0] != rows:
                raise ValueError(f"decode step: {what} must have {rows} rows, got {t.shape[0]}")
        if int(q_lens.sum()) != num_rows:
            raise ValueError(f"decode step: q_lens must add up to the {num_rows} rows, got {int(q_lens.sum())}")
        if keep_rows is not None:
            _checked(keep_rows, torch.int64, "keep_rows")
            if keep_rows.dim() != 1 or (keep_rows.numel() and (
                    int(keep_rows[0]) < 0 or int(keep_rows[-1]) >= num_rows or bool((keep_rows.diff() <= 0).any()))):
                raise ValueError(f"decode step: keep_rows must be strictly ascending rows in [0, {num_rows})")
        status = _lib().tm_step_forward(
            ctypes.byref(self._model), hidden.data_ptr(), positions.data_ptr(), slots.data_ptr(), num_rows,
            q_starts.data_ptr(), q_lens.data_ptr(), seq_lens.data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
            num_reqs, None if keep_rows is None else keep_rows.data_ptr(),
            -1 if keep_rows is None else keep_rows.numel(), torch.get_num_threads(),
            None if self.phase_seconds is None else self.phase_seconds.data_ptr())
        if status == 1:
            raise MemoryError("decode step: no memory for the step's scratch buffers")
        if status == 3:
            raise RuntimeError("decode step: a tensor-parallel all-reduce failed (a rank died or did not arrive in time)")
        if status != 0:
            raise RuntimeError(f"decode step kernel failed with status {status}")
        return hidden
