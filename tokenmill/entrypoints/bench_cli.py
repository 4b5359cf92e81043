"""`tokenmill bench ...` subcommands."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def _cmd_throughput(args: argparse.Namespace) -> int:
    from tokenmill.bench.results import write_json_report
    from tokenmill.bench.throughput import benchmark
    from tokenmill.entrypoints.cli import engine_kwargs

    args.engine_kwargs = {k: v for k, v in engine_kwargs(args).items() if k != "model"}
    # Every timed run sends the same prompts: with prefix caching, runs after the first would skip
    # their prefill and the median would flatter tokenmill. Off unless asked for.
    args.engine_kwargs.setdefault("enable_prefix_caching", False)
    report = benchmark(args)
    path = write_json_report(report, "throughput", args.output_json)
    print(f"machine: {report['machine']}")
    for name, result in report["results"].items():
        print(f"{name:>10}: {result['output_tok_per_s']:8.1f} output tok/s  {result['total_tok_per_s']:8.1f} total tok/s"
              f"  (median of {len(result['runs_s'])} runs: {result['median_s']:.2f} s)")
    if "ratio_vs_hf" in report:
        print(f"tokenmill / hf throughput ratio: {report['ratio_vs_hf']:.2f}x")
    if "profile" in report:
        from tokenmill.engine.step_timer import format_breakdown

        print(f"step-time breakdown of tokenmill, summed over the {len(report['results']['tokenmill']['runs_s'])} "
              "timed runs:")
        print(format_breakdown(report["profile"]))
    print(f"report: {path}")
    if args.print_json:
        print(json.dumps(report, indent=2))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from tokenmill.bench.results import write_json_report
    from tokenmill.bench.serve import ServeBenchConfig, ServerError, benchmark, print_report
    from tokenmill.bench.serve_metrics import parse_goodput, parse_percentiles
    from tokenmill.bench.throughput import parse_range

    try:
        extra_body = json.loads(args.extra_body) if args.extra_body else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"--extra-body is not valid JSON: {exc}") from None
    if not isinstance(extra_body, dict):
        raise ValueError("--extra-body must be a JSON object")  # noqa: TRY004 - main() reports ValueError
    config = ServeBenchConfig(
        base_url=args.base_url, endpoint=args.endpoint, model=args.model, api_key=args.api_key,
        request_rate=args.request_rate, burstiness=args.burstiness, num_prompts=args.num_prompts,
        input_len=args.input_len, output_len=args.output_len, input_len_range=parse_range(args.input_len_range),
        prefix_len=args.prefix_len, num_prefixes=args.num_prefixes,
        output_len_range=parse_range(args.output_len_range), max_concurrency=args.max_concurrency, seed=args.seed,
        tokenizer=args.tokenizer, goodput_slos_ms=parse_goodput(args.goodput),
        percentiles=parse_percentiles(args.percentiles), warmup=args.warmup,
        request_timeout_s=args.request_timeout, extra_body=extra_body,
    )
    try:
        report = benchmark(config)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_report(report)
    path = write_json_report(report, "serve", args.output_json)
    print(f"machine (the client's): {report['machine']}")
    print(f"report: {path}")
    if args.print_json:
        print(json.dumps(report, indent=2))
    if report["completed"] == 0:
        print(f"error: all {report['failed']} requests failed; first error: {report['errors'][0]}", file=sys.stderr)
        return 1
    return 0


def _add_serve_parser(bench_sub: argparse._SubParsersAction) -> None:
    sv = bench_sub.add_parser(
        "serve", help="online serving benchmark against any OpenAI-compatible server (streaming, ignore_eos)",
    )
    sv.add_argument("--base-url", default="http://127.0.0.1:8000", help="server URL (with or without /v1)")
    sv.add_argument("--endpoint", choices=["/v1/completions", "/v1/chat/completions"], default="/v1/completions")
    sv.add_argument("--model", default=None, help="model name sent in requests (default: the first at /v1/models)")
    sv.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                    help="bearer token (default: $OPENAI_API_KEY)")
    sv.add_argument("--request-rate", type=float, default=math.inf,
                    help="requests per second, gamma/Poisson arrivals (default: inf = all at once)")
    sv.add_argument("--burstiness", type=float, default=1.0,
                    help="gamma shape of inter-arrival times: 1 = Poisson, <1 burstier, >1 more uniform")
    sv.add_argument("--num-prompts", type=int, default=100)
    sv.add_argument("--input-len", type=int, default=256, help="prompt length in tokens")
    sv.add_argument("--output-len", type=int, default=128, help="tokens generated per request (ignore_eos)")
    sv.add_argument("--input-len-range", default=None, help="LOW:HIGH uniform prompt lengths (overrides --input-len)")
    sv.add_argument("--prefix-len", type=int, default=0,
                    help="shared prefix tokens before each prompt's own --input-len tokens (default: 0, none)")
    sv.add_argument("--num-prefixes", type=int, default=1, help="distinct shared prefixes, used in turn")
    sv.add_argument("--output-len-range", default=None, help="LOW:HIGH uniform output lengths (overrides --output-len)")
    sv.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    sv.add_argument("--seed", type=int, default=0, help="seed of the prompts and the arrival times")
    sv.add_argument("--tokenizer", default=None,
                    help="tokenizer directory (or hub name) for the prompts (default: --model if a local "
                         "directory, else the embedded default model's)")
    sv.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                    help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000 (milliseconds)")
    sv.add_argument("--percentiles", default="50,90,99", help="comma-separated latency percentiles to report")
    sv.add_argument("--warmup", type=int, default=0, help="untimed requests sent before the run")
    sv.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request counts as failed")
    sv.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    sv.add_argument("--output-json", default=None, help="where to write the JSON report "
                                                        "(default: benchmarks/results/serve-<timestamp>.json)")
    sv.add_argument("--print-json", action="store_true")
    sv.set_defaults(func=_cmd_serve)


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
    tp.add_argument("--profile", action="store_true",
                    help="time each step phase (schedule, inputs, forward, sampling, updates) and report the breakdown")
    add_engine_args(tp)
    tp.set_defaults(func=_cmd_throughput)
    _add_serve_parser(bench_sub)
