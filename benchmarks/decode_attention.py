"""One layer's decode attention on this machine, per K/V cache dtype: the C decode kernel (paged_attention.c) over
the default model's heads (9 query / 3 KV heads of 64 dims) for a W1-like batch of 64 requests, each row reading its
own blocks of 16 positions (`--block-order`: sequential, as a fresh cache hands them out, or shuffled, each block
at a random place in the pool, as a pool that has turned over many times may hand them out). Two regimes:

  in cache:    one layer's cache, 128 positions a request (~6 MB of float16 K/V): the kernel's compute;
  from memory: 30 layers' caches, 320 positions a request, attended layer after layer (~470 MB of float16 K/V):
               what a W1 decode step streams.

Median milliseconds per layer over interleaved rounds, and the ratio against float16 (the bf16 model's cache
before bfloat16 tiles). bfloat16 multiplies the tiles as they lie only where the CPU has AVX512-BF16, on AMX tiles
where it has AMX-BF16 too, else on vdpbf16ps (both printed).

    .venv/bin/python benchmarks/decode_attention.py [--rounds 5] [--dtypes float16,bfloat16,int8,float32]
        [--block-order sequential,shuffled]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.bench.results import write_json_report
from tokenmill.kernels.cpu.kv_cache import quantize_kv_rows
from tokenmill.kernels.cpu.paged_attention import bf16_cache_on_amx, bf16_cache_products, paged_decode_attention
from tokenmill.worker.capabilities import detect_capabilities

REQUESTS, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 64, 9, 3, 64, 16
REGIMES = {"in cache": (128, 1), "from memory": (320, 30)}  # positions a request, layers


def _caches(dtype: torch.dtype, positions: int, layers: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    blocks = REQUESTS * -(-positions // BLOCK)
    shape = TorchAttentionBackend().kv_cache_shape(blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype)
    gen = torch.Generator().manual_seed(0)

    def make() -> torch.Tensor:  # bfloat16: random values, so the tile order does not matter here
        values = torch.randn(*shape[:-1], HEAD_DIM, generator=gen)
        return quantize_kv_rows(values) if dtype == torch.int8 else values.to(dtype)

    return [(make(), make()) for _ in range(layers)], blocks


def _time_layer(dtype: torch.dtype, positions: int, layers: int, calls: int, order: str) -> float:
    """Median ms per layer of `calls` passes over the layers' caches, the requests' blocks in `order`."""
    caches, blocks = _caches(dtype, positions, layers)
    ids = torch.randperm(blocks, generator=torch.Generator().manual_seed(0)) if order == "shuffled" else \
        torch.arange(blocks)
    tables = ids.to(torch.int64).view(REQUESTS, -1).contiguous()
    query = torch.randn(REQUESTS, HEADS, HEAD_DIM)
    out = torch.empty_like(query)
    rows = torch.arange(REQUESTS, dtype=torch.int64)
    seq_lens = torch.full((REQUESTS,), positions, dtype=torch.int64)
    times = []
    for _ in range(calls + 1):  # the first pass warms up
        start = time.perf_counter()
        for cache in caches:
            paged_decode_attention(out, query, cache, rows, seq_lens, tables, HEAD_DIM**-0.5)
        times.append((time.perf_counter() - start) / layers * 1e3)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5, help="passes over the caches per round")
    parser.add_argument("--dtypes", default="float16,bfloat16,int8,float32")
    parser.add_argument("--block-order", default="sequential", help="comma list of sequential, shuffled")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    orders = args.block_order.split(",")
    if not set(orders) <= {"sequential", "shuffled"}:
        parser.error(f"--block-order: sequential and/or shuffled, got {args.block_order}")
    print(f"machine: {detect_capabilities().summary()}")
    print(f"bfloat16 tiles multiplied as they lie (AVX512-BF16): {bf16_cache_products(BLOCK, HEAD_DIM)}; "
          f"on AMX tiles: {bf16_cache_on_amx(HEADS, KV_HEADS, BLOCK, HEAD_DIM)}")
    samples: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for regime, (positions, layers) in REGIMES.items():
            for order in orders:
                for dtype in dtypes:  # interleaved: every dtype and order once per round and regime
                    key = f"{regime} {order} {str(dtype).removeprefix('torch.')}"
                    samples.setdefault(key, []).append(_time_layer(dtype, positions, layers, args.calls, order))
    medians = {k: statistics.median(v) for k, v in samples.items()}
    print(f"\n| regime | blocks | cache dtype | ms per layer (median of {args.rounds}) | vs float16 |")
    print("|---|---|---|---|---|")
    for regime in REGIMES:
        for order in orders:
            base = medians.get(f"{regime} {order} float16")
            for dtype in dtypes:
                name = str(dtype).removeprefix("torch.")
                ms = medians[f"{regime} {order} {name}"]
                ratio = f"{base / ms:.2f}x" if base else "-"
                print(f"| {regime} | {order} | {name} | {ms:.3f} | {ratio} |")
    path = write_json_report({"ms_per_layer": medians, "samples": samples}, "decode-attention", args.output_json)
    print(f"\nreport: {path}")


if __name__ == "__main__":
    main()
