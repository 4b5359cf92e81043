"""The GPU check, in one call (benchmarks/gpu/check.sh runs it): kernel tests, HF parity, ceilings,
and decode / prefill timings of a Llama-3-8B-shaped model (random weights) in bf16 and FP8 against
HF transformers' generate in the same run. Writes check.json and check.md under --out.

Without CUDA it is a dry run: the kernel tests run in Triton's interpreter, and the same timing code
runs on a tiny model on the CPU (so the driver itself is exercised); the JSON says what was skipped.
A deadline keeps the whole call inside its budget: sections that would start after it are skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu import report
from benchmarks.gpu.parity import fp8_kv_check, fp8_linear_check, tiny_parity
from benchmarks.gpu.tensor_parallel import tensor_parallel_check
from benchmarks.gpu.workloads import (
    LLAMA3_8B,
    TINY_64,
    build_engine,
    build_hf_model,
    decode_benchmark,
    hf_decode_benchmark,
    model_costs,
    prefill_benchmark,
)

# All of tests/kernels but the engine test, whose fixture needs the embedded default model's package
# (not on the device machine; check.py's own parity section covers the engine there).
KERNEL_TESTS = ["tests/kernels", "--ignore=tests/kernels/test_triton_engine.py"]


class Check:
    def __init__(self, out: Path, budget_s: float) -> None:
        self.out = out
        self.start = time.perf_counter()
        self.deadline = self.start + budget_s
        self.results: dict[str, Any] = {"skipped": {}, "errors": {}}

    def section(self, name: str, fn: Callable[[], Any], needs_s: float = 0.0, store: bool = True) -> Any:
        left = self.deadline - time.perf_counter()
        if left < needs_s:
            self.results["skipped"][name] = f"time budget: {left:.0f} s left, needs ~{needs_s:.0f} s"
            print(f"== {name}: skipped ({self.results['skipped'][name]})", flush=True)
            return None
        print(f"== {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - one failing section must not lose the others' results
            traceback.print_exc()
            self.results["errors"][name] = f"{type(exc).__name__}: {exc}"
            value = None
        else:
            if store:
                self.results[name] = value
        print(f"== {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        self.save()
        return value

    def skip(self, name: str, why: str) -> None:
        self.results["skipped"][name] = why

    def save(self) -> None:
        self.results["elapsed_s"] = time.perf_counter() - self.start
        (self.out / "check.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "check.md").write_text(report.markdown(self.results))


def environment() -> dict[str, Any]:
    import transformers
    import triton

    env = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
               transformers=transformers.__version__, cuda=torch.cuda.is_available())
    if env["cuda"]:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, multiprocessors=props.multi_processor_count,
                   memory_gib=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}")
    return env


def kernel_tests(out: Path, timeout_s: int) -> dict[str, Any]:
    """pytest in a subprocess (on the CPU tests/kernels/conftest.py selects the interpreter)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    (out / "kernel_tests.log").write_text(proc.stdout + proc.stderr)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    return {"passed": proc.returncode == 0, "summary": summary, "seconds": time.perf_counter() - t0}


def ceilings(device: torch.device) -> dict[str, float]:
    """Device-to-device copy bandwidth (bytes read + written) and a large GEMM's rate, on random data."""
    import triton.testing

    gpu = device.type == "cuda"
    n = (1 << 30) if gpu else (1 << 25)  # 2 GiB of bf16 on the GPU; 64 MiB of fp32 on the CPU
    dtype = torch.bfloat16 if gpu else torch.float32
    src = torch.randn(n, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    size = 8192 if gpu else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    if gpu:
        copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
        gemm_ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    else:
        copy_ms = _cpu_median_ms(lambda: dst.copy_(src))
        gemm_ms = _cpu_median_ms(lambda: a @ b)
    return {"copy_GBps": 2 * src.numel() * src.element_size() / copy_ms / 1e6,
            "gemm_TFLOPs": 2 * size**3 / gemm_ms / 1e9, "gemm_dtype": str(dtype), "gemm_size": size}


def _cpu_median_ms(fn: Callable[[], Any], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def engine_timings(check: Check, hf: Any, shape: dict, label: str, plan: dict, **engine_args: Any) -> None:
    def run() -> dict[str, Any]:
        core = build_engine(hf, **plan["engine"], **engine_args)
        graphs = getattr(core.runner, "cuda_graphs", None)
        result: dict[str, Any] = {"capture_s": graphs.capture_seconds if graphs else None,
                                  "graph_sizes": graphs.sizes if graphs else [], "engine_args": engine_args}
        result["decode"] = []
        for batch in plan["batches"]:
            result["decode"].append(decode_benchmark(core, batch, plan["prompt_len"], plan["steps"], seed=batch))
            print(f"   {label} decode batch {batch}: {result['decode'][-1]['tok_s']:.1f} tok/s", flush=True)
        result["prefill"] = prefill_benchmark(core, plan["prefill_prompts"], plan["prefill_len"], seed=99)
        print(f"   {label} prefill: {result['prefill']['tok_s']:.0f} tok/s", flush=True)
        del core
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return result

    check.section(label, run, needs_s=plan["engine_s"])
    fp8 = engine_args.get("quantization") == "fp8"
    kv8 = engine_args.get("kv_cache_dtype") == "fp8"
    elem = 2 if plan["dtype"] == "bfloat16" else 4
    costs = model_costs(shape, 1 if fp8 else elem, 1 if kv8 else elem)
    if check.results.get(label):
        report.annotate(check.results[label], costs, check.results.get("ceilings"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no section after this")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, args.budget_s)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    check.results["mode"] = "gpu" if gpu else "dry-run (no CUDA): GPU figures are NOT measured"
    check.section("environment", environment)
    check.section("kernel_tests", lambda: kernel_tests(args.out, 240 if gpu else 150), needs_s=60)
    check.section("parity_tiny", lambda: tiny_parity(device), needs_s=30)
    if gpu:
        check.section("fp8_linear", lambda: fp8_linear_check(device), needs_s=20)
        check.section("fp8_kv", lambda: fp8_kv_check(device), needs_s=10)
    else:
        for name in ("fp8_linear", "fp8_kv", "cuda_graphs"):
            check.skip(name, "no CUDA device")
    check.section("tensor_parallel", lambda: tensor_parallel_check(device), needs_s=40)
    check.section("ceilings", lambda: ceilings(device))

    shape = LLAMA3_8B if gpu else TINY_64
    plan = report.timing_plan(gpu)
    hf = check.section("build_models", lambda: build_hf_model(shape, getattr(torch, plan["dtype"]), device),
                       needs_s=plan["engine_s"], store=False)
    if hf is not None:
        check.results["model"] = {"shape": "llama3-8b" if gpu else "tiny (dry run)", **shape}
        engine_timings(check, hf, shape, "tokenmill_bf16" if gpu else "tokenmill_cpu_fp32", plan)
        if gpu:
            engine_timings(check, hf, shape, "tokenmill_fp8", plan, quantization="fp8")
            engine_timings(check, hf, shape, "tokenmill_fp8_kv8", dict(plan, batches=[64, 256]),
                           quantization="fp8", kv_cache_dtype="fp8")
        else:
            check.skip("tokenmill_fp8", "no CUDA device (FP8 needs Hopper)")
        check.section("hf_generate", lambda: [hf_decode_benchmark(hf, b, plan["prompt_len"], plan["hf_tokens"], seed=b)
                                              for b in plan["hf_batches"]], needs_s=plan["hf_s"])
    check.results["summary"] = report.summary(check.results, gpu)
    check.save()
    print(report.markdown(check.results), flush=True)
    return 0 if not check.results["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
