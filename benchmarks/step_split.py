"""Where W1's time goes by step kind: prefill steps (any step with a multi-token request) against pure
decode steps, inside each kind the one-call C forward against the rest (vocabulary projection, sampling,
bookkeeping), and inside the C forward its phases over all steps (step_forward.c's own clock: per-row work,
projections, rotary + K/V write, attention). One engine per run, prefix caching off; the engine's model
runner is wrapped in place, so the numbers include nothing but the steps themselves.

    .venv/bin/python benchmarks/step_split.py --quantization int8 --runs 3 [--kv-cache-dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from tokenmill import LLM, SamplingParams
from tokenmill.bench.results import write_json_report
from tokenmill.bench.throughput import make_workload
from tokenmill.kernels.cpu.step_forward import PHASES
from tokenmill.worker.c_step import CStepForward
from tokenmill.worker.model_runner import ModelRunner


def time_c_forward(c_step: CStepForward, record: Callable[[str, float], None]) -> None:
    """Wraps c_step.forward so that each call's seconds go to record(kind, seconds), kind "decode" for a pure decode
    step (one row a request), else "prefill"."""
    inner = c_step.forward

    def forward(input_ids: torch.Tensor, positions: torch.Tensor, meta: Any,
                keep_rows: torch.Tensor | None = None) -> torch.Tensor:
        kind = "decode" if meta.num_tokens == meta.num_reqs else "prefill"
        start = time.perf_counter()
        out = inner(input_ids, positions, meta, keep_rows)
        record(kind, time.perf_counter() - start)
        return out

    c_step.forward = forward


def time_steps(runner: ModelRunner, record: Callable[[str, float], None]) -> None:
    """Wraps runner.execute (on the instance; `del runner.execute` undoes it) so that each step's seconds go to
    record(kind, seconds), kind "decode" for a pure decode step (every scheduled request decodes one token), else
    "prefill"."""

    def timed(scheduled: Any) -> Any:
        start = time.perf_counter()
        out = ModelRunner.execute(runner, scheduled)
        kind = "decode" if all(s.num_new_tokens == 1 for s in scheduled) else "prefill"
        record(kind, time.perf_counter() - start)
        return out

    runner.execute = timed


def time_decode_steps(runner: ModelRunner, record: Callable[[float], None]) -> None:
    """time_steps for the pure decode steps alone: record(seconds)."""
    time_steps(runner, lambda kind, spent: record(spent) if kind == "decode" else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--quantization", default="none", choices=["none", "int8", "int4"])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=16, help="KV cache block size (tokens)")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto, float32, float16, bfloat16 or int8")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()

    llm = LLM(model=args.model, quantization=args.quantization, enable_prefix_caching=False,
              block_size=args.block_size, kv_cache_dtype=args.kv_cache_dtype)
    engine = llm.engine
    special = set(getattr(llm.tokenizer, "all_special_ids", []) or []) | set(engine.eos_token_ids)
    prompts = make_workload(args.num_prompts, args.input_len, args.output_len, engine.vocab_size, 0,
                            special_ids=special).prompts
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    seconds: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)

    runner = engine.core.runner

    def add_step(kind: str, spent: float) -> None:
        seconds[kind] += spent
        counts[kind] += 1

    time_steps(runner, add_step)
    kernel = None
    c_step = next((p for p in runner.step_paths if isinstance(p, CStepForward)), None)
    if c_step is not None:
        kernel = c_step.kernel
        kernel.phase_seconds = torch.zeros(len(PHASES), dtype=torch.float64)

        def add(kind: str, spent: float) -> None:
            seconds[f"{kind}: C forward"] += spent

        time_c_forward(c_step, add)

    llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    runs: list[dict[str, Any]] = []
    for _ in range(args.runs):
        seconds.clear()
        counts.clear()
        if kernel is not None:
            kernel.phase_seconds.zero_()
        start = time.perf_counter()
        llm.generate(prompts, [params] * len(prompts), use_tqdm=False)
        if kernel is not None:
            for name, value in zip(PHASES, kernel.phase_seconds.tolist()):
                seconds[f"C forward phases, all steps: {name}"] = value
        runs.append({"total_s": time.perf_counter() - start, "seconds": dict(seconds), "steps": dict(counts)})
    median = {key: statistics.median(r["seconds"].get(key, 0.0) for r in runs) for key in runs[0]["seconds"]}
    total = statistics.median(r["total_s"] for r in runs)
    steps = runs[0]["steps"]
    print(f"quantization {args.quantization}: median of {args.runs} runs, total {total:.2f} s")
    for key, value in median.items():
        per_step = steps.get(key.split(":")[0], 0)
        extra = f", {value / per_step * 1000:.1f} ms per {key.split(':')[0]} step" if per_step else ""
        print(f"  {key}: {value:.2f} s ({value / total:.0%}){extra}")
    path = write_json_report({"args": vars(args), "runs": runs, "median_s": median, "total_s": total}, "step-split",
                             args.output_json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
