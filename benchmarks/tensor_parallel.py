"""Tensor parallelism on this machine, side by side with one rank: W1-shaped offline throughput (64 requests x 256
tokens in, --output-len out) and batch-1 decode TPOT, for TP = 1 with every core against TP = N with the cores
shared out (one thread per rank on a 2-core machine), the engines built in turn and the rounds interleaved. For
TP = N it reports rank 0's time in collectives per step (the step's broadcast, the all-reduces, the C forward's
included, the logits' gather; waiting for the other ranks included). Issue targets (2 cores): W1 at TP = 2 >= 0.9x
TP = 1; batch-1 TPOT <= 1.15x.

    .venv/bin/python benchmarks/tensor_parallel.py [--model PATH] [--tp 2] [--rounds 3] [--output-len 64] \
        [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from tokenmill import LLM, SamplingParams
from tokenmill.bench.results import write_json_report
from tokenmill.bench.throughput import make_workload
from tokenmill.kernels.cpu.step_forward import PHASES
from tokenmill.worker.c_step import CStepForward
from tokenmill.worker.capabilities import detect_capabilities


def _measure(tp: int, args: argparse.Namespace) -> dict[str, float]:
    with LLM(model=args.model, tensor_parallel_size=tp, dtype=args.dtype, enable_prefix_caching=False) as llm:
        engine = llm.engine
        special = set(getattr(llm.tokenizer, "all_special_ids", []) or []) | set(engine.eos_token_ids)
        prompts = make_workload(args.num_prompts, args.input_len, args.output_len, engine.vocab_size, 0,
                                special_ids=special).prompts
        comm = engine.core.worker.tp
        worker = engine.core.worker
        execute = worker.execute
        steps = {"n": 0}

        def counted(step: Any) -> Any:
            steps["n"] += 1
            return execute(step)

        worker.execute = counted
        # The C forward's own all-reduces (its last phase; waits for the other ranks included), besides comm's.
        c_step = next((p for p in worker.runner.step_paths if isinstance(p, CStepForward)), None)
        clock = None
        if c_step is not None:
            clock = c_step.kernel.phase_seconds = torch.zeros(len(PHASES), dtype=torch.float64)
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        steps["n"], comm.busy_s = 0, 0.0
        if clock is not None:
            clock.zero_()
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        w1_s = time.perf_counter() - start
        in_collectives = comm.busy_s + (float(clock[-1]) if clock is not None else 0.0)
        collective_ms = in_collectives / max(steps["n"], 1) * 1000
        step_ms = w1_s / max(steps["n"], 1) * 1000
        # batch 1: one request at a time; TPOT from its decode time
        one = SamplingParams(temperature=0.0, max_tokens=args.batch1_tokens, ignore_eos=True)
        tpots = []
        for prompt in prompts[:3]:
            t0 = time.perf_counter()
            llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), use_tqdm=False)
            t1 = time.perf_counter()
            llm.generate([prompt], one, use_tqdm=False)
            t2 = time.perf_counter()
            tpots.append(((t2 - t1) - (t1 - t0)) / (args.batch1_tokens - 1) * 1000)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"w1_tok_s": tokens / w1_s, "w1_step_ms": step_ms, "collective_ms_per_step": collective_ms,
            "batch1_tpot_ms": statistics.median(tpots)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded default model)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--batch1-tokens", type=int, default=128,
                        help="tokens per batch-1 request (TPOT: (time for these - time for one) / (these - 1))")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    print(f"machine: {detect_capabilities().summary()}")
    runs: dict[int, list[dict[str, float]]] = {1: [], args.tp: []}
    for _ in range(args.rounds):
        for tp in (1, args.tp):
            runs[tp].append(_measure(tp, args))
            print(f"TP={tp}: {runs[tp][-1]}")
    med = {tp: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for tp, rs in runs.items()}
    one, many = med[1], med[args.tp]
    print(f"TP=1: W1 {one['w1_tok_s']:.1f} tok/s, batch-1 TPOT {one['batch1_tpot_ms']:.2f} ms")
    print(f"TP={args.tp}: W1 {many['w1_tok_s']:.1f} tok/s ({many['w1_tok_s'] / one['w1_tok_s']:.2f}x), batch-1 TPOT "
          f"{many['batch1_tpot_ms']:.2f} ms ({many['batch1_tpot_ms'] / one['batch1_tpot_ms']:.2f}x), collectives "
          f"{many['collective_ms_per_step']:.2f} ms of {many['w1_step_ms']:.1f} ms per W1 step")
    path = write_json_report({"args": vars(args), "runs": {str(k): v for k, v in runs.items()},
                              "median": {str(k): v for k, v in med.items()}}, "tensor-parallel", args.output_json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
