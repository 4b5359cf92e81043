"""The float32 panel GEMM (kernels/cpu/f32_gemm.c) against torch's GEMM (MKL), and the int8 layer
(quant/int8_cpu.py: kernels/cpu/int8_gemm.c, per-token quantization included) with 8-bit activations
(W8A8) and 7-bit ones (W8A7, the paired tile), at the default model's projection shapes, interleaved in
one process: GFLOP/s (int8: GOP/s) of y = x W^T, median over rounds, and the ratios panels / torch,
int8 / panels and int8 7-bit / int8.

Shapes: every SmolLM2-135M projection (qkv 960 x 576, o 576 x 576, gate_up 3072 x 576, down 576 x 1536,
lm_head 49152 x 576) at 1, 8, 64, 256 and 2048 rows (batch-1 decode, decode batches, a prefill chunk).
torch's side is F.linear (x @ W^T, as nn.Linear runs it); both allocate their output per call, as
the model's layers do. Each round times each kernel `--calls` times back to back and keeps the median.

    .venv/bin/python benchmarks/panel_gemm.py --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from tokenmill.bench.results import write_json_report
from tokenmill.kernels.cpu.f32_gemm import f32_panels_available, pack_panels, panels_linear
from tokenmill.quant.int8_cpu import Int8DynamicLinear

PROJECTIONS = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536),
               "lm_head": (49152, 576)}
ROWS = (1, 8, 64, 256, 2048)


def _median_seconds(fn: Callable[[], Any], calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    if not f32_panels_available():
        raise SystemExit("the C kernels cannot be built here (no compiler)")
    gen = torch.Generator().manual_seed(0)
    results: dict[str, Any] = {"args": vars(args), "threads": torch.get_num_threads(), "shapes": []}
    print(f"{'projection':>10} {'rows':>5} {'panels GFLOP/s':>15} {'torch GFLOP/s':>14} {'ratio':>6} "
          f"{'int8 GOP/s':>11} {'int8/panels':>12} {'7-bit GOP/s':>12} {'7-bit/int8':>11}")
    for name, (n, k) in PROJECTIONS.items():
        weight = torch.randn(n, k, generator=gen) * 0.05
        panels = pack_panels(weight)
        int8_layer = Int8DynamicLinear(weight, None)
        int8_a7_layer = Int8DynamicLinear(weight, None, activation_bits=7)
        for rows in (int(r) for r in args.rows.split(",")):
            if name == "lm_head" and rows > 256:
                continue  # only sampled rows reach the vocabulary projection
            x = torch.randn(rows, k, generator=gen)
            kernels: dict[str, Callable[[], Any]] = {
                "panels": lambda x=x, p=panels, n=n: panels_linear(x, p, n),
                "torch": lambda x=x, w=weight: F.linear(x, w),
                "int8": lambda x=x, layer=int8_layer: layer(x),
                "int8_a7": lambda x=x, layer=int8_a7_layer: layer(x),
            }
            for fn in kernels.values():
                fn()  # warm-up
            seconds: dict[str, list[float]] = {key: [] for key in kernels}
            for r in range(args.rounds):
                for key in (list(kernels) if r % 2 == 0 else list(reversed(kernels))):
                    seconds[key].append(_median_seconds(kernels[key], args.calls))
            flops = 2 * rows * n * k
            rate = {key: flops / statistics.median(s) / 1e9 for key, s in seconds.items()}
            results["shapes"].append({"projection": name, "n": n, "k": k, "rows": rows, "seconds": seconds,
                                      "gflops": rate, "ratio": rate["panels"] / rate["torch"],
                                      "int8_ratio": rate["int8"] / rate["panels"],
                                      "int8_a7_ratio": rate["int8_a7"] / rate["int8"]})
            print(f"{name:>10} {rows:>5} {rate['panels']:>15.1f} {rate['torch']:>14.1f} "
                  f"{rate['panels'] / rate['torch']:>5.2f}x {rate['int8']:>11.1f} "
                  f"{rate['int8'] / rate['panels']:>11.2f}x {rate['int8_a7']:>12.1f} "
                  f"{rate['int8_a7'] / rate['int8']:>10.2f}x", flush=True)
    path = write_json_report(results, "panel-gemm", args.output_json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
