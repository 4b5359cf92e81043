"""Two builds of the C kernels side by side: the default build and a variant built with extra compiler flags (a
compile-time tunable's other value, `-DNAME=VALUE`), each measured in a process of its own (its own kernel
libraries and execution plan, both cached per build), the builds alternated round by round (A B, B A, ...) so that
the machine's drift hits both alike. Per build and round, on the default model:

  decode R:  N = R prompts of --input-len random tokens, then --decode-tokens greedy tokens each; the medians over
             the pure decode steps of the C forward's time (the decoder) and of the whole step (the vocabulary
             projection and sampling included);
  prompt R:  the C forward's time of the step(s) that prefill those R prompts, per step (for the largest R).

Medians over rounds, the ratio default / variant for each (above 1: the variant is faster), and the machine.
The tunable must be one the sources define only where the build has not (`#ifndef NAME`), e.g. TM_PREFETCH_STREAMS,
BF16_DP_PREFETCH_MIN_ROWS, TM_PREFETCH_LINES. Processes of the same build differ by up to ~5% on the Zen 4 VM
(memory placement, drift between them): take several rounds, and prefer an in-process switch where one exists
(benchmarks/weight_prefetch.py).

    .venv/bin/python benchmarks/kernel_build_ab.py --variant-cflags=-DTM_PREFETCH_STREAMS=0 \
        [--rows 1,8,16,64] [--rounds 6] [--quantization none]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from step_split import time_c_forward, time_decode_steps  # this directory is on sys.path when run as a script

from tokenmill.bench.results import write_json_report
from tokenmill.kernels.cpu.build import EXTRA_CFLAGS_ENV
from tokenmill.worker.capabilities import detect_capabilities

RESULT_PREFIX = "kernel-build-ab result: "


def measure(args: argparse.Namespace) -> dict[str, float]:
    """One build's figures (this process's kernels), milliseconds by case."""
    from tokenmill import LLM, SamplingParams
    from tokenmill.bench.throughput import make_workload
    from tokenmill.worker.c_step import CStepForward

    rows = [int(r) for r in args.rows.split(",")]
    llm = LLM(model=None, quantization=args.quantization, enable_prefix_caching=False,
              kv_cache_memory=args.kv_cache_mib << 20)
    engine = llm.engine
    runner = engine.core.runner
    c_step = next((p for p in runner.step_paths if isinstance(p, CStepForward)), None)
    if c_step is None:
        raise SystemExit("no C forward on this machine: nothing to compare")
    forward_s: dict[str, list[float]] = defaultdict(list)
    step_s: list[float] = []
    time_c_forward(c_step, lambda kind, spent: forward_s[kind].append(spent))
    time_decode_steps(runner, step_s.append)
    params = SamplingParams(temperature=0.0, max_tokens=args.decode_tokens + 1, ignore_eos=True)
    llm.generate([[100] * 16], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    figures: dict[str, float] = {}
    for r in rows:
        prompts = make_workload(r, args.input_len, args.decode_tokens + 1, engine.vocab_size, r,
                                special_ids=set(engine.eos_token_ids)).prompts
        forward_s.clear()
        step_s.clear()
        llm.generate(prompts, [params] * r, use_tqdm=False)
        figures[f"decode {r}: C forward"] = statistics.median(forward_s["decode"]) * 1e3
        figures[f"decode {r}: whole step"] = statistics.median(step_s) * 1e3
        if r == max(rows):
            figures[f"prompt {r}: C forward per step"] = statistics.median(forward_s["prefill"]) * 1e3
    llm.close()
    return figures


def run_build(extra_cflags: str, args: argparse.Namespace) -> dict[str, float]:
    """measure() in a process whose kernels are built with extra_cflags added."""
    env = dict(os.environ)
    env[EXTRA_CFLAGS_ENV] = " ".join(f for f in (os.environ.get(EXTRA_CFLAGS_ENV, ""), extra_cflags) if f)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--rows", args.rows, "--quantization",
               args.quantization, "--input-len", str(args.input_len), "--decode-tokens", str(args.decode_tokens),
               "--kv-cache-mib", str(args.kv_cache_mib)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"the measuring process failed (flags {extra_cflags!r}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant-cflags", required=False, default="",
                        help="flags added to the variant build, e.g. -DBF16_DP_PREFETCH_MIN_ROWS=1000000")
    parser.add_argument("--rows", default="1,8,16,64", help="decode batch sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--quantization", default="none", choices=["none", "int8", "int4"])
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--kv-cache-mib", type=int, default=1024)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    if args.worker:
        print(RESULT_PREFIX + json.dumps(measure(args)), flush=True)
        return
    if not args.variant_cflags:
        parser.error("--variant-cflags is required")
    print(f"machine: {detect_capabilities().summary()}")
    builds = {"default": "", "variant": args.variant_cflags}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in builds}
    for r in range(args.rounds):
        for name in (("default", "variant") if r % 2 == 0 else ("variant", "default")):
            runs[name].append(run_build(builds[name], args))
            print(f"round {r + 1} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in runs[name][-1].items()),
                  flush=True)
    medians = {name: {case: statistics.median(run[case] for run in results) for case in results[0]}
               for name, results in runs.items()}
    print(f"\n| case (ms, median of {args.rounds}) | default | variant `{args.variant_cflags}` | default / variant |")
    print("|---|---|---|---|")
    for case, base in medians["default"].items():
        other = medians["variant"][case]
        print(f"| {case} | {base:.2f} | {other:.2f} | {base / other:.3f} |")
    path = write_json_report({"args": vars(args), "runs": runs, "medians": medians,
                              "machine": detect_capabilities().summary()}, "kernel-build-ab", args.output_json)
    print(f"\nreport: {path}")


if __name__ == "__main__":
    main()
