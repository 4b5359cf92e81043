"""The int8 model's fused MLP in the C forward (kernels/cpu/step_forward.c's int8_gate_up_silu_phase: silu(gate) *
up from the gate/up tiles' outputs in a thread's scratch, never the float32 [rows, 2 x intermediate] gate/up rows)
against the unfused one (the whole gate/up product stored, then a per-row silu pass), in one engine on the default
model, switched between interleaved rounds: the time of a step of N fresh 256-token prompts (prefill and the first
token), and the C forward's time per decode step of 64 requests (their 32 steps after the prompts). The two give the
same tokens (bitwise the same values; the run checks). Medians, the ratio, and the machine.

    .venv/bin/python benchmarks/int8_fused_mlp.py [--rounds 6] [--prompts 1,8] [--decode-requests 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from step_split import time_c_forward  # this directory is on sys.path when run as a script

from tokenmill import LLM, SamplingParams
from tokenmill.bench.results import write_json_report
from tokenmill.worker.c_step import CStepForward
from tokenmill.worker.capabilities import detect_capabilities

PROMPT_LEN, DECODE_TOKENS = 256, 32


def _timed(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, [o.outputs[0].token_ids for o in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--prompts", default="1,8", help="prompts prefilled together, comma-separated")
    parser.add_argument("--decode-requests", type=int, default=64, help="0: no decode measurement")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    print(f"machine: {detect_capabilities().summary()}")
    sizes = [int(n) for n in args.prompts.split(",")]
    with LLM(model=None, quantization="int8", enable_prefix_caching=False) as llm:
        c_step = next((p for p in llm.engine.core.runner.step_paths if isinstance(p, CStepForward)), None)
        if c_step is None:
            raise SystemExit("no C forward here")
        model = c_step.kernel._model
        decode_seconds: list[float] = []

        def keep_decode(kind: str, spent: float) -> None:
            if kind == "decode":
                decode_seconds.append(spent)

        time_c_forward(c_step, keep_decode)
        gen = torch.Generator().manual_seed(0)
        results: dict[str, list[float]] = {}
        try:
            for r in range(args.rounds):
                cases = [(f"prefill {n}", n, 1) for n in sizes]
                if args.decode_requests:
                    cases.append(("decode", args.decode_requests, DECODE_TOKENS + 1))
                for name, n, max_tokens in cases:
                    prompts = [torch.randint(100, 40000, (PROMPT_LEN,), generator=gen).tolist() for _ in range(n)]
                    tokens = {}
                    for fused in (1, 0) if r % 2 == 0 else (0, 1):
                        model.fuse_int8_mlp = fused
                        decode_seconds.clear()
                        seconds, tokens[fused] = _timed(llm, prompts, max_tokens)
                        if name == "decode":
                            seconds = statistics.median(decode_seconds)
                        results.setdefault(f"{name} {'fused' if fused else 'unfused'}", []).append(seconds)
                    if tokens[0] != tokens[1]:
                        raise SystemExit(f"the fused MLP changed greedy tokens ({name})")
        finally:
            model.fuse_int8_mlp = 1
    medians = {k: statistics.median(v) for k, v in results.items()}
    print(f"\n| case | unfused | fused | ratio |  (int8, median of {args.rounds})")
    print("|---|---|---|---|")
    for n in sizes:
        unfused, fused = medians[f"prefill {n} unfused"] * 1000, medians[f"prefill {n} fused"] * 1000
        print(f"| {n} x {PROMPT_LEN}-token prefill, ms | {unfused:.1f} | {fused:.1f} | {unfused / fused:.2f}x |")
    if args.decode_requests:
        unfused, fused = medians["decode unfused"] * 1000, medians["decode fused"] * 1000
        print(f"| C forward of a decode step of {args.decode_requests} requests, ms | {unfused:.2f} | {fused:.2f} | "
              f"{unfused / fused:.2f}x |")
    path = write_json_report({"args": vars(args), "results": results, "medians": medians}, "int8-fused-mlp",
                             args.output_json)
    print(f"\nreport: {path}")


if __name__ == "__main__":
    main()
