"""Greedy decode with and without the int8 screen in front of the vocabulary projection (layers/screened_head.py),
in one engine on the default model: batch-1 decode tok/s of a 256-token prompt's 128 greedy tokens, and the same for
a small batch, the screen switched on and off between interleaved rounds (the plan's choice is the "on" side; it
gives the same tokens, which the run checks). Medians, the ratio, and the machine.

    .venv/bin/python benchmarks/greedy_screen.py [--dtype auto|float32|bfloat16] [--rounds 6] [--batch 1,4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokenmill import LLM, SamplingParams
from tokenmill.bench.results import write_json_report
from tokenmill.worker.capabilities import detect_capabilities

PROMPT_LEN, OUTPUT_LEN = 256, 128


def _decode_rate(llm: LLM, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
    """Output tok/s of the decode alone (the prompts' prefill timed apart and taken out), and the tokens."""
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0.0, max_tokens=OUTPUT_LEN + 1, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts, one, use_tqdm=False)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    outs = llm.generate(prompts, full, use_tqdm=False)
    decode = time.perf_counter() - start - prefill
    return len(prompts) * OUTPUT_LEN / decode, [o.outputs[0].token_ids for o in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", default="1,4", help="requests decoded together, comma-separated")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    print(f"machine: {detect_capabilities().summary()}")
    batches = [int(b) for b in args.batch.split(",")]
    with LLM(model=None, dtype=args.dtype, enable_prefix_caching=False) as llm:
        model = llm.engine.core.worker.runner.model
        screen = model.greedy_screen
        if screen is None:
            raise SystemExit("the plan did not choose the screen for any row count here (or it cannot be built)")
        print(f"plan: the screen for up to {screen[0]} rows")
        gen = torch.Generator().manual_seed(0)
        rates: dict[str, list[float]] = {}
        for r in range(args.rounds):
            for batch in batches:
                prompts = [torch.randint(100, 40000, (PROMPT_LEN,), generator=gen).tolist() for _ in range(batch)]
                tokens = {}
                for side in ("screen", "head") if r % 2 == 0 else ("head", "screen"):
                    model.greedy_screen = screen if side == "screen" else None
                    rate, tokens[side] = _decode_rate(llm, prompts)
                    rates.setdefault(f"batch {batch} {side}", []).append(rate)
                if tokens["screen"] != tokens["head"]:
                    raise SystemExit(f"the screen changed greedy tokens at batch {batch}")
        model.greedy_screen = screen
    medians = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n| requests | head's own argmax tok/s | int8 screen tok/s | ratio |  (dtype {args.dtype}, "
          f"median of {args.rounds})")
    print("|---|---|---|---|")
    for batch in batches:
        head, screened = medians[f"batch {batch} head"], medians[f"batch {batch} screen"]
        print(f"| {batch} | {head:.1f} | {screened:.1f} | {screened / head:.2f}x |")
    path = write_json_report({"dtype": args.dtype, "rates": rates, "medians": medians}, "greedy-screen",
                             args.output_json)
    print(f"\nreport: {path}")


if __name__ == "__main__":
    main()
