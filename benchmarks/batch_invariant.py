"""Deterministic mode's cost (--batch-invariant): W1 (64 random 256-token prompts at once, 128 output tokens each,
ignore_eos, the default model, `LLM.generate`) and batch-1 decode (one 256-token prompt, 128 tokens), each engine
pair of one weight format built once, rounds interleaved, medians and their ratios; plus, for scale, the engine's
default configuration (dtype auto: bf16 where the CPU multiplies bf16 in hardware).

    .venv/bin/python benchmarks/batch_invariant.py [--rounds 3] [--formats none,int8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from tokenmill import LLM, SamplingParams
from tokenmill.bench.results import write_json_report
from tokenmill.bench.throughput import make_workload
from tokenmill.worker.capabilities import detect_capabilities


def _run(llm: LLM, prompts: list[list[int]], output_len: int) -> float:
    """Output tokens/s of one offline run of `prompts`."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--formats", default="none,int8", help="weight formats: none (float32), int8, int4")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--kv-cache-memory-gib", type=float, default=2.5)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    machine = detect_capabilities().summary()
    print(f"machine: {machine}", flush=True)

    kv = int(args.kv_cache_memory_gib * 2**30)
    engines: dict[str, LLM] = {"default (dtype auto)": LLM(kv_cache_memory=kv)}
    pairs = []
    for fmt in args.formats.split(","):
        dtype = "float32"
        name = "float32" if fmt == "none" else fmt
        engines[name] = LLM(dtype=dtype, quantization=fmt, kv_cache_memory=kv)
        engines[f"{name} batch-invariant"] = LLM(dtype=dtype, quantization=fmt, kv_cache_memory=kv,
                                                 batch_invariant=True)
        pairs.append((name, f"{name} batch-invariant"))
    first = next(iter(engines.values())).engine
    w1 = make_workload(args.num_prompts, args.input_len, args.output_len, first.vocab_size, 0,
                       special_ids=set(first.eos_token_ids)).prompts
    for llm in engines.values():  # first-call costs out of the timed rounds
        llm.generate("warm up", SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)

    rates: dict[str, list[float]] = {}
    for r in range(args.rounds):
        order = list(engines) if r % 2 == 0 else list(engines)[::-1]
        for workload, prompts in (("w1", w1), ("batch1", w1[:1])):
            for name in order:
                rate = _run(engines[name], prompts, args.output_len)
                rates.setdefault(f"{workload}/{name}", []).append(rate)
                print(f"round {r} {workload} {name}: {rate:.1f} output tok/s", flush=True)

    medians = {key: statistics.median(v) for key, v in rates.items()}
    ratios: dict[str, Any] = {}
    print("\n| workload | engine | output tok/s | batch-invariant / same weights | batch-invariant / default |")
    print("|---|---|---|---|---|")
    for workload in ("w1", "batch1"):
        default = medians[f"{workload}/default (dtype auto)"]
        print(f"| {workload} | default (dtype auto) | {default:.1f} | | |")
        for plain, invariant in pairs:
            p, i = medians[f"{workload}/{plain}"], medians[f"{workload}/{invariant}"]
            ratios[f"{workload}/{invariant}"] = {"vs_same_weights": i / p, "vs_default": i / default}
            print(f"| {workload} | {plain} | {p:.1f} | | |")
            print(f"| {workload} | {invariant} | {i:.1f} | {i / p:.2f}x | {i / default:.2f}x |")
    report = {"machine": machine, "args": vars(args), "rates": rates, "medians": medians, "ratios": ratios}
    print(f"report: {write_json_report(report, 'batch_invariant', args.output)}")


if __name__ == "__main__":
    main()
