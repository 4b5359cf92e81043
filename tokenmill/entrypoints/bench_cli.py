"""`tokenmill bench ...` subcommands."""

from __future__ import annotations

import argparse
import json


def _cmd_throughput(args: argparse.Namespace) -> int:
    from tokenmill.bench.throughput import benchmark, write_report
    from tokenmill.entrypoints.cli import engine_kwargs

    args.engine_kwargs = {k: v for k, v in engine_kwargs(args).items() if k != "model"}
    report = benchmark(args)
    path = write_report(report, args.output_json)
    for name, result in report["results"].items():
        print(f"{name:>10}: {result['output_tok_per_s']:8.1f} output tok/s  {result['total_tok_per_s']:8.1f} total tok/s"
              f"  (median of {len(result['runs_s'])} runs: {result['median_s']:.2f} s)")
    if "ratio_vs_hf" in report:
        print(f"tokenmill / hf throughput ratio: {report['ratio_vs_hf']:.2f}x")
    print(f"report: {path}")
    if args.print_json:
        print(json.dumps(report, indent=2))
    return 0


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from tokenmill.entrypoints.cli import add_engine_args

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    tp = bench_sub.add_parser("throughput", help="offline throughput on random-token prompts (ignore_eos)")
    tp.add_argument("--num-prompts", type=int, default=64)
    tp.add_argument("--input-len", type=int, default=256)
    tp.add_argument("--output-len", type=int, default=128)
    tp.add_argument("--input-len-range", default=None, help="LOW:HIGH uniform prompt lengths (overrides --input-len)")
    tp.add_argument("--output-len-range", default=None, help="LOW:HIGH uniform output lengths (overrides --output-len)")
    tp.add_argument("--baseline", choices=["none", "hf"], default="none", help="also run HF transformers generate")
    tp.add_argument("--hf-max-batch-size", type=int, default=64, help="HF static batch size")
    tp.add_argument("--num-runs", type=int, default=3, help="timed runs per engine; the median is reported")
    tp.add_argument("--prompt-seed", type=int, default=0, help="seed for the random prompts")
    tp.add_argument("--output-json", default=None, help="where to write the JSON report")
    tp.add_argument("--print-json", action="store_true")
    add_engine_args(tp)
    tp.set_defaults(func=_cmd_throughput)
