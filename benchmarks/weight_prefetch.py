"""The C forward's next-pair weight prefetch (a projection's pass prefetching the weights of the pair of panels its
thread takes next: kernels/cpu/prefetch_stream.h, used by bf16_panels.h's vdpbf16ps rows and int8_vnni.h's tiles)
on against off, in one engine, switched step by step: R prompts of --input-len random tokens generate
--decode-tokens tokens each, and the pure decode steps alternate between the two settings (neighbouring steps have
nearly the same context, so the machine's drift and the growing K/V cache hit both alike). Per batch size R: the
median C-forward time of each setting's steps, and the ratios off / on of the medians and of the sums (above 1: the
prefetch is faster).
The two settings compute the same sums (a prefetch moves no data into the arithmetic): the greedy tokens of a
whole run with it on and one with it off are compared at the smallest R.

    .venv/bin/python benchmarks/weight_prefetch.py [--quantization none|int8|int4] [--rows 1,8,16,64] [--runs 2]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from step_split import time_c_forward  # this directory is on sys.path when run as a script

from tokenmill import LLM, SamplingParams
from tokenmill.bench.results import write_json_report
from tokenmill.bench.throughput import make_workload
from tokenmill.worker.c_step import CStepForward
from tokenmill.worker.capabilities import detect_capabilities


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantization", default="none", choices=["none", "int8", "int4"])
    parser.add_argument("--rows", default="1,8,16,64", help="decode batch sizes, comma-separated")
    parser.add_argument("--runs", type=int, default=2, help="runs per batch size (each alternates step by step)")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    print(f"machine: {detect_capabilities().summary()}")
    rows = [int(r) for r in args.rows.split(",")]
    with LLM(model=None, quantization=args.quantization, enable_prefix_caching=False) as llm:
        engine = llm.engine
        c_step = next((p for p in engine.core.runner.step_paths if isinstance(p, CStepForward)), None)
        if c_step is None:
            raise SystemExit("no C forward on this machine: nothing to compare")
        model = c_step.kernel._model
        seconds: dict[int, list[float]] = {0: [], 1: []}
        alternate = {"on": False, "steps": 0}
        forward = c_step.forward

        def switched(input_ids: Any, positions: Any, meta: Any, keep_rows: Any = None) -> Any:
            if alternate["on"] and meta.num_tokens == meta.num_reqs:
                model.prefetch_weights = alternate["steps"] % 2
                alternate["steps"] += 1
            return forward(input_ids, positions, meta, keep_rows)

        c_step.forward = switched

        def record(kind: str, spent: float) -> None:  # after the step: prefetch_weights is still its setting
            if alternate["on"] and kind == "decode":
                seconds[model.prefetch_weights].append(spent)

        time_c_forward(c_step, record)
        params = SamplingParams(temperature=0.0, max_tokens=args.decode_tokens + 1, ignore_eos=True)
        special = set(engine.eos_token_ids)
        results: dict[str, Any] = {}
        try:
            tokens = {}
            for setting in (1, 0):  # whole runs, for the tokens
                model.prefetch_weights = setting
                prompts = make_workload(min(rows), args.input_len, 8, engine.vocab_size, 0, special_ids=special).prompts
                outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                                    use_tqdm=False)
                tokens[setting] = [o.outputs[0].token_ids for o in outs]
            if tokens[0] != tokens[1]:
                raise SystemExit("the prefetch changed greedy tokens")
            for r in rows:
                prompts = make_workload(r, args.input_len, args.decode_tokens + 1, engine.vocab_size, r,
                                        special_ids=special).prompts
                per_run = []
                for _ in range(args.runs):
                    seconds[0].clear()
                    seconds[1].clear()
                    alternate.update(on=True, steps=0)
                    llm.generate(prompts, [params] * r, use_tqdm=False)
                    alternate["on"] = False
                    n = min(len(seconds[0]), len(seconds[1]))
                    per_run.append({"off_ms": [s * 1e3 for s in seconds[0][:n]],
                                    "on_ms": [s * 1e3 for s in seconds[1][:n]]})
                off = [t for run in per_run for t in run["off_ms"]]
                on = [t for run in per_run for t in run["on_ms"]]
                results[str(r)] = {"runs": per_run, "median_off_ms": statistics.median(off),
                                   "median_on_ms": statistics.median(on), "mean_ratio": sum(off) / sum(on)}
        finally:
            model.prefetch_weights = 1
    print(f"\n| decode batch | C forward off, ms (median) | on | off / on (medians) | off / on (sums) |  "
          f"({args.quantization}, {args.runs} runs, steps alternated)")
    print("|---|---|---|---|---|")
    for r, res in results.items():
        print(f"| {r} | {res['median_off_ms']:.2f} | {res['median_on_ms']:.2f} | "
              f"{res['median_off_ms'] / res['median_on_ms']:.3f} | {res['mean_ratio']:.3f} |")
    path = write_json_report({"args": vars(args), "results": results}, "weight-prefetch", args.output_json)
    print(f"\nreport: {path}")


if __name__ == "__main__":
    main()
