"""Greedy picks over materialized logits: the C kernel behind layer_ops.rows_max (kernels/cpu/layer_ops.c,
tm_rows_argmax: one pass for the maximum, one for its first place) against torch's max(dim=-1), which the sampler
used before, on float32 rows as wide as the default model's vocabulary, interleaved; the same ids and values
checked. The greedy rows of an int8 or int4 model's int8 vocabulary projection, and of a float32 one past the
int8 screen, go through it.

    .venv/bin/python benchmarks/rows_max.py [--rows 1,16,64] [--repeats 51]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokenmill.bench.results import write_json_report
from tokenmill.kernels.cpu.layer_ops import rows_max
from tokenmill.worker.capabilities import detect_capabilities

VOCAB = 49152


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,16,64")
    parser.add_argument("--repeats", type=int, default=51)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    print(f"machine: {detect_capabilities().summary()}")
    gen = torch.Generator().manual_seed(0)
    medians: dict[str, dict[str, float]] = {}
    print("\n| rows | torch max ms | rows_max ms | ratio |")
    print("|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, VOCAB, generator=gen)
        expected = x.max(dim=-1)
        values, ids = rows_max(x)
        if not (torch.equal(ids, expected.indices) and torch.equal(values, expected.values)):
            raise SystemExit(f"rows_max differs from torch's max at {rows} rows")
        fns = {"torch": lambda x=x: x.max(dim=-1), "rows_max": lambda x=x: rows_max(x)}
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        medians[str(rows)] = {name: statistics.median(t) * 1000 for name, t in times.items()}
        m = medians[str(rows)]
        print(f"| {rows} | {m['torch']:.3f} | {m['rows_max']:.3f} | {m['torch'] / m['rows_max']:.1f}x |")
    path = write_json_report({"args": vars(args), "medians_ms": medians}, "rows-max", args.output_json)
    print(f"\nreport: {path}")


if __name__ == "__main__":
    main()
