"""An int4 model with the plan's routes (the bf16 route, `c_int4_bf16`, from the row count where the plan chose it:
kernels/cpu/int4_bf16.h's panels dequantized in cache, multiplied on AVX512-BF16 / AMX-BF16) against the W4A16
routes alone (`c_int4`: the 16-bit-activation C kernel, dequantized float32 GEMM past its rows, and the C forward
taking prompts of up to 48 tokens, as before the bf16 route), in one engine on the default model, switched between
interleaved rounds: a 256-token prompt's prefill (its first token), W1 (64 requests x 256 tokens -> 128, ignore_eos:
output tok/s) and batch-1 decode (128 tokens). Medians, ratios, how many W1 tokens agree, and the machine.

    .venv/bin/python benchmarks/int4_bf16_route.py [--rounds 3] [--w1-prompts 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

from tokenmill import LLM, SamplingParams
from tokenmill.bench.results import write_json_report
from tokenmill.bench.throughput import make_workload
from tokenmill.layers.planned_linear import PlannedLinear
from tokenmill.worker.c_step import INT4_MAX_PROMPT_TOKENS, CStepForward
from tokenmill.worker.capabilities import detect_capabilities

PROMPT_LEN, OUTPUT_LEN = 256, 128


@contextmanager
def w4a16_only(llm: LLM) -> Iterator[None]:
    """While open, every int4 projection takes its c_int4 route at every row count and the C forward its W4A16
    products and the 48-token prompt limit (the engine as it ran before the bf16 route)."""
    runner = llm.engine.core.runner
    planned = [m for m in runner.model.modules() if isinstance(m, PlannedLinear) and "c_int4" in m.kernels]
    saved = [list(m.max_rows) for m in planned]
    c_step = next((p for p in runner.step_paths if isinstance(p, CStepForward)), None)
    limits = (c_step.kernel._model.int4_bf16_min_rows, c_step.max_prompt_tokens) if c_step else None
    try:
        for m in planned:  # route() takes the first route whose bound holds the rows: c_int4's, always
            m.max_rows = [sys.maxsize if k == "c_int4" else -1 for k in m.kernels]
        if c_step is not None:
            c_step.kernel._model.int4_bf16_min_rows = 0
            c_step.max_prompt_tokens = min(c_step.max_prompt_tokens, INT4_MAX_PROMPT_TOKENS)
        yield
    finally:
        for m, bounds in zip(planned, saved):
            m.max_rows = bounds
        if c_step is not None and limits is not None:
            c_step.kernel._model.int4_bf16_min_rows, c_step.max_prompt_tokens = limits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--w1-prompts", type=int, default=64)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    print(f"machine: {detect_capabilities().summary()}")
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0.0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    with LLM(model=None, quantization="int4", enable_prefix_caching=False) as llm:
        routes = sorted({k for m in llm.engine.core.runner.model.modules() if isinstance(m, PlannedLinear)
                         for k in m.kernels})
        c_step = next((p for p in llm.engine.core.runner.step_paths if isinstance(p, CStepForward)), None)
        min_rows = c_step.kernel.int4_bf16_min_rows if c_step else 0
        print(f"plan's int4 kernels: {routes}; the C forward's bf16 route from {min_rows} rows (0: never)")
        if min_rows == 0 and "c_int4_bf16" not in routes:
            raise SystemExit("the plan chose no bf16 route here (no AVX512-BF16 / AMX-BF16, or it lost)")
        llm.generate("warm up", SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
        gen = torch.Generator().manual_seed(0)
        seconds: dict[str, list[float]] = {}
        same = total = 0
        sides = ("plan", "w4a16")
        for r in range(args.rounds):
            prompt = [torch.randint(100, 40000, (PROMPT_LEN,), generator=gen).tolist()]
            w1 = make_workload(args.w1_prompts, PROMPT_LEN, OUTPUT_LEN, llm.engine.vocab_size, r,
                               special_ids=set(llm.engine.eos_token_ids)).prompts
            w1_tokens = {}
            for name in sides if r % 2 == 0 else reversed(sides):
                with w4a16_only(llm) if name == "w4a16" else nullcontext():
                    start = time.perf_counter()
                    llm.generate(prompt, first, use_tqdm=False)
                    seconds.setdefault(f"prefill {name}", []).append(time.perf_counter() - start)
                    start = time.perf_counter()
                    outs = llm.generate(w1, full, use_tqdm=False)
                    seconds.setdefault(f"w1 {name}", []).append(time.perf_counter() - start)
                    w1_tokens[name] = [o.outputs[0].token_ids for o in outs]
                    start = time.perf_counter()
                    llm.generate(prompt, full, use_tqdm=False)
                    seconds.setdefault(f"batch1 {name}", []).append(time.perf_counter() - start)
            for a, b in zip(w1_tokens["plan"], w1_tokens["w4a16"], strict=True):
                same += sum(x == y for x, y in zip(a, b))
                total += len(a)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    rows = [("256-token prefill (ms)", "prefill", 1000.0, False),
            (f"W1 output tok/s ({args.w1_prompts} x {PROMPT_LEN} -> {OUTPUT_LEN})", "w1", None, True),
            ("batch-1 prompt + 128 tokens (s)", "batch1", 1.0, False)]
    print(f"\n| measurement | W4A16 only | plan (bf16 route) | plan's gain |  (median of {args.rounds} rounds)")
    print("|---|---|---|---|")
    for label, key, scale, rate in rows:
        old, new = med[f"{key} w4a16"], med[f"{key} plan"]
        if rate:
            tokens = args.w1_prompts * OUTPUT_LEN
            print(f"| {label} | {tokens / old:.1f} | {tokens / new:.1f} | {old / new:.2f}x |")
        else:
            print(f"| {label} | {old * scale:.1f} | {new * scale:.1f} | {old / new:.2f}x |")
    print(f"W1 tokens equal position by position: {same} of {total}")
    path = write_json_report({"args": vars(args), "int4_bf16_min_rows": min_rows, "seconds": seconds,
                              "tokens_equal": [same, total]}, "int4-bf16-route", args.output_json)
    print(f"\nreport: {path}")


if __name__ == "__main__":
    main()
