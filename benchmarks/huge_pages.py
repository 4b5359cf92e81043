"""Huge pages on against off (`--huge-pages`, worker/huge_pages.py), two engines in one process, rounds
interleaved so that load from elsewhere hits both alike:

- batch-1 decode tok/s: one 256-token prompt, 128 greedy tokens, minus the time of a 1-token run;
- batch-N decode step time: N prompts of --context random tokens generating --decode-tokens each; only
  the pure decode steps are timed (the model runner is wrapped), so the figure is dominated by streaming
  the KV cache at N x context positions per layer (W1's decode steps, at 64 x 256..384).

    .venv/bin/python benchmarks/huge_pages.py --quantization int8 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics

from quant_quality import decode_tokens_per_s  # this directory is on sys.path when run as a script
from step_split import time_decode_steps

from tokenmill import LLM, SamplingParams
from tokenmill.bench.results import write_json_report
from tokenmill.bench.throughput import make_workload


def decode_step_ms(llm: LLM, prompts: list[list[int]], decode_tokens: int) -> float:
    """Median time of the steps in which every scheduled request decodes one token."""
    runner = llm.engine.core.runner
    times: list[float] = []
    time_decode_steps(runner, times.append)
    try:
        llm.generate(prompts, SamplingParams(max_tokens=decode_tokens, ignore_eos=True, temperature=0),
                     use_tqdm=False)
    finally:
        del runner.execute
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--quantization", default="none", choices=["none", "int8", "int4"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-requests", type=int, default=64)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()

    engines = {name: LLM(model=args.model, quantization=args.quantization, enable_prefix_caching=False,
                         huge_pages=name == "huge")
               for name in ("4k", "huge")}
    vocab = engines["4k"].engine.vocab_size
    prompts = make_workload(args.decode_requests, args.context, args.decode_tokens, vocab, 0).prompts
    batch1_prompt = [1000 + (i * 7919) % 40000 for i in range(256)]
    runs: dict[str, dict[str, list[float]]] = {name: {"batch1_tok_s": [], "decode_step_ms": []} for name in engines}
    for name, llm in engines.items():  # warm-up: kernels built, pages touched
        decode_tokens_per_s(llm, batch1_prompt, 8)
    for r in range(args.rounds):
        for name, llm in engines.items():
            runs[name]["batch1_tok_s"].append(decode_tokens_per_s(llm, batch1_prompt))
            runs[name]["decode_step_ms"].append(decode_step_ms(llm, prompts, args.decode_tokens))
            print(f"round {r + 1}/{args.rounds} {name}: batch-1 {runs[name]['batch1_tok_s'][-1]:.1f} tok/s, "
                  f"{args.decode_requests}-request decode step {runs[name]['decode_step_ms'][-1]:.1f} ms", flush=True)
    medians = {name: {k: statistics.median(v) for k, v in m.items()} for name, m in runs.items()}
    report = {
        "benchmark": "huge_pages", "quantization": args.quantization, "rounds": args.rounds,
        "decode_requests": args.decode_requests, "context": args.context, "runs": runs, "medians": medians,
        "batch1_speedup": medians["huge"]["batch1_tok_s"] / medians["4k"]["batch1_tok_s"],
        "decode_step_speedup": medians["4k"]["decode_step_ms"] / medians["huge"]["decode_step_ms"],
    }
    print(f"\n{args.quantization}: batch-1 decode {medians['4k']['batch1_tok_s']:.1f} -> "
          f"{medians['huge']['batch1_tok_s']:.1f} tok/s ({report['batch1_speedup']:.2f}x); "
          f"{args.decode_requests} x {args.context} decode step {medians['4k']['decode_step_ms']:.1f} -> "
          f"{medians['huge']['decode_step_ms']:.1f} ms ({report['decode_step_speedup']:.2f}x)")
    print("wrote", write_json_report(report, "huge-pages", args.output_json))


if __name__ == "__main__":
    main()
