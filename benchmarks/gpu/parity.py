"""Correctness sections of benchmarks/gpu/check.py: greedy parity with HF transformers on tiny random
Llamas, and the FP8 tolerance checks (weights, KV cache) on 8B-sized tensors."""

from __future__ import annotations

import copy
import gc
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.gpu.workloads import TINY_64, TINY_128, build_engine, build_hf_model, engine_greedy, hf_greedy

MAX_TOKENS = 16
FP8_REL_TOL = 0.05  # e4m3 keeps 3 mantissa bits: ~2-4% relative error on a dot product of random data


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(10, vocab - 10, (n,), generator=gen).tolist() for n in (1, 5, 17, 33, 64, 100)]


def _agreement(expected: list[list[int]], got: list[list[int]]) -> float:
    """Fraction of positions that agree before each sequence's first divergence."""
    same = 0
    for e, g in zip(expected, got):
        for a, b in zip(e, g):
            if a != b:
                break
            same += 1
    return same / max(1, sum(len(e) for e in expected))


def tiny_parity(device: torch.device) -> dict[str, Any]:
    """float32: tokenmill's greedy tokens must equal HF's exactly (CUDA graphs on and off, chunked
    prefill); bf16 and FP8 runs report their agreement with the matching reference."""
    gpu = device.type == "cuda"
    results: dict[str, Any] = {}
    for name, shape, block_size in (("head_dim64", TINY_64, 16), ("head_dim128", TINY_128, 32)):
        hf = build_hf_model(shape, torch.float32, device, init_std=0.1)
        prompts = _prompts(shape["vocab_size"])
        expected = hf_greedy(hf, prompts, MAX_TOKENS)
        common = dict(device=device.type, block_size=block_size, kv_cache_memory=64 << 20, max_model_len=512,
                      max_num_seqs=16)  # 5 CUDA graphs (1..16) instead of 20: the 6 prompts fit bucket 8
        modes = {"default": {}, "chunked_prefill": {"max_num_batched_tokens": 32}}
        if gpu:
            modes["eager"] = {"enforce_eager": True}
        entry: dict[str, Any] = {}
        for mode, extra in modes.items():
            got = engine_greedy(build_engine(hf, dtype="float32", **common, **extra), prompts, MAX_TOKENS)
            entry[f"float32_{mode}"] = {"exact": got == expected, "agreement": _agreement(expected, got)}
        if gpu:
            hf16 = copy.deepcopy(hf).to(torch.bfloat16)
            ref16 = hf_greedy(hf16, prompts, MAX_TOKENS)
            ours16 = engine_greedy(build_engine(hf, dtype="bfloat16", **common), prompts, MAX_TOKENS)
            entry["bfloat16_vs_hf_bf16"] = {"agreement": _agreement(ref16, ours16)}
            for label, extra in (("fp8_weights", {"quantization": "fp8"}), ("fp8_kv", {"kv_cache_dtype": "fp8"})):
                got = engine_greedy(build_engine(hf, dtype="bfloat16", **common, **extra), prompts, MAX_TOKENS)
                entry[f"{label}_vs_ours_bf16"] = {"agreement": _agreement(ours16, got)}
            del hf16
        results[name] = entry
        del hf
        gc.collect()
    results["passed"] = all(v["exact"] for e in results.values() if isinstance(e, dict)
                            for k, v in e.items() if k.startswith("float32"))
    return results


def _median_ms(fn: Any) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def fp8_linear_check(device: torch.device) -> dict[str, Any]:
    """FP8 weights on the 8B layer shapes: error against bf16, and M=1 timings (weight bandwidth)."""
    from tokenmill.kernels.triton.fp8_gemm import w8a16_gemm
    from tokenmill.quant.fp8 import dequantize_weight, quantize_weight, scaled_mm

    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)):
        w = torch.randn(n, k, device=device, generator=gen, dtype=torch.bfloat16) * 0.02
        row: dict[str, Any] = {"shape": [n, k]}
        for per_channel in (True, False):
            q, scale = quantize_weight(w, per_channel)
            tag = "per_channel" if per_channel else "per_tensor"
            for m in (1, 64):
                x = torch.randn(m, k, device=device, generator=gen, dtype=torch.bfloat16)
                ref = F.linear(x, w).float()
                deq = (x.float() @ dequantize_weight(q, scale).t())
                out = (w8a16_gemm(x, q, scale) if m == 1 else scaled_mm(x, q, scale)).float()
                row[f"{tag}_m{m}_rel_err_vs_bf16"] = float((out - ref).norm() / ref.norm())
                row[f"{tag}_m{m}_rel_err_vs_dequant"] = float((out - deq).norm() / deq.norm())
        row.update(_m1_timings(w, quantize_weight(w), torch.randn(1, k, device=device, generator=gen,
                                                                 dtype=torch.bfloat16)))
        rows.append(row)
    errors = [v for r in rows for key, v in r.items() if key.endswith("vs_bf16")]
    return {"layers": rows, "max_rel_err_vs_bf16": max(errors), "tolerance": FP8_REL_TOL,
            "passed": max(errors) < FP8_REL_TOL}


def _m1_timings(w: torch.Tensor, quantized: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> dict[str, float]:
    """One-row GEMM timings (decode at batch 1) and the weight bandwidth each reaches."""
    from tokenmill.kernels.triton.fp8_gemm import w8a16_gemm
    from tokenmill.quant.fp8 import scaled_mm

    q, scale = quantized
    nbytes = {"bf16_linear": 2 * w.numel(), "fp8_w8a16": q.numel(), "fp8_scaled_mm": q.numel()}
    fns = {"bf16_linear": lambda: F.linear(x, w), "fp8_w8a16": lambda: w8a16_gemm(x, q, scale),
           "fp8_scaled_mm": lambda: scaled_mm(x, q, scale)}
    out = {}
    for label, fn in fns.items():
        ms = _median_ms(fn)
        out[f"{label}_m1_us"] = ms * 1e3
        out[f"{label}_m1_GBps"] = nbytes[label] / ms / 1e6
    return out


def fp8_kv_check(device: torch.device) -> dict[str, Any]:
    """Attention of 8B-shaped heads over an FP8 cache against the same over a bf16 cache."""
    from tokenmill.attention.backend import AttentionMetadata
    from tokenmill.attention.triton_backend import TritonAttentionBackend

    gen = torch.Generator(device=device).manual_seed(1)
    heads, kv_heads, head_dim, block_size = 32, 8, 128, 16
    plan = [(1000, 1)] * 6 + [(0, 300), (200, 60)]  # (cached tokens, new tokens)
    blocks_per = [-(-(c + n) // block_size) for c, n in plan]
    num_blocks = sum(blocks_per)
    tables, slots, start = [], [], 0
    for (c, n), nb in zip(plan, blocks_per):
        table = list(range(start, start + nb))
        start += nb
        tables.append(table)
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(c + n))
    width = max(blocks_per)
    meta_all = AttentionMetadata(
        num_tokens=len(slots), block_size=block_size, query_start_loc=torch.tensor([0], device=device),
        seq_lens=torch.tensor([0], device=device), block_tables=torch.zeros(1, 1, dtype=torch.int64, device=device),
        slot_mapping=torch.tensor(slots, device=device), query_lens_list=[], seq_lens_list=[])
    k = torch.randn(len(slots), kv_heads, head_dim, device=device, generator=gen, dtype=torch.bfloat16)
    v = torch.randn(len(slots), kv_heads, head_dim, device=device, generator=gen, dtype=torch.bfloat16)
    q_lens = [n for _, n in plan]
    meta = AttentionMetadata(
        num_tokens=sum(q_lens), block_size=block_size,
        query_start_loc=torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), device=device),
        seq_lens=torch.tensor([c + n for c, n in plan], device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device),
        slot_mapping=torch.zeros(sum(q_lens), dtype=torch.int64, device=device),
        query_lens_list=q_lens, seq_lens_list=[c + n for c, n in plan])
    q = torch.randn(sum(q_lens), heads, head_dim, device=device, generator=gen, dtype=torch.bfloat16)
    outs = {}
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        shape = (kv_heads, num_blocks, block_size, head_dim)
        cache = (torch.zeros(shape, device=device).to(dtype), torch.zeros(shape, device=device).to(dtype))
        backend = TritonAttentionBackend()
        backend.write_kv(k, v, cache, meta_all)
        meta.scratch.clear()
        outs[dtype] = backend.forward(q, None, None, cache, meta, head_dim**-0.5).float()
    ref = outs[torch.bfloat16]
    rel = float((outs[torch.float8_e4m3fn] - ref).norm() / ref.norm())
    return {"rel_err_vs_bf16_cache": rel, "tolerance": FP8_REL_TOL, "passed": rel < FP8_REL_TOL}
