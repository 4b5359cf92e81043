"""Prefill with whole-context prompts attending through the plan's choice against the float32 kernel over the paged
cache, in one engine on the default model: time of a step of N fresh 256-token prompts (prefill and the first
token), the two switched between interleaved rounds. Made for the bf16 prompt attention of int8/int4 models
(`c_bf16`: AMX tiles or AVX512-BF16's vdpbf16ps over the step's own q/k/v rounded to bf16, where the plan chose it)
against `c_paged` (float32 tiles over the int8 cache); the C forward and the layer path follow the same routes.
Medians, the ratio, how often the first tokens agree, and the machine.

    .venv/bin/python benchmarks/prompt_attention.py [--quantization int8|int4|none] [--dtype auto] [--rounds 6]
        [--prompts 1,8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokenmill import LLM, SamplingParams
from tokenmill.attention.torch_backend import BF16_KERNEL, C_PREFILL_KERNEL
from tokenmill.bench.results import write_json_report
from tokenmill.worker.c_step import CStepForward
from tokenmill.worker.capabilities import detect_capabilities

PROMPT_LEN = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantization", default="int8")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--prompts", default="1,8", help="prompts prefilled together, comma-separated")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    print(f"machine: {detect_capabilities().summary()}")
    sizes = [int(n) for n in args.prompts.split(",")]
    first_token = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    with LLM(model=None, dtype=args.dtype, quantization=args.quantization, enable_prefix_caching=False) as llm:
        runner = llm.engine.core.runner
        backend = runner.model.attention_layers[0].backend
        planned = list(backend.prompt_routes)
        if not any(kernel == BF16_KERNEL for _, kernel in planned):
            raise SystemExit(f"the plan routes no prompt to {BF16_KERNEL} here: {planned or 'none'}")
        c_step = next((p for p in runner.step_paths if isinstance(p, CStepForward)), None)
        planned_rows = c_step.kernel._model.amx_attention_max_rows if c_step is not None else 0
        sides = {"plan": (planned, planned_rows),
                 C_PREFILL_KERNEL: ([(bound, C_PREFILL_KERNEL if k == BF16_KERNEL else k) for bound, k in planned], 0)}
        print(f"plan: {planned}; the C forward's bf16 prompts: up to {planned_rows} rows")
        gen = torch.Generator().manual_seed(0)
        seconds: dict[str, list[float]] = {}
        same = total = 0
        try:
            for r in range(args.rounds):
                for n in sizes:
                    prompts = [torch.randint(100, 40000, (PROMPT_LEN,), generator=gen).tolist() for _ in range(n)]
                    tokens = {}
                    for side in sides if r % 2 == 0 else reversed(list(sides)):
                        backend.prompt_routes, rows = sides[side]
                        if c_step is not None:
                            c_step.kernel._model.amx_attention_max_rows = rows
                        start = time.perf_counter()
                        outs = llm.generate(prompts, first_token, use_tqdm=False)
                        seconds.setdefault(f"{n} {side}", []).append(time.perf_counter() - start)
                        tokens[side] = [o.outputs[0].token_ids[0] for o in outs]
                    same += sum(a == b for a, b in zip(*tokens.values(), strict=True))
                    total += n
        finally:
            backend.prompt_routes = planned
            if c_step is not None:
                c_step.kernel._model.amx_attention_max_rows = planned_rows
    medians = {k: statistics.median(v) * 1000 for k, v in seconds.items()}
    print(f"\n| prompts x {PROMPT_LEN} tokens | {C_PREFILL_KERNEL} ms | plan ({BF16_KERNEL}) ms | ratio |  "
          f"(quantization {args.quantization}, dtype {args.dtype}, median of {args.rounds})")
    print("|---|---|---|---|")
    for n in sizes:
        paged, plan = medians[f"{n} {C_PREFILL_KERNEL}"], medians[f"{n} plan"]
        print(f"| {n} | {paged:.1f} | {plan:.1f} | {paged / plan:.2f}x |")
    print(f"first tokens equal: {same} of {total}")
    path = write_json_report({"args": vars(args), "routes": planned, "seconds": seconds, "medians_ms": medians,
                              "first_tokens_equal": [same, total]}, "prompt-attention", args.output_json)
    print(f"\nreport: {path}")


if __name__ == "__main__":
    main()
