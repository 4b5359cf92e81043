"""Config strings -> the device, dtypes and kernels the engine runs with.

The engine code path is the same everywhere; only these choices differ:
  cpu:  float32, torch attention backend, eager.
  cuda: bfloat16, triton attention backend (+ fused rotary/KV-write and add+RMSNorm kernels),
        CUDA graphs for decode steps; optionally FP8 weights and an FP8 KV cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from tokenmill.config import CPU_QUANTIZATIONS, EngineConfig
from tokenmill.kernels.cpu.kv_cache import check_bf16_tiles
from tokenmill.kernels.cpu.paged_attention import bf16_cache_products

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, quantization: str = "none", batch_invariant: bool = False
                  ) -> torch.dtype:
    """`auto`: bfloat16 on a GPU, and on a CPU that multiplies bf16 in hardware (AMX-BF16 or AVX512-BF16,
    where oneDNN's bf16 products run 3-17x its float32 ones at prefill sizes); float32 on other CPUs, where
    bf16 is emulated and slower, and under the CPU's int8/int4 quantization (its C kernels take float32
    activations) or in deterministic mode (batch_invariant: float32 C kernels). float32 is the dtype with token-exact
    HF parity."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        if quantization in CPU_QUANTIZATIONS or batch_invariant:
            return torch.float32
        from tokenmill.worker.capabilities import detect_capabilities

        return torch.bfloat16 if detect_capabilities().native_bf16 else torch.float32
    return _DTYPES[name]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters created inside start in `dtype`: an 8B model built for a GPU in bf16 never takes
    the 32 GB an fp32 construction would. Restores the previous default on exit."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def resolve_attention_backend(name: str, device: torch.device) -> str:
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name == "triton":
        try:
            from tokenmill.kernels import triton as kernels
        except ImportError as exc:
            raise ValueError(f"attention_backend='triton' needs the triton package ({exc})") from exc
        if device.type != "cuda" and not kernels.INTERPRET:
            raise ValueError(
                "attention_backend='triton' needs a CUDA GPU; on the CPU it runs only in Triton's (slow) "
                "interpreter, with TRITON_INTERPRET=1 set before start-up"
            )
    return name


# The KV cache dtype `auto` picks where the compute dtype is not the best: CPU int8 / int4 are approximate
# already, and an int8 cache (per-position scales, kernels/cpu/kv_cache.py) streams about a quarter of
# float32's bytes in decode attention. W1 int8 decode attention per step (benchmarks/step_split.py
# --kv-cache-dtype float32 | float16 | int8): 44.7 -> 29.8 -> ~21 ms. Quality against fp32
# (benchmarks/quant_quality.py --kv-cache-dtype int8, its 175-token text then): int8 weights perplexity +0.98%,
# teacher-forced agreement 96.9% (float16 K/V: +1.27%, 97.7%); int4 weights -0.7%, 98.8%. Over 5.5k tokens of
# mixed text, top-1 agreement with fp32 moved from 95.6% to 95.5% (int8 weights) and 97.0% to 96.8% (int4) going
# from float16 to int8 K/V; int8 K/V under float32 weights alone: perplexity +0.08%, agreement 98.4%.
QUANTIZED_AUTO_KV_DTYPE = torch.int8


def resolve_kv_cache_dtype(name: str, dtype: torch.dtype, backend: str, quantization: str = "none",
                           block_size: int = 16, head_dim: int = 64) -> torch.dtype:
    """The KV cache element type for kv_cache_dtype `name` under compute dtype `dtype`, for blocks of block_size
    positions of heads of head_dim."""
    if name == "auto":
        if quantization in CPU_QUANTIZATIONS and backend == "torch":
            return QUANTIZED_AUTO_KV_DTYPE
        if dtype == torch.bfloat16 and backend == "torch":
            # A bf16 model's attention: bf16 tiles where the C kernels multiply them as they lie (AVX512-BF16's
            # vdpbf16ps: one layer's decode attention over 64 x 128 cached positions 0.10 against 0.16 ms for
            # float16 rows on Zen 4); elsewhere float16 rows, which the float32 kernels read natively (and which
            # keep 3 more mantissa bits).
            return torch.bfloat16 if bf16_cache_products(block_size, head_dim) else torch.float16
        return dtype
    if name == "fp8":
        if backend != "triton":
            raise ValueError("kv_cache_dtype='fp8' needs the triton attention backend")
        return torch.float8_e4m3fn
    if name == "int8":
        if backend != "torch":
            raise ValueError("kv_cache_dtype='int8' needs the torch attention backend (the CPU)")
        return torch.int8
    chosen = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    if chosen != dtype and backend != "torch":
        raise ValueError(f"kv_cache_dtype={name!r} differs from the compute dtype {dtype}: the torch attention "
                         "backend converts, the triton one does not")
    if chosen == torch.bfloat16 and backend == "torch":
        check_bf16_tiles(block_size, head_dim)
    return chosen


def check_quantization(config: EngineConfig, device: torch.device, backend: str) -> None:
    if config.model.quantization == "fp8" and (device.type != "cuda" or backend != "triton"):
        raise ValueError("quantization='fp8' runs on CUDA GPUs (Hopper or newer) with the triton backend")
    if config.model.quantization in CPU_QUANTIZATIONS and device.type != "cpu":
        raise ValueError(f"quantization={config.model.quantization!r} is a CPU path; on CUDA GPUs use fp8")


def cuda_graph_sizes(config: EngineConfig, device: torch.device, backend: str) -> list[int]:
    """Decode batch sizes to capture, or [] when graphs are off (CPU, torch backend, enforce_eager, and under tensor
    parallelism: the step's NCCL collectives are not captured into graphs yet)."""
    if device.type != "cuda" or backend != "triton" or config.model.enforce_eager \
            or config.parallel.tensor_parallel_size > 1:
        return []
    from tokenmill.worker.cuda_graphs import capture_sizes

    return capture_sizes(config.scheduler.max_num_seqs)
