"""What the engine -> worker step contract (worker/step_input.py) would cost across a process boundary: per step of
a W1-shaped run (64 requests x 256 tokens in, decode to --output-len), the time to pickle and unpickle the step's
StepInput and the worker's ModelRunnerOutput, against the step itself. The run feeds the worker the unpickled
messages, so what is timed is what a worker process would get. Prints the medians over each step kind and the
decode steps' ratio (issue target: < 2% of a decode step at batch 64); writes a JSON report.

    .venv/bin/python benchmarks/step_messages.py [--output-len 64] [--quantization int8]
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import time
from collections import defaultdict
from typing import Any

from tokenmill import LLM, SamplingParams
from tokenmill.bench.results import write_json_report
from tokenmill.bench.throughput import make_workload
from tokenmill.worker.capabilities import detect_capabilities


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--quantization", default="none", choices=["none", "int8", "int4"])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    print(f"machine: {detect_capabilities().summary()}")

    llm = LLM(model=args.model, quantization=args.quantization, enable_prefix_caching=False)
    engine = llm.engine
    special = set(getattr(llm.tokenizer, "all_special_ids", []) or []) | set(engine.eos_token_ids)
    prompts = make_workload(args.num_prompts, args.input_len, args.output_len, engine.vocab_size, 0,
                            special_ids=special).prompts
    worker = engine.core.worker
    execute = worker.execute
    steps: dict[str, list[dict[str, float]]] = defaultdict(list)

    def crossing(step: Any) -> Any:
        start = time.perf_counter()
        raw_in = pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)
        received = pickle.loads(raw_in)
        sent = time.perf_counter()
        out = execute(received)
        ran = time.perf_counter()
        returned = pickle.loads(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))
        done = time.perf_counter()
        kind = "decode" if all(w.num_new_tokens == 1 for w in step.scheduled) else "prefill"
        steps[kind].append({"message_us": ((sent - start) + (done - ran)) * 1e6, "step_ms": (ran - sent) * 1e3,
                            "bytes": len(raw_in), "reqs": len(step.scheduled)})
        return returned

    worker.execute = crossing
    llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    steps.clear()
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True),
                 use_tqdm=False)
    summary: dict[str, dict[str, float]] = {}
    for kind, rows in steps.items():
        if kind == "decode":  # the batch-64 decode steps (the tail decodes fewer as requests finish)
            rows = [r for r in rows if r["reqs"] == args.num_prompts] or rows
        med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        med["ratio"] = med["message_us"] / 1e3 / med["step_ms"]
        summary[kind] = med
        print(f"{kind}: {len(rows)} steps, median {med['reqs']:.0f} requests, message {med['bytes']:.0f} bytes, "
              f"pickle round trips {med['message_us']:.0f} us, step {med['step_ms']:.1f} ms: {med['ratio']:.2%}")
    path = write_json_report({"args": vars(args), "summary": summary, "steps": steps}, "step-messages",
                             args.output_json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
