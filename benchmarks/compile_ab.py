"""Eager vs compile=True in one process, interleaved: a throughput workload and batch-1 decode.

Both engines load the same model; each round runs every workload on both, alternating which goes
first, and the medians and ratios (compile / eager) are written as JSON. Greedy tokens must match.

    .venv/bin/python benchmarks/compile_ab.py --rounds 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from tokenmill import LLM, SamplingParams
from tokenmill.bench.results import write_json_report
from tokenmill.bench.throughput import Workload, make_workload
from tokenmill.engine.step_timer import StepTimer


def _run(llm: LLM, workload: Workload) -> tuple[float, list[list[int]]]:
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
    start = time.perf_counter()
    outputs = llm.generate(workload.prompts, params, use_tqdm=False)
    return time.perf_counter() - start, [o.outputs[0].token_ids for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--batch1-output-len", type=int, default=128)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()

    timers = {"eager": StepTimer(), "compile": StepTimer()}
    start = time.perf_counter()
    llms = {"compile": LLM(model=args.model, compile=True, step_timer=timers["compile"])}
    startup = {"compile": time.perf_counter() - start}
    start = time.perf_counter()
    llms["eager"] = LLM(model=args.model, step_timer=timers["eager"])
    startup["eager"] = time.perf_counter() - start

    engine = llms["eager"].engine
    special = set(getattr(llms["eager"].tokenizer, "all_special_ids", []) or []) | set(engine.eos_token_ids)
    workloads = {
        "throughput": make_workload(args.num_prompts, args.input_len, args.output_len, engine.vocab_size, 0,
                                    special_ids=special),
        "batch1": make_workload(1, args.input_len, args.batch1_output_len, engine.vocab_size, 1, special_ids=special),
    }
    warmup = make_workload(2, 16, 4, engine.vocab_size, 2, special_ids=special)
    for llm in llms.values():
        _run(llm, warmup)

    tok_s: dict[str, list[float]] = {f"{w}/{e}": [] for w in workloads for e in llms}
    forward_s: dict[str, list[float]] = {k: [] for k in tok_s}
    tokens: dict[str, list[list[int]]] = {}
    for r in range(args.rounds):
        order = ["eager", "compile"] if r % 2 == 0 else ["compile", "eager"]  # cancels drift
        for wname, workload in workloads.items():
            for e in order:
                timers[e].reset()
                elapsed, ids = _run(llms[e], workload)
                tokens.setdefault(f"{wname}/{e}", ids)
                tok_s[f"{wname}/{e}"].append(round(workload.num_output_tokens / elapsed, 2))
                forward_s[f"{wname}/{e}"].append(round(timers[e].totals["forward"], 3))
        print(f"round {r}: {tok_s}", flush=True)

    medians = {k: statistics.median(v) for k, v in tok_s.items()}
    report: dict[str, Any] = {
        "benchmark": "compile_ab", "args": vars(args), "startup_s": {k: round(v, 2) for k, v in startup.items()},
        "output_tok_per_s": tok_s, "forward_s": forward_s, "median_output_tok_per_s": medians,
        "ratio_compile_vs_eager": {w: round(medians[f"{w}/compile"] / medians[f"{w}/eager"], 3) for w in workloads},
        "tokens_identical": {w: tokens[f"{w}/eager"] == tokens[f"{w}/compile"] for w in workloads},
    }
    out = write_json_report(report, "compile_ab", args.output_json)
    print(json.dumps({k: report[k] for k in ("startup_s", "median_output_tok_per_s", "ratio_compile_vs_eager",
                                             "tokens_identical")}, indent=2))
    print(f"report: {out}")


if __name__ == "__main__":
    main()
