"""Data-parallel replicas on this machine, served side by side with one engine: `tokenmill serve` with one engine on
every core, and with --data-parallel-size D (the cores shared out), routed by prefix and by load alone. Each server
is started in turn, the rounds interleaved, and measured by the same client (tokenmill.bench.serve) on two workloads:

- W1: 64 random prompts of 256 tokens at once, 128 output tokens each (output tok/s);
- shared prefixes (vLLM's prefix_repetition shape): --num-prefixes prompts prefixes of --prefix-len tokens, each
  prompt one of them plus 64 tokens of its own, 32 output tokens, Poisson arrivals at --prefix-rate req/s (mean and
  p99 TTFT, output tok/s, and the prefix-cache hit rate the server's /metrics report for the run).

    .venv/bin/python benchmarks/data_parallel.py [--dp 2] [--rounds 2] [--prefix-len 1024] [--num-prefixes 8]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from tokenmill.bench.results import write_json_report
from tokenmill.bench.serve import ServeBenchConfig, benchmark, load_default_tokenizer
from tokenmill.bench.server_process import free_port, running_server
from tokenmill.worker.capabilities import detect_capabilities


def _prefix_counters(base_url: str) -> tuple[float, float]:
    text = httpx.get(base_url + "/metrics", timeout=10).text

    def value(name: str) -> float:
        match = re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    return value("tokenmill:prefix_cache_queries_total"), value("tokenmill:prefix_cache_hits_total")


def _measure(name: str, serve_args: list[str], args: argparse.Namespace, tokenizer: Any, log_dir: Path,
             round_index: int) -> dict[str, float]:
    port = free_port()
    cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--port", str(port), *serve_args]
    with running_server(name, cmd, port, log_dir / f"{name}-{round_index}.log", dict(os.environ),
                        startup_timeout_s=900) as server:
        common = {"base_url": server.base_url, "percentiles": [50.0, 99.0]}
        benchmark(ServeBenchConfig(num_prompts=4, input_len=64, output_len=8, seed=99, **common), tokenizer)
        w1 = benchmark(ServeBenchConfig(num_prompts=64, input_len=256, output_len=128, seed=11 + round_index,
                                        **common), tokenizer)
        queries0, hits0 = _prefix_counters(server.base_url)
        shared = benchmark(ServeBenchConfig(
            num_prompts=args.prefix_prompts, input_len=64, output_len=32, prefix_len=args.prefix_len,
            num_prefixes=args.num_prefixes, request_rate=args.prefix_rate, seed=21 + round_index, **common), tokenizer)
        queries1, hits1 = _prefix_counters(server.base_url)
    for report in (w1, shared):
        if report["failed"]:
            raise RuntimeError(f"{name}: {report['failed']} requests failed: {report['errors'][:3]}")
    return {
        "w1_output_tok_s": w1["output_throughput"],
        "prefix_output_tok_s": shared["output_throughput"],
        "prefix_mean_ttft_ms": shared["mean_ttft_ms"],
        "prefix_p99_ttft_ms": shared["p99_ttft_ms"],
        "prefix_hit_rate": (hits1 - hits0) / max(queries1 - queries0, 1.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--num-prefixes", type=int, default=8)
    parser.add_argument("--prefix-prompts", type=int, default=64)
    parser.add_argument("--prefix-rate", type=float, default=4.0, help="requests/s of the shared-prefix workload")
    parser.add_argument("--serve-args", default="", help="extra `tokenmill serve` arguments for every server")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    print(f"machine: {detect_capabilities().summary()}")
    extra = args.serve_args.split()
    configs = {
        "one engine": extra,
        f"dp={args.dp} prefix": [*extra, "--data-parallel-size", str(args.dp)],
        f"dp={args.dp} load": [*extra, "--data-parallel-size", str(args.dp), "--data-parallel-routing", "load"],
    }
    tokenizer = load_default_tokenizer()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory(prefix="tokenmill-dp-") as tmp:
        for round_index in range(args.rounds):
            for name, serve_args in configs.items():
                runs[name].append(_measure(name.replace(" ", "-").replace("=", ""), serve_args, args, tokenizer,
                                           Path(tmp), round_index))
                print(f"{name}: {runs[name][-1]}", flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    base = med["one engine"]
    print(f"\nmedian of {args.rounds} rounds; ratios against one engine\n")
    print("| server | W1 output tok/s | shared prefixes: output tok/s | mean TTFT ms | p99 TTFT ms | prefix hit rate |")
    print("|---|---|---|---|---|---|")
    for name, m in med.items():
        print(f"| {name} | {m['w1_output_tok_s']:.1f} ({m['w1_output_tok_s'] / base['w1_output_tok_s']:.2f}x) "
              f"| {m['prefix_output_tok_s']:.1f} ({m['prefix_output_tok_s'] / base['prefix_output_tok_s']:.2f}x) "
              f"| {m['prefix_mean_ttft_ms']:.0f} ({m['prefix_mean_ttft_ms'] / base['prefix_mean_ttft_ms']:.2f}x) "
              f"| {m['prefix_p99_ttft_ms']:.0f} ({m['prefix_p99_ttft_ms'] / base['prefix_p99_ttft_ms']:.2f}x) "
              f"| {m['prefix_hit_rate']:.3f} |")
    path = write_json_report({"args": vars(args), "machine": detect_capabilities().summary(), "runs": runs,
                              "median": med}, "data-parallel", args.output_json)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
