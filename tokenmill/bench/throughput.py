"""Offline throughput benchmark: random-token prompts, ignore_eos, tokenmill vs an HF baseline run
in the same process. Reports the median of several runs and the ratio."""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def parse_range(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    low, _, high = text.partition(":")
    lo, hi = int(low), int(high or low)
    if not 1 <= lo <= hi:
        raise ValueError(f"a range must be LOW:HIGH with 1 <= LOW <= HIGH, got {text!r}")
    return lo, hi


def make_workload(
    num_prompts: int, input_len: int, output_len: int, vocab_size: int, seed: int,
    input_range: tuple[int, int] | None = None, output_range: tuple[int, int] | None = None,
    special_ids: set[int] | None = None,
) -> Workload:
    gen = torch.Generator().manual_seed(seed)

    def lengths(fixed: int, rng: tuple[int, int] | None) -> list[int]:
        if rng is None:
            return [fixed] * num_prompts
        return torch.randint(rng[0], rng[1] + 1, (num_prompts,), generator=gen).tolist()

    in_lens, out_lens = lengths(input_len, input_range), lengths(output_len, output_range)
    banned = torch.tensor(sorted(special_ids or set()), dtype=torch.int64)
    prompts = []
    for n in in_lens:
        ids = torch.randint(0, vocab_size, (n,), generator=gen)
        if banned.numel():
            # Replace special tokens so a prompt never contains an EOS or chat marker.
            ids = torch.where(torch.isin(ids, banned), torch.full_like(ids, 1000 % vocab_size), ids)
        prompts.append(ids.tolist())
    return Workload(prompts, out_lens)


def run_tokenmill(llm: Any, workload: Workload) -> float:
    from tokenmill import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
    start = time.perf_counter()
    outputs = llm.generate(workload.prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    if produced != workload.num_output_tokens:
        raise RuntimeError(f"tokenmill produced {produced} tokens, expected {workload.num_output_tokens}")
    return elapsed


def build_hf_model(loaded: Any) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(loaded.hf_config.to_hf_config(), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"HF baseline weights mismatch: missing={missing[:3]} unexpected={unexpected[:3]}")
    model.tie_weights()
    return model.eval()


@torch.inference_mode()
def run_hf(model: Any, workload: Workload, pad_id: int, max_batch_size: int) -> float:
    """HF generate as a static batch: left-padded, each batch runs to its longest requested output."""
    start = time.perf_counter()
    for b in range(0, len(workload.prompts), max_batch_size):
        prompts = workload.prompts[b : b + max_batch_size]
        max_new = max(workload.output_lens[b : b + max_batch_size])
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
        mask = torch.zeros((len(prompts), width), dtype=torch.int64)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        model.generate(
            input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
            min_new_tokens=max_new, pad_token_id=pad_id,
        )
    return time.perf_counter() - start


@dataclass
class ThroughputResult:
    engine: str
    elapsed_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    total_tokens: int = 0

    @property
    def median_s(self) -> float:
        return statistics.median(self.elapsed_s)

    def summary(self) -> dict[str, Any]:
        return {
            "engine": self.engine, "runs_s": [round(t, 3) for t in self.elapsed_s], "median_s": round(self.median_s, 3),
            "output_tok_per_s": round(self.output_tokens / self.median_s, 2),
            "total_tok_per_s": round(self.total_tokens / self.median_s, 2),
        }


def benchmark(args: Any) -> dict[str, Any]:
    from tokenmill import LLM
    from tokenmill.engine.step_timer import NULL_TIMER, StepTimer

    timer = StepTimer() if getattr(args, "profile", False) else NULL_TIMER
    llm = LLM(model=args.model, step_timer=timer, **args.engine_kwargs)
    tokenizer = llm.tokenizer
    vocab = int(llm.engine.vocab_size)
    special = set(getattr(tokenizer, "all_special_ids", []) or []) | set(llm.engine.eos_token_ids)
    workload = make_workload(
        args.num_prompts, args.input_len, args.output_len, vocab, args.prompt_seed,
        parse_range(args.input_len_range), parse_range(args.output_len_range), special,
    )
    warmup = make_workload(2, 16, 4, vocab, args.prompt_seed + 1, special_ids=special)
    results = {"tokenmill": ThroughputResult("tokenmill")}
    hf_model = None
    if args.baseline == "hf":
        from tokenmill.loader import load_model

        hf_model = build_hf_model(load_model(args.model))
        results["hf"] = ThroughputResult("hf")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        run_hf(hf_model, warmup, pad_id, args.hf_max_batch_size)
    run_tokenmill(llm, warmup)
    if timer.enabled:
        timer.reset()  # the breakdown covers the timed runs only
    for _ in range(args.num_runs):
        # Interleave engines so machine drift hits both alike.
        results["tokenmill"].elapsed_s.append(run_tokenmill(llm, workload))
        if hf_model is not None:
            results["hf"].elapsed_s.append(run_hf(hf_model, workload, pad_id, args.hf_max_batch_size))
    for r in results.values():
        r.output_tokens, r.total_tokens = workload.num_output_tokens, workload.num_output_tokens + workload.num_prompt_tokens
    report: dict[str, Any] = {
        "benchmark": "throughput",
        "workload": {
            "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
            "input_len_range": args.input_len_range, "output_len_range": args.output_len_range,
            "prompt_tokens": workload.num_prompt_tokens, "output_tokens": workload.num_output_tokens,
            "seed": args.prompt_seed, "num_runs": args.num_runs,
        },
        "engine_args": args.engine_kwargs,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "results": {name: r.summary() for name, r in results.items()},
    }
    if hf_model is not None:
        report["ratio_vs_hf"] = round(results["hf"].median_s / results["tokenmill"].median_s, 3)
    if timer.enabled:  # summed over all timed tokenmill runs
        report["profile"] = timer.breakdown(sum(results["tokenmill"].elapsed_s))
    return report


