"""The CPU performance report in one command: machine ceilings, offline throughput (equal and mixed
lengths), batch-1 decode and serving latency of tokenmill (fp32, `--quantization int8` and `int4`) against HF
transformers, roofline fractions and the pass/fail table of the targets.

Sections (`--sections`, all by default, run in this order):
  machine  fp32 GEMM peak (2048^3 matmul) and the GEMM rate at the model's decode shapes (M = 64
           and M = 1 rows x hidden @ hidden x 2*intermediate), read and copy bandwidth over 256 MiB
           buffers, CPU model, SIMD flags, cores, torch version (tokenmill/bench/machine.py).
  w1       64 prompts x 256 random tokens in, 128 out, ignore_eos.
  mixed    64 prompts, input lengths uniform in 32..512, outputs uniform in 16..256.
  batch1   one 256-token prompt, 128 output tokens. Decode tok/s = 127 / (time of the 128-token
           run - time of a 1-token run of the same prompt), i.e. the prefill is excluded; end-to-end
           tok/s = 128 / time of the 128-token run.
  serve    `tokenmill serve` started as a subprocess on a free port (`--serve-quantization`), the
           serving benchmark client (tokenmill/bench/serve.py) in this process: 60 prompts of 256
           tokens, 128 out, Poisson arrivals at 1 request/s, 2 untimed warm-up requests; `--runs`
           runs against the one server (seeds 0, 10, 20, ...), p50/p99 TTFT and TPOT of each run
           over its requests, and the median of each over the runs. The server is stopped with SIGTERM
           (killed after 30 s) whatever happens, and its exit status is recorded.
The offline sections (w1, mixed, batch1) share one set of engines, built once and warmed up:
tokenmill fp32, int8 and int4 (prefix caching off, so every run recomputes its prompts, and a KV cache
sized so no workload is preempted) and the HF model in fp32 (`generate` as a static batch of up to
64, left-padded, as in `tokenmill bench throughput`). The engines run interleaved, their order
rotating each run, and every figure is the median of `--runs` runs (default 3).

Roofline fractions: FLOPs of a workload = 2 x decoder matmul parameters x processed tokens (prompt
tokens + output tokens - one per prompt, whose last token is never fed back) + 2 x hidden x vocab x
sampled rows (one per output token), attention products left out; divided by the median time and by
the measured GEMM peak. Batch-1 decode: weight bytes read per step (fp32: 4 bytes per parameter;
int8: 1 byte per decoder matmul and lm_head weight + a 4-byte scale per output channel, norms fp32)
x decode tok/s, divided by the measured read bandwidth.

Writes benchmarks/results/cpu-report-<timestamp>.json (every raw run; rewritten after each
section) and .md (the tables, also printed).

    .venv/bin/python benchmarks/cpu_report.py                          # everything
    .venv/bin/python benchmarks/cpu_report.py --sections machine,batch1 --runs 5
    .venv/bin/python benchmarks/cpu_report.py --quick --runs 1         # tiny workloads, a smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
from cpu_report_md import evaluate_targets, markdown  # this directory is on sys.path when run as a script

from tokenmill.bench.machine import ModelCosts, measure_machine
from tokenmill.bench.server_process import ServerProcess, free_port, running_server
from tokenmill.bench.throughput import Workload, build_hf_model, make_workload, run_hf, run_tokenmill

SECTIONS = ("machine", "w1", "mixed", "batch1", "serve")
OFFLINE_SECTIONS = ("w1", "mixed", "batch1")
QUANTIZATIONS = {"tokenmill fp32": "none", "tokenmill int8": "int8", "tokenmill int4": "int4"}
HF = "hf"
HF_MAX_BATCH = 64
SERVE_SLOS_MS = {"ttft": 500.0, "tpot": 100.0}
T = TypeVar("T")


@dataclass(frozen=True)
class WorkloadSpec:
    num_prompts: int
    input_len: int
    output_len: int
    input_range: tuple[int, int] | None = None  # uniform LOW..HIGH, overrides input_len
    output_range: tuple[int, int] | None = None
    seed: int = 0

    def build(self, vocab_size: int, special_ids: set[int]) -> Workload:
        return make_workload(self.num_prompts, self.input_len, self.output_len, vocab_size, self.seed,
                             self.input_range, self.output_range, special_ids)

    @property
    def max_tokens(self) -> int:
        """Most KV tokens the workload holds at once (every request at full length)."""
        longest_in = self.input_range[1] if self.input_range else self.input_len
        longest_out = self.output_range[1] if self.output_range else self.output_len
        return self.num_prompts * (longest_in + longest_out)

    def describe(self) -> str:
        inp = "{}..{}".format(*self.input_range) if self.input_range else str(self.input_len)
        out = "{}..{}".format(*self.output_range) if self.output_range else str(self.output_len)
        return f"{self.num_prompts} x {inp} in / {out} out"


@dataclass(frozen=True)
class Plan:
    w1: WorkloadSpec
    mixed: WorkloadSpec
    batch1: WorkloadSpec
    serve: WorkloadSpec
    serve_rate: float  # requests/s, Poisson
    serve_warmup: int
    gemm_square: int
    buffer_bytes: int
    machine_repeats: int


FULL_PLAN = Plan(
    w1=WorkloadSpec(64, 256, 128), mixed=WorkloadSpec(64, 0, 0, (32, 512), (16, 256), seed=1),
    batch1=WorkloadSpec(1, 256, 128, seed=2), serve=WorkloadSpec(60, 256, 128), serve_rate=1.0, serve_warmup=2,
    gemm_square=2048, buffer_bytes=256 << 20, machine_repeats=7,
)
QUICK_PLAN = Plan(
    w1=WorkloadSpec(4, 16, 8), mixed=WorkloadSpec(4, 0, 0, (8, 32), (2, 8), seed=1),
    batch1=WorkloadSpec(1, 16, 8, seed=2), serve=WorkloadSpec(4, 16, 8), serve_rate=8.0, serve_warmup=1,
    gemm_square=256, buffer_bytes=16 << 20, machine_repeats=3,
)


def make_plan(args: argparse.Namespace) -> Plan:
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    if args.num_prompts is not None:
        plan = replace(plan, w1=replace(plan.w1, num_prompts=args.num_prompts),
                       mixed=replace(plan.mixed, num_prompts=args.num_prompts))
    if args.serve_prompts is not None:
        plan = replace(plan, serve=replace(plan.serve, num_prompts=args.serve_prompts))
    return plan


def log(message: str) -> None:
    print(f"[cpu-report {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def describe_run(value: Any) -> str:
    """A run's seconds (or named seconds) for the progress log."""
    if isinstance(value, dict):
        return ", ".join(f"{key} {seconds:.3f}" for key, seconds in value.items())
    return f"{value:.3f} s"


def interleaved(runners: dict[str, Callable[[], T]], num_runs: int, label: str) -> dict[str, list[T]]:
    """Each run calls every runner once, the order rotating by one each run so drift hits all alike."""
    names = list(runners)
    results: dict[str, list[T]] = {name: [] for name in names}
    for r in range(num_runs):
        for name in names[r % len(names):] + names[: r % len(names)]:
            results[name].append(runners[name]())
            log(f"{label} run {r + 1}/{num_runs} {name}: {describe_run(results[name][-1])}")
    return results


# ---- engines --------------------------------------------------------------------------------------

class Engines:
    """tokenmill fp32, int8 and int4 and (unless skipped) the HF model on the same weights, built once and
    warmed up for the offline sections."""

    def __init__(self, model: str | None, loaded: Any, skip_hf: bool, kv_cache_memory: int) -> None:
        from tokenmill import LLM

        self.engine_args = {"enable_prefix_caching": False, "kv_cache_memory": kv_cache_memory}
        self.llms = {name: LLM(model=model, quantization=q, **self.engine_args) for name, q in QUANTIZATIONS.items()}
        first = next(iter(self.llms.values()))
        self.vocab_size = int(first.engine.vocab_size)
        tokenizer = first.tokenizer
        self.special_ids = set(getattr(tokenizer, "all_special_ids", []) or []) | set(first.engine.eos_token_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.hf = None if skip_hf else build_hf_model(loaded)
        warmup = make_workload(2, 16, 4, self.vocab_size, 12345, special_ids=self.special_ids)
        for runner in self.runners(warmup, len(warmup.prompts)).values():
            runner()

    def runners(self, workload: Workload, hf_batch: int) -> dict[str, Callable[[], float]]:
        runners = {name: partial(run_tokenmill, llm, workload) for name, llm in self.llms.items()}
        if self.hf is not None:
            runners[HF] = partial(run_hf, self.hf, workload, self.pad_id, hf_batch)
        return runners


def offline_kv_bytes(plan: Plan, costs: ModelCosts, block_size: int = 16) -> int:
    """A KV cache that holds every offline workload at full length (no preemption), plus a block of
    rounding per request."""
    tokens = max(s.max_tokens + s.num_prompts * block_size for s in (plan.w1, plan.mixed, plan.batch1))
    return max(64 << 20, int(tokens * costs.kv_bytes_per_token * 1.05))


# ---- offline sections -----------------------------------------------------------------------------

def throughput_section(
    engines: Engines, spec: WorkloadSpec, num_runs: int, costs: ModelCosts, machine: dict[str, Any] | None,
    label: str,
) -> dict[str, Any]:
    workload = spec.build(engines.vocab_size, engines.special_ids)
    runs = interleaved(engines.runners(workload, HF_MAX_BATCH), num_runs, label)
    processed = workload.num_prompt_tokens + workload.num_output_tokens - len(workload.prompts)
    flops = costs.workload_flops(processed, workload.num_output_tokens)
    peak = machine["gemm_peak_gflops"] if machine else None
    results = {}
    for name, times in runs.items():
        median_s = statistics.median(times)
        gflops = flops / median_s / 1e9
        results[name] = {
            "runs_s": times, "median_s": median_s,
            "output_tok_per_s": workload.num_output_tokens / median_s,
            "total_tok_per_s": (workload.num_output_tokens + workload.num_prompt_tokens) / median_s,
            "gflops": gflops, "gemm_peak_fraction": gflops / peak if peak else None,
        }
    if HF in results:
        for result in results.values():
            result["ratio_vs_hf"] = results[HF]["median_s"] / result["median_s"]
    return {"workload": {**asdict(spec), "description": spec.describe(), "prompt_tokens": workload.num_prompt_tokens,
                         "output_tokens": workload.num_output_tokens, "processed_tokens": processed},
            "flops": flops, "results": results}


def batch1_section(
    engines: Engines, spec: WorkloadSpec, num_runs: int, costs: ModelCosts, machine: dict[str, Any] | None,
) -> dict[str, Any]:
    full = spec.build(engines.vocab_size, engines.special_ids)
    first = Workload(full.prompts, [1])
    full_runners, first_runners = engines.runners(full, 1), engines.runners(first, 1)

    def pair(name: str) -> Callable[[], dict[str, float]]:
        return lambda: {"first_s": first_runners[name](), "full_s": full_runners[name]()}

    runs = interleaved({name: pair(name) for name in full_runners}, num_runs, "batch1")
    read_bw = machine["read_GBps"] if machine else None
    results = {name: batch1_result(r, spec.output_len, costs.decode_weight_bytes(QUANTIZATIONS.get(name, "none")),
                                   read_bw) for name, r in runs.items()}
    if HF in results:
        for result in results.values():
            for key in ("decode_tok_per_s", "e2e_tok_per_s"):
                ours, theirs = result[key], results[HF][key]
                result[f"{key.removesuffix('_tok_per_s')}_ratio_vs_hf"] = ours / theirs if ours and theirs else None
    return {"workload": {**asdict(spec), "description": spec.describe()}, "results": results}


def batch1_result(runs: list[dict[str, float]], output_len: int, weight_bytes: int,
                  read_bw: float | None) -> dict[str, Any]:
    decode_s = statistics.median(r["full_s"] - r["first_s"] for r in runs)
    decode_rate = (output_len - 1) / decode_s if decode_s > 0 else None  # else lost in the noise
    gbps = weight_bytes * decode_rate / 1e9 if decode_rate else None
    return {
        "runs": runs, "decode_s": decode_s, "decode_tok_per_s": decode_rate,
        "e2e_tok_per_s": output_len / statistics.median(r["full_s"] for r in runs),
        "ttft_s": statistics.median(r["first_s"] for r in runs), "weight_bytes_per_step": weight_bytes,
        "weight_GBps": gbps, "read_bw_fraction": gbps / read_bw if gbps and read_bw else None,
    }


# ---- serving --------------------------------------------------------------------------------------

# --serve-quantization: the served engine's flags.
SERVE_QUANTIZATIONS = {
    "none": ["--quantization", "none"], "int8": ["--quantization", "int8"],
    "int8-a7": ["--quantization", "int8", "--int8-activation-bits", "7"],
}


def tokenmill_command(model: str | None, quantization: str, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "--log-level", "WARNING", "serve", "--port", str(port)]
    return cmd + (["--model", model] if model else []) + SERVE_QUANTIZATIONS[quantization]


@contextmanager
def tokenmill_server(model: str | None, quantization: str, log_dir: str) -> Iterator[ServerProcess]:
    port = free_port()
    with running_server("tokenmill serve", tokenmill_command(model, quantization, port), port,
                        Path(log_dir) / "server.log") as server:
        yield server


def serve_section(model: str | None, quantization: str, plan: Plan, tokenizer: Any, num_runs: int) -> dict[str, Any]:
    """num_runs benchmark runs against one server, the i-th with seed spec.seed + 10 i for its prompts and
    arrivals (so the median is over arrival patterns as well as machine noise; the warm-up's seed + 1
    never repeats a later run's prompts into the prefix cache); the summary holds each figure's median."""
    from tokenmill.bench.serve import ServeBenchConfig, benchmark
    from tokenmill.bench.serve_metrics import percentile_key

    spec = plan.serve
    keys = [f"{percentile_key(p)}_{m}_ms" for m in ("ttft", "tpot") for p in (50.0, 99.0)]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cpu-report-serve-") as log_dir, \
            tokenmill_server(model, quantization, log_dir) as server:
        for i in range(num_runs):
            config = ServeBenchConfig(
                base_url=server.base_url, num_prompts=spec.num_prompts, input_len=spec.input_len,
                output_len=spec.output_len, request_rate=plan.serve_rate, seed=spec.seed + 10 * i,
                goodput_slos_ms=dict(SERVE_SLOS_MS), percentiles=[50.0, 90.0, 99.0], warmup=plan.serve_warmup,
            )
            log(f"serve run {i + 1}/{num_runs}: {spec.describe()} at {plan.serve_rate} req/s against {server.base_url}")
            runs.append(benchmark(config, tokenizer))
            log(f"serve run {i + 1}/{num_runs}: " + ", ".join(f"{k} {runs[-1][k]:.0f}" for k in keys))
    summary: dict[str, Any] = {k: sum(r[k] for r in runs) for k in ("completed", "failed")}
    summary.update({k: statistics.median(r[k] for r in runs) for k in ("output_throughput", "request_goodput", *keys)})
    return {
        "workload": {**asdict(spec), "description": spec.describe(), "request_rate": plan.serve_rate,
                     "warmup": plan.serve_warmup},
        "quantization": quantization, "server": server.summary(), "num_runs": num_runs,
        "summary": summary, "runs": [{k: r[k] for k in ("completed", "failed", *keys)} for r in runs], "raw": runs,
    }


# ---- the run --------------------------------------------------------------------------------------

def run_sections(args: argparse.Namespace, plan: Plan, report: dict[str, Any], loaded: Any, costs: ModelCosts,
                 save: Callable[[], None]) -> None:
    """Runs the chosen sections in order, saving the JSON after each."""
    results, wanted = report["sections"], args.sections
    if "machine" in wanted:
        log("machine: GEMM and bandwidth ceilings")
        hidden, gate_up = costs.hidden_size, 2 * costs.intermediate_size
        shapes = {"decode M=64": (64, hidden, gate_up), "decode M=1": (1, hidden, gate_up)}
        results["machine"] = measure_machine(plan.gemm_square, shapes, plan.buffer_bytes, plan.machine_repeats)
        save()
    machine = results.get("machine")
    offline = [name for name in OFFLINE_SECTIONS if name in wanted]
    if offline:
        log("building the engines: " + ", ".join(QUANTIZATIONS) + ("" if args.skip_hf else ", HF"))
        engines: Engines | None = Engines(args.model, loaded, args.skip_hf, offline_kv_bytes(plan, costs))
        report["engine_args"] = engines.engine_args
        for name in offline:
            if name == "batch1":
                results[name] = batch1_section(engines, plan.batch1, args.runs, costs, machine)
            else:
                results[name] = throughput_section(engines, getattr(plan, name), args.runs, costs, machine, name)
            save()
        engines = None  # free the models before the server loads its own
        gc.collect()
    if "serve" in wanted:
        results["serve"] = serve_section(args.model, args.serve_quantization, plan, loaded.tokenizer, args.runs)
        save()


def parse_sections(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"sections must be a comma list of {','.join(SECTIONS)}, got {text!r}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded model)")
    parser.add_argument("--runs", type=int, default=3,
                        help="timed runs per engine and serving runs; medians are reported")
    parser.add_argument("--sections", type=parse_sections, default=list(SECTIONS),
                        help=f"comma list of sections to run (default: {','.join(SECTIONS)})")
    parser.add_argument("--skip-hf", action="store_true", help="no HF transformers baseline (no ratios)")
    parser.add_argument("--num-prompts", type=int, default=None, help="prompts of the w1 and mixed workloads")
    parser.add_argument("--serve-prompts", type=int, default=None, help="requests of the serving run")
    parser.add_argument("--serve-quantization", choices=list(SERVE_QUANTIZATIONS), default="none",
                        help="--quantization of the served engine (int8-a7: int8 with --int8-activation-bits 7)")
    parser.add_argument("--quick", action="store_true", help="tiny workloads and buffers (a smoke test)")
    parser.add_argument("--output-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    for name in ("runs", "num_prompts", "serve_prompts"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    from tokenmill.loader import load_model

    args = parse_args(argv)
    plan = make_plan(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"cpu-report-{stamp}.json", out_dir / f"cpu-report-{stamp}.md"
    start = time.perf_counter()
    loaded = load_model(args.model)
    costs = ModelCosts.from_state_dict(loaded.state_dict, loaded.hf_config)
    report: dict[str, Any] = {
        "benchmark": "cpu_report", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "args": vars(args), "plan": asdict(plan),
        "model": {"name": args.model or "embedded default (SmolLM2-135M-Instruct)", "costs": costs.summary()},
        "torch_threads": torch.get_num_threads(), "load_average": {"start": os.getloadavg()[0]},
        "sections": {}, "targets": [],
    }

    def save() -> None:
        report["targets"] = evaluate_targets(report["sections"])
        json_path.write_text(json.dumps(report, indent=2, default=str))

    try:
        run_sections(args, plan, report, loaded, costs, save)
    finally:
        report["load_average"]["end"] = os.getloadavg()[0]
        report["elapsed_s"] = time.perf_counter() - start
        save()
    text = markdown(report)
    md_path.write_text(text)
    print(text)
    print(f"report: {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
