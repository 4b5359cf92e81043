"""Roofline inputs: what this CPU can do, and what a decoder model costs per token.

Machine ceilings, each the median of several timed repetitions at torch's current thread count:
- fp32 GEMM rate (GFLOP/s, 2*M*K*N FLOPs per matmul): a large square matmul (the peak) and any
  other shape asked for (e.g. a decode step's batch x hidden @ hidden x 2*intermediate);
- read bandwidth (GB/s): `x.sum()` over a float32 buffer much larger than the last-level cache,
  counting the buffer's bytes once;
- copy bandwidth (GB/s): `dst.copy_(src)` over such buffers, counting bytes read + bytes written
  (the write-allocate traffic a CPU may add is not counted).
CPU identity comes from worker/capabilities.py (model name and the ISA flags that decide which kernels
are fast) and sysfs (last-level cache size).

Model costs (`ModelCosts.from_state_dict`), from the HF-named weights:
- FLOPs per processed token = 2 x the decoder's matmul parameters (every 2-D weight under
  `model.layers.`); each sampled row adds 2 x hidden x vocab for the vocabulary projection.
  Attention's score/value products are left out (a lower bound; small at these lengths).
- weight bytes read per decode step: fp32 = 4 bytes per parameter (decoder matmuls, lm_head, norm
  vectors; the embedding row lookup is negligible); int8 = 1 byte per decoder matmul and lm_head
  weight plus a 4-byte scale per output channel, norms fp32 (`--quantization int8`'s default,
  which quantizes lm_head too); int4 = half a byte per decoder matmul weight plus an fp16 scale and
  minimum per group of 32 (0.625 bytes per weight), lm_head int8 as above.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tokenmill.worker.capabilities import ISA_FLAGS, detect_capabilities


def median_seconds(fn: Callable[[], Any], repeats: int, sample_s: float = 5e-3) -> float:
    """Median wall time of one `fn()` call: one untimed warm-up call, then `repeats` samples, each of
    as many calls (1 to 1000) as fill about `sample_s` at the warm-up call's speed."""
    start = time.perf_counter()
    fn()
    inner = min(1000, max(1, int(sample_s / max(time.perf_counter() - start, 1e-9))))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


@torch.inference_mode()
def gemm_gflops(m: int, k: int, n: int, repeats: int) -> float:
    """fp32 rate of [m, k] @ [k, n] in GFLOP/s."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    return 2.0 * m * k * n / median_seconds(lambda: torch.mm(a, b, out=out), repeats) / 1e9


@torch.inference_mode()
def read_bandwidth_gbps(nbytes: int, repeats: int) -> float:
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    return x.numel() * 4 / median_seconds(x.sum, repeats) / 1e9


@torch.inference_mode()
def copy_bandwidth_gbps(nbytes: int, repeats: int) -> float:
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_seconds(lambda: dst.copy_(src), repeats) / 1e9


def cpu_info() -> dict[str, Any]:
    caps = detect_capabilities()
    llc = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    return {
        "model_name": caps.cpu_model,
        "flags": {flag: caps.has(flag) for flag in ISA_FLAGS},
        "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "l3_cache": llc.read_text().strip() if llc.is_file() else None,
        "torch": torch.__version__, "platform": platform.platform(), "python": platform.python_version(),
    }


def measure_machine(
    square: int, shapes: dict[str, tuple[int, int, int]], buffer_bytes: int, repeats: int,
) -> dict[str, Any]:
    """CPU identity plus the ceilings: GEMM peak (square^3), GEMM rate at each named (M, K, N) shape,
    read and copy bandwidth over `buffer_bytes` buffers."""
    return {
        "cpu": cpu_info(),
        "gemm_peak_gflops": gemm_gflops(square, square, square, repeats), "gemm_peak_size": square,
        "gemm_shapes": {name: {"mkn": list(mkn), "gflops": gemm_gflops(*mkn, repeats)} for name, mkn in shapes.items()},
        "read_GBps": read_bandwidth_gbps(buffer_bytes, repeats),
        "copy_GBps": copy_bandwidth_gbps(buffer_bytes, repeats),
        "bandwidth_buffer_bytes": buffer_bytes, "repeats": repeats,
    }


@dataclass(frozen=True)
class ModelCosts:
    matmul_params: int  # 2-D weights of the decoder layers
    matmul_out_channels: int  # summed output features of those weights (one int8 scale each)
    lm_head_params: int  # hidden x vocab
    other_params: int  # norm vectors and biases
    hidden_size: int
    intermediate_size: int
    kv_bytes_per_token: int  # fp32 K and V of every layer

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], hf_config: Any) -> ModelCosts:
        matmul = [t for name, t in state_dict.items() if name.startswith("model.layers.") and t.dim() == 2]
        other = [t for name, t in state_dict.items() if t.dim() == 1]
        lm_head = state_dict.get("lm_head.weight", state_dict["model.embed_tokens.weight"])
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
        return cls(
            matmul_params=sum(t.numel() for t in matmul), matmul_out_channels=sum(t.shape[0] for t in matmul),
            lm_head_params=lm_head.numel(), other_params=sum(t.numel() for t in other),
            hidden_size=hf_config.hidden_size, intermediate_size=hf_config.intermediate_size,
            kv_bytes_per_token=2 * hf_config.num_hidden_layers * kv_heads * head_dim * 4,
        )

    @property
    def flops_per_token(self) -> int:
        return 2 * self.matmul_params

    @property
    def flops_per_sampled_row(self) -> int:
        return 2 * self.lm_head_params

    def workload_flops(self, processed_tokens: int, sampled_rows: int) -> int:
        return processed_tokens * self.flops_per_token + sampled_rows * self.flops_per_sampled_row

    def decode_weight_bytes(self, quantization: str) -> int:
        vocab_channels = self.lm_head_params // self.hidden_size
        int8_head = self.lm_head_params + 4 * vocab_channels
        if quantization == "int8":
            return self.matmul_params + 4 * self.matmul_out_channels + int8_head + 4 * self.other_params
        if quantization == "int4":
            return self.matmul_params * 5 // 8 + int8_head + 4 * self.other_params
        return 4 * (self.matmul_params + self.lm_head_params + self.other_params)

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "flops_per_token": self.flops_per_token,
                "flops_per_sampled_row": self.flops_per_sampled_row,
                "decode_weight_bytes": {q: self.decode_weight_bytes(q) for q in ("none", "int8", "int4")}}
