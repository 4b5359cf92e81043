"""The one-call C forward of a step (worker/c_step.py) (fused_decode=True, the default) against layer-by-layer decode steps
(fused_decode=False), in one process, interleaved: decode tok/s at several batch sizes.

For each batch size R: R prompts of --input-len random tokens; decode tok/s = R x (output_len - 1) /
(time of an output_len-token run - time of a 1-token run of the same prompts), i.e. prefill excluded.
Each round runs both engines, alternating which goes first; medians over rounds and the ratio
(fused / layer by layer) are printed and written as JSON. Greedy tokens of the first round are compared
(float32: they must be equal; int8: reported, as float rounding may flip an 8-bit level).

    .venv/bin/python benchmarks/step_forward_ab.py --quantization int8 --rows 1,4,16,64 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from tokenmill import LLM, SamplingParams
from tokenmill.bench.results import write_json_report
from tokenmill.bench.throughput import make_workload


def _run(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, [params] * len(prompts), use_tqdm=False)
    return time.perf_counter() - start, [o.outputs[0].token_ids for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--quantization", default="none", choices=["none", "int8"])
    parser.add_argument("--rows", default="1,4,16,64", help="comma-separated decode batch sizes")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()

    common: dict[str, Any] = {"model": args.model, "quantization": args.quantization, "enable_prefix_caching": False}
    llms = {"fused": LLM(fused_decode=True, **common), "layers": LLM(fused_decode=False, **common)}
    engine = llms["fused"].engine
    special = set(getattr(llms["fused"].tokenizer, "all_special_ids", []) or []) | set(engine.eos_token_ids)
    results: dict[str, Any] = {"args": vars(args), "rows": {}}
    for rows in (int(r) for r in args.rows.split(",")):
        prompts = make_workload(rows, args.input_len, args.output_len, engine.vocab_size, 0,
                                special_ids=special).prompts
        rates: dict[str, list[float]] = {name: [] for name in llms}
        tokens: dict[str, list[list[int]]] = {}
        for llm in llms.values():  # warm-up: first-call costs (allocations, lazy imports) stay out of the rounds
            _run(llm, prompts, 4)
        for round_index in range(args.rounds):
            order = list(llms) if round_index % 2 == 0 else list(reversed(llms))
            for name in order:
                first, _ = _run(llms[name], prompts, 1)
                full, ids = _run(llms[name], prompts, args.output_len)
                rates[name].append(rows * (args.output_len - 1) / (full - first))
                tokens.setdefault(name, ids)
        same = sum(a == b for x, y in zip(tokens["fused"], tokens["layers"]) for a, b in zip(x, y))
        total = sum(len(x) for x in tokens["fused"])
        medians = {name: statistics.median(r) for name, r in rates.items()}
        results["rows"][rows] = {"decode_tok_per_s": rates, "median": medians,
                                 "ratio": medians["fused"] / medians["layers"], "greedy_agreement": same / total}
        print(f"rows {rows:3d}: fused {medians['fused']:7.1f} tok/s, layer by layer {medians['layers']:7.1f} "
              f"-> {medians['fused'] / medians['layers']:.2f}x; greedy tokens equal {same}/{total}", flush=True)
    path = write_json_report(results, "decode-step-ab", args.output_json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
