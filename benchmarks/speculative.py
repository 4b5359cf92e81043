"""Speculative decoding against plain decoding, on this machine, in one process (engines built once, rounds
interleaved, medians reported with their ratios):

- draft: batch-1 decode of chat prompts (128 output tokens at most), the float32 model alone against the float32
  model drafting with its own int4 form (K = 4); decode tokens/s = (tokens - 1) / (finish - first token) per request,
  summed over the prompts; target >= 2x, with token-identical output (checked);
- ngram: batch-1 decode of the input-grounded prompts (benchmarks/data/grounded_prompts.py: summarise, edit,
  extract from a ~950-token document), plain against n-gram prompt lookup (K = 4); target >= 1.6x;
- w1: 64 random 256-token prompts at once (tokenmill.bench.throughput.make_workload), 128 output tokens each
  (ignore_eos), plain against each speculative engine (the governor must turn speculation off: target >= 0.97x).

    .venv/bin/python benchmarks/speculative.py [--rounds 3] [--workloads draft,ngram,w1] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent / "data"))

from grounded_prompts import grounded_messages

from tokenmill import LLM, SamplingParams
from tokenmill.bench.results import write_json_report
from tokenmill.bench.throughput import make_workload
from tokenmill.worker.capabilities import detect_capabilities

CHAT_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle gear system works, step by step.",
    "Give me a recipe for vegetable soup with a list of ingredients and the method.",
    "Describe the water cycle to a ten-year-old.",
]
DRAFT = {"method": "draft_model", "model": "default", "quantization": "int4", "num_speculative_tokens": 4}
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def _decode_rate(outputs: list[Any]) -> tuple[float, int]:
    """Decode tokens/s over requests run one at a time: sum of (tokens - 1) / sum of (finish - first token)."""
    tokens = seconds = 0.0
    for out in outputs:
        m = out.metrics
        tokens += len(out.outputs[0].token_ids) - 1
        seconds += m.finished_time - m.first_token_time
    return tokens / seconds, int(tokens)


def _batch1(llm: LLM, conversations: list[list[dict[str, str]]], max_tokens: int
            ) -> tuple[float, list[list[int]], int, float]:
    """Decode tok/s, the token ids, the decoded tokens and the median time to first token (s), one request at a time
    (a draft model prefills with the target: its prompt work shows in TTFT)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outputs = [llm.chat(conv, params, use_tqdm=False)[0] for conv in conversations]
    rate, tokens = _decode_rate(outputs)
    ttft = statistics.median(o.metrics.first_token_time - o.metrics.arrival_time for o in outputs)
    return rate, [o.outputs[0].token_ids for o in outputs], tokens, ttft


def _w1(llm: LLM, prompts: list[list[int]], output_len: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def _spec_stats(llm: LLM) -> dict[str, Any]:
    governor = llm.engine.core.governor
    if governor is None:
        return {}
    s = governor.stats
    return {"drafts": s.num_drafts, "draft_tokens": s.num_draft_tokens, "accepted_tokens": s.num_accepted_tokens,
            "acceptance_rate": s.num_accepted_tokens / max(1, s.num_draft_tokens),
            "accepted_by_position": list(s.accepted_by_position)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default="draft,ngram,w1")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-tokens", type=int, default=128, help="batch-1 output tokens at most")
    parser.add_argument("--w1-prompts", type=int, default=64)
    parser.add_argument("--w1-output-len", type=int, default=128)
    parser.add_argument("--kv-cache-memory-gib", type=float, default=2.5)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    workloads = args.workloads.split(",")
    machine = detect_capabilities().summary()
    print(f"machine: {machine}", flush=True)

    common = {"dtype": args.dtype, "kv_cache_memory": int(args.kv_cache_memory_gib * 2**30)}
    engines = {"plain": LLM(**common)}
    if "draft" in workloads or "w1" in workloads:
        engines["draft"] = LLM(**common, speculative_config=DRAFT)
    if "ngram" in workloads or "w1" in workloads:
        engines["ngram"] = LLM(**common, speculative_config=NGRAM)
    chat = [[{"role": "user", "content": p}] for p in CHAT_PROMPTS]
    grounded = grounded_messages()
    plain = engines["plain"].engine
    special = set(getattr(engines["plain"].tokenizer, "all_special_ids", []) or []) | set(plain.eos_token_ids)
    w1_prompts = make_workload(args.w1_prompts, 256, args.w1_output_len, plain.vocab_size, 0,
                               special_ids=special).prompts
    for llm in engines.values():  # warm-up: first-call costs out of the timed rounds
        llm.generate("warm up", SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)

    rates: dict[str, list[float]] = {}
    ttfts: dict[str, list[float]] = {}
    identical: dict[str, bool] = {}
    tokens: dict[str, int] = {}
    for r in range(args.rounds):
        for workload, spec_name, conversations in (("draft", "draft", chat), ("ngram", "ngram", grounded)):
            if workload not in workloads:
                continue
            pair = [("plain", engines["plain"]), (spec_name, engines[spec_name])]
            outs = {}
            for name, llm in (pair if r % 2 == 0 else pair[::-1]):
                rate, outs[name], tokens[workload], ttft = _batch1(llm, conversations, args.max_tokens)
                rates.setdefault(f"{workload}/{name}", []).append(rate)
                ttfts.setdefault(f"{workload}/{name}", []).append(ttft)
                print(f"round {r} {workload}/{name}: {rate:.1f} decode tok/s, median TTFT {ttft * 1e3:.0f} ms",
                      flush=True)
            identical[workload] = identical.get(workload, True) and outs["plain"] == outs[spec_name]
        if "w1" in workloads:
            order = list(engines) if r % 2 == 0 else list(engines)[::-1]
            for name in order:
                rate = _w1(engines[name], w1_prompts, args.w1_output_len)
                rates.setdefault(f"w1/{name}", []).append(rate)
                print(f"round {r} w1/{name}: {rate:.1f} output tok/s", flush=True)

    medians = {key: statistics.median(v) for key, v in rates.items()}
    ratios = {}
    for workload in ("draft", "ngram"):
        if workload in workloads:
            ratios[workload] = medians[f"{workload}/{workload}"] / medians[f"{workload}/plain"]
    if "w1" in workloads:
        for name in engines:
            if name != "plain":
                ratios[f"w1/{name}"] = medians[f"w1/{name}"] / medians["w1/plain"]
    ttft_medians = {key: statistics.median(v) for key, v in ttfts.items()}
    report = {"machine": machine, "args": vars(args), "rates": rates, "medians": medians, "ratios": ratios,
              "ttft_s": ttfts, "ttft_medians_s": ttft_medians,
              "token_identical": identical, "batch1_tokens": tokens,
              "spec_stats": {name: _spec_stats(llm) for name, llm in engines.items()}}
    print("\n| measurement | plain | speculative | ratio |\n|---|---|---|---|")
    for workload in ("draft", "ngram"):
        if workload in workloads:
            print(f"| batch-1 decode tok/s, {workload} | {medians[f'{workload}/plain']:.1f} | "
                  f"{medians[f'{workload}/{workload}']:.1f} | {ratios[workload]:.2f}x "
                  f"(identical: {identical[workload]}) |")
            plain_ttft, spec_ttft = ttft_medians[f"{workload}/plain"], ttft_medians[f"{workload}/{workload}"]
            print(f"| batch-1 median TTFT ms, {workload} | {plain_ttft * 1e3:.0f} | {spec_ttft * 1e3:.0f} | "
                  f"{spec_ttft / plain_ttft:.2f}x |")
    for key, ratio in ratios.items():
        if key.startswith("w1/"):
            print(f"| W1 output tok/s, {key[3:]} | {medians['w1/plain']:.1f} | {medians[key]:.1f} | {ratio:.2f}x |")
    for name, stats in report["spec_stats"].items():
        if stats:
            print(f"{name}: acceptance {stats['acceptance_rate']:.2f}, by position {stats['accepted_by_position']} "
                  f"of {stats['drafts']} drafts")
    print(f"report: {write_json_report(report, 'speculative', args.output)}")


if __name__ == "__main__":
    main()
