"""The execution plan: which kernel runs each operation, chosen by timing the correct candidates on this
machine, on this model's shapes (TensorRT's tactic selection, for every device we run on).

Operations and their candidates (only those correct for the model's dtype and quantization, and only those
that exist here: a C kernel that cannot be built for this CPU is simply not a candidate):
  projections (qkv_proj, o_proj, gate_up_proj, down_proj), by row-count bucket (ROW_BUCKETS):
      float32: c_f32_panels (kernels/cpu/f32_gemm.c) | torch_fp32 (MKL)
      bfloat16 / float16: torch_bf16 / torch_fp16 (oneDNN; AMX tiles where the CPU has them)
      int8: c_int8_panels; int4, by INT4_ROW_BUCKETS: c_int4 (its own rule inside: the W4A16 C kernel for decode
      rows, dequantized to float32 above) | c_int4_bf16 (bf16 products over panels dequantized in cache, on a CPU
      with AVX512-BF16 or AMX-BF16, or in a bf16 model; the C forward follows this choice)
  lm_head (the vocabulary projection), by sampled-row bucket (LOGIT_BUCKETS): the same families;
  greedy_head, greedy rows' ids from a float32 or bf16 panel lm_head, by row bucket (GREEDY_BUCKETS): c_head_argmax
      (the head's own: the bf16 panels' fused argmax, or argmax over its logits) | c_int8_screen (layers/
      screened_head.py: an int8 copy of the weight screens the panels, the head's own kernel on the few that pass;
      the same ids); the screen takes the buckets it won up to the first it lost;
  prompt_attention, the causal attention of a prompt whose whole context is in the step, by its length
      (PROMPT_ATTENTION_BUCKETS): c_paged (kernels/cpu/prefill_attention.c over the paged cache) | torch_sdpa
      (torch's fused attention over the step's own K/V in the model's dtype; oneDNN) | c_bf16 (a bf16 or int8/int4
      model on a CPU with AMX-BF16 or AVX512-BF16: kernels/cpu/bf16_prompt_attention.c over the same rows, rounded
      to bf16; the C forward follows this choice);
  whole steps, once the KV cache exists: decode steps of DECODE_STEP_BUCKETS requests and a prompt step
      of PROMPT_STEP_BUCKETS tokens (prompts of PROMPT_LEN tokens each): c_forward (the one-call C forward,
      kernels/cpu/step_forward.c, worker/c_step.py) | layers
      (layer by layer, with the projections chosen above). Prompt steps are timed on the first
      PROMPT_STEP_TIMING_LAYERS layers and their times scaled to the whole depth (the table shows the scaled times).
A row count between buckets runs the kernel of the next bucket up (beyond the last, the last's).

The plan is cached as JSON under the tokenmill cache (plans/), keyed by everything its timings depend on:
the machine (CPU model, ISA flags, torch threads, torch version), the model's shapes, dtype, quantization,
KV cache dtype and block size, the kernel family, a digest of the C kernels' sources, and PLAN_VERSION (bumped
when the candidates change). A second
start with the same key reads it and times nothing. `kernels` forces a family ("c" or "torch") for tests
and A/B runs; an operation with no candidate of that family keeps the ones it has.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenmill.worker import cpu_load
from tokenmill.worker.capabilities import MachineCapabilities
from tokenmill.worker.cpu_load import CpuSample

logger = logging.getLogger("tokenmill")

PLAN_VERSION = 22  # bumped when the candidates or their kernels change (21: greedy_head had a logits candidate)
ROW_BUCKETS = (1, 16, 64, 256, 2048)
# An int4 projection's: its two kernels cross over at a few rows (the W4A16 C kernel's time grows with every row, the
# bf16 route's dequantization is paid once per call), and decode batches of 2-16 requests are common in serving.
INT4_ROW_BUCKETS = (1, 4, 8, 16, 64, 256, 2048)
# 8: speculative decoding verifies 1 + K rows per request; on the AMX Xeon MKL's float32 product at 5 rows of the
# 49152-token vocabulary took 8.1 ms against the panels' 6.6 ms (bucket 16 alone routed 2..16 rows to MKL).
LOGIT_BUCKETS = (1, 8, 16, 64, 256)
# Greedy rows' ids from the vocabulary projection: the int8 screen (layers/screened_head.py) reads fewer bytes, which
# pays where the head is memory-bound (few rows); larger steps keep the head's own argmax without being timed.
GREEDY_BUCKETS = (1, 4, 16)
DECODE_STEP_BUCKETS = (1, 16, 64)
# 2048: the default max_num_batched_tokens; the ones between find where the C forward stops winning.
PROMPT_STEP_BUCKETS = (256, 512, 1024, 2048)
PROMPT_LEN = 256  # tokens of each prompt in a timed prompt step
PROMPT_STEP_TIMING_LAYERS = 6  # prompt steps are timed on this many layers, scaled to the model's depth
PROMPT_ATTENTION_BUCKETS = (256, 2048)  # rows of one whole-context prompt whose attention is timed
STEP_CONTEXT = 256  # context length of each request in the timed decode steps
KERNEL_FAMILIES = ("auto", "c", "torch")


@dataclass(frozen=True)
class Choice:
    operation: str  # "qkv_proj", "lm_head", "decode_step", "prompt_step"
    rows: int  # the bucket: rows of the product, sampled rows, requests of a decode step, tokens of a prompt step
    kernel: str
    seconds: dict[str, float]  # median time of every candidate timed
    disturbed: bool = False  # other work still shared the cores on the last of CHOICE_ATTEMPTS timings

    def runner_up_ratio(self) -> float:
        """The chosen kernel's time over the fastest candidate's (1.0: the fastest was chosen)."""
        return self.seconds[self.kernel] / min(self.seconds.values())


@dataclass
class ExecutionPlan:
    key: str
    machine: str
    choices: list[Choice] = field(default_factory=list)
    build_seconds: float = 0.0
    cached: bool = False
    # When a plan to build was created: the CPU time of the machine and of this process (worker/cpu_load.py), so
    # that finish_plan can tell whether other work shared the cores while the candidates were timed. Not saved.
    timing_start: CpuSample | None = field(default=None, compare=False, repr=False)

    def kernel(self, operation: str, rows: int) -> str | None:
        """The chosen kernel for this operation at this row count (the next bucket up), None if unplanned."""
        ops = sorted((c for c in self.choices if c.operation == operation), key=lambda c: c.rows)
        for choice in ops:
            if rows <= choice.rows:
                return choice.kernel
        return ops[-1].kernel if ops else None

    def for_operation(self, operation: str) -> list[Choice]:
        return sorted((c for c in self.choices if c.operation == operation), key=lambda c: c.rows)

    def table(self) -> str:
        """Markdown: operation, bucket, chosen kernel, each candidate's time."""
        built = "cached" if self.cached else f"built in {self.build_seconds:.1f} s"
        lines = [f"Execution plan ({built}); machine: {self.machine}", "",
                 "| operation | rows | chosen | candidates (ms) |", "|---|---|---|---|"]
        for c in self.choices:
            times = ", ".join(f"{k} {v * 1e3:.3f}" for k, v in sorted(c.seconds.items(), key=lambda kv: kv[1]))
            lines.append(f"| {c.operation} | {c.rows} | {c.kernel} | {times} |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "machine": self.machine, "build_seconds": self.build_seconds,
                "choices": [asdict(c) for c in self.choices]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExecutionPlan:
        return cls(key=data["key"], machine=data["machine"], build_seconds=float(data["build_seconds"]),
                   choices=[Choice(**c) for c in data["choices"]], cached=True)


def plan_key(caps: MachineCapabilities, model_signature: str, settings: dict[str, Any]) -> str:
    parts = [f"v{PLAN_VERSION}", caps.cache_key(), model_signature] + [f"{k}={settings[k]}" for k in sorted(settings)]
    return " | ".join(parts)


def plan_path(cache_root: Path, key: str) -> Path:
    return cache_root / "plans" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")


def load_plan(cache_root: Path, key: str) -> ExecutionPlan | None:
    """The cached plan of this key, or None (absent, unreadable, or another key's)."""
    path = plan_path(cache_root, key)
    try:
        plan = ExecutionPlan.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return plan if plan.key == key else None


def save_plan(cache_root: Path, plan: ExecutionPlan) -> None:
    path = plan_path(cache_root, plan.key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        tmp.write_text(json.dumps(plan.to_json(), indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache: the plan is rebuilt next start
        logger.warning("could not cache the execution plan at %s: %s", path, exc)


def median_time(fns: dict[str, Callable[[], Any]], budget_s: float = 0.25, max_repeats: int = 7) -> dict[str, float]:
    """Median seconds per call of each candidate, sampled interleaved (A B A B ...) so that a change in the
    machine's load hits every candidate alike. One untimed warm-up call each; then repeats until about
    budget_s is spent per candidate (at least 3, at most max_repeats)."""
    first: dict[str, float] = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
    slowest = max(first.values())
    repeats = max(3, min(max_repeats, int(budget_s / max(slowest, 1e-6))))
    inner = {name: max(1, min(50, int(2e-3 / max(t, 1e-7)))) for name, t in first.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / inner[name])
    return {name: sorted(s)[len(s) // 2] for name, s in samples.items()}


# A candidate listed earlier (the preferred one) is kept unless a later one is faster by more than this
# fraction: timings of near-equal kernels flip with noise, and flipping between buckets costs a second
# weight layout. The chosen kernel is so always within TIE_MARGIN of the fastest measured.
TIE_MARGIN = 0.03
CHOICE_ATTEMPTS = 3
# A later candidate that beats the preferred one by less than this is timed once more before it is chosen (each
# candidate keeps the lower of its two medians): on a shared VM a few seconds of a neighbour's memory traffic, which
# no CPU-time count shows, moved whole-step timings by 10-20% and flipped choices (a 512-token prompt step went to
# the layer path at 309 against 344 ms; interleaved afterwards the C forward took 309 against 335).
CONFIRM_MARGIN = 0.15


def _first_within_tie(fns: dict[str, Callable[[], Any]], seconds: dict[str, float]) -> str:
    """The first candidate, in order of preference, within TIE_MARGIN of the fastest."""
    fastest = min(seconds.values())
    return next(name for name in fns if seconds[name] <= fastest * (1 + TIE_MARGIN))


def choose(operation: str, rows: int, fns: dict[str, Callable[[], Any]]) -> Choice:
    """Times the candidates (in order of preference) and picks the first within TIE_MARGIN of the fastest. A timing
    during which other work shared the cores (worker/cpu_load.py) is done again, up to CHOICE_ATTEMPTS times; a
    later candidate's narrow win (CONFIRM_MARGIN) is timed again before it counts."""
    others = None
    for _ in range(CHOICE_ATTEMPTS):
        before = cpu_load.sample()
        seconds = median_time(fns) if len(fns) > 1 else {name: median_time({name: fn}, budget_s=0.05)[name]
                                                         for name, fn in fns.items()}
        others = cpu_load.disturbed(before, cpu_load.sample(), torch.get_num_threads())
        if others is None:
            break
        logger.info("plan: %s at %d rows was timed while other work kept %.1f cores busy", operation, rows, others)
    kernel, preferred = _first_within_tie(fns, seconds), next(iter(fns))
    if kernel != preferred and seconds[preferred] <= seconds[kernel] * (1 + CONFIRM_MARGIN):
        again = median_time(fns)
        seconds = {name: min(seconds[name], again[name]) for name in fns}
        kernel = _first_within_tie(fns, seconds)
    return Choice(operation, rows, kernel, seconds, disturbed=others is not None)


def filter_family(candidates: dict[str, Any], family: str) -> dict[str, Any]:
    """The candidates of the forced family ("c_*" or "torch_*"); all of them when none is of it."""
    if family == "auto":
        return candidates
    kept = {name: c for name, c in candidates.items() if name.startswith(family + "_")}
    return kept or candidates


def routes_from_choices(choices: list[Choice]) -> list[tuple[int, str]]:
    """(max_rows, kernel) runs of equal kernels over increasing buckets; the last route's bound is unused."""
    routes: list[tuple[int, str]] = []
    for c in choices:
        if routes and routes[-1][1] == c.kernel:
            routes[-1] = (c.rows, c.kernel)
        else:
            routes.append((c.rows, c.kernel))
    return routes


def module_signature(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    names = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")
    return ",".join(f"{n}={getattr(cfg, n, None)}" for n in names)
