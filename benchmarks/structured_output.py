"""Structured output's cost: a W1-shaped offline run (64 requests, 256-token random prompts, 128 output tokens, the
default model, `LLM.generate`, greedy, ignore_eos) with every request under a JSON schema against the same run
unconstrained, interleaved, one engine; target >= 0.9x the unconstrained output tokens/s. The schema is an array of
at least 64 small objects, so no constrained request can end before its 128 tokens (throughput counts the tokens
actually produced either way). Also reported: the time the engine spent filling masks (structured/manager.py), and
grammar compile times of the test suite's schemas on a fresh compiler (no cache).

    .venv/bin/python benchmarks/structured_output.py --runs 3
    .venv/bin/python benchmarks/structured_output.py --num-prompts 4 --output-len 16 --runs 1   # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from tokenmill import LLM, SamplingParams, StructuredOutputsParams
from tokenmill.bench.results import write_json_report
from tokenmill.bench.throughput import make_workload
from tokenmill.worker.capabilities import detect_capabilities

ITEM = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                                         "name": {"type": "string", "maxLength": 12},
                                         "tag": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
        "required": ["id", "name", "tag", "ok"]}
BENCH_SCHEMA = {"type": "array", "items": ITEM, "minItems": 64}
# The schemas of tests/*/test_structured_output.py, for compile times.
TEST_SCHEMAS = {
    "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                                "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]}},
               "required": ["name", "age", "city"], "additionalProperties": False},
    "tags": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                              "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]},
                                                       "minItems": 1, "maxItems": 3}, "ok": {"type": "boolean"}},
             "required": ["id", "tags", "ok"]},
    "bench_array": BENCH_SCHEMA,
}


def _compile_times(llm: LLM, repeats: int) -> dict[str, float]:
    """Median ms to compile each schema on a fresh xgrammar compiler (the engine's vocabulary, no cache)."""
    import xgrammar as xgr

    from tokenmill.structured.grammar import grammar_of_key, tokenizer_info

    engine = llm.engine
    start = time.perf_counter()
    info = tokenizer_info(engine.tokenizer, engine.vocab_size, sorted(engine.eos_token_ids))
    times = {"tokenizer_info (once per engine)": (time.perf_counter() - start) * 1000}
    for name, schema in TEST_SCHEMAS.items():
        grammar = grammar_of_key(StructuredOutputsParams(json=schema).key)
        samples = []
        for _ in range(repeats):
            compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
            start = time.perf_counter()
            compiler.compile_grammar(grammar)
            samples.append((time.perf_counter() - start) * 1000)
        times[name] = statistics.median(samples)
    return times


def _timed_mask_fill(llm: LLM, seconds: list[float]) -> None:
    """Adds the time of each StructuredOutputManager.grammar_bitmask call to seconds[0]."""
    manager = llm.engine.core.structured
    inner = manager.grammar_bitmask

    def timed(scheduled: Any) -> Any:
        start = time.perf_counter()
        out = inner(scheduled)
        seconds[0] += time.perf_counter() - start
        return out

    manager.grammar_bitmask = timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compile-repeats", type=int, default=5)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()

    print(f"machine: {detect_capabilities().summary()}")
    llm = LLM(model=args.model, enable_prefix_caching=False)
    engine = llm.engine
    special = set(getattr(llm.tokenizer, "all_special_ids", []) or []) | set(engine.eos_token_ids)
    prompts = make_workload(args.num_prompts, args.input_len, args.output_len, engine.vocab_size, 0,
                            special_ids=special).prompts
    plain = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    constrained = plain.clone(structured_outputs=StructuredOutputsParams(json=BENCH_SCHEMA))
    arms = {"unconstrained": plain, "json_schema": constrained}
    fill_seconds = [0.0]
    _timed_mask_fill(llm, fill_seconds)
    for params in arms.values():  # warm-up; compiles the schema once (the engine's cache keeps it)
        llm.generate(prompts[:4], [params.clone(max_tokens=4)] * 4, use_tqdm=False)

    runs: list[dict[str, Any]] = []
    for i in range(args.runs):
        order = list(arms) if i % 2 == 0 else list(reversed(arms))  # interleaved, alternating which goes first
        for name in order:
            fill_seconds[0] = 0.0
            start = time.perf_counter()
            outputs = llm.generate(prompts, [arms[name]] * len(prompts), use_tqdm=False)
            elapsed = time.perf_counter() - start
            produced = sum(len(o.outputs[0].token_ids) for o in outputs)
            runs.append({"arm": name, "seconds": elapsed, "output_tokens": produced,
                         "tokens_per_s": produced / elapsed, "mask_fill_s": fill_seconds[0],
                         "finish_reasons": sorted({o.outputs[0].finish_reason for o in outputs})})
            print(f"run {i} {name}: {produced} tokens in {elapsed:.2f} s = {produced / elapsed:.1f} tok/s "
                  f"(mask fill {fill_seconds[0] * 1000:.0f} ms)")
    medians = {name: statistics.median(r["tokens_per_s"] for r in runs if r["arm"] == name) for name in arms}
    ratio = medians["json_schema"] / medians["unconstrained"]
    print(f"median output tok/s: unconstrained {medians['unconstrained']:.1f}, json_schema {medians['json_schema']:.1f}"
          f" -> {ratio:.3f}x (target >= 0.9x)")
    compile_ms = _compile_times(llm, args.compile_repeats)
    for name, ms in compile_ms.items():
        print(f"compile {name}: {ms:.1f} ms")
    path = write_json_report({"args": vars(args), "runs": runs, "median_tokens_per_s": medians, "ratio": ratio,
                              "compile_ms": compile_ms}, "structured-output", args.output_json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
