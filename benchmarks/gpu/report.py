"""Plans, derived figures (bandwidth, matmul utilization, target ratios) and the Markdown table of check.py."""

from __future__ import annotations

from typing import Any

TARGETS = {"bf16_b1_copy_fraction": 0.80, "b64_vs_hf": 5.0, "fp8_vs_bf16_b1": 1.6}


def timing_plan(gpu: bool) -> dict[str, Any]:
    if gpu:
        return dict(
            dtype="bfloat16", batches=[1, 16, 64, 256], prompt_len=128, steps=64, prefill_prompts=16,
            prefill_len=512, hf_batches=[1, 16, 64], hf_tokens=32, engine_s=60, hf_s=40,
            engine=dict(device="cuda", dtype="bfloat16", block_size=16, max_model_len=2048, kv_cache_memory=12 << 30,
                        max_num_seqs=256, max_num_batched_tokens=8192, enable_prefix_caching=False),
        )
    return dict(
        dtype="float32", batches=[1, 4], prompt_len=16, steps=4, prefill_prompts=4, prefill_len=64,
        hf_batches=[1, 4], hf_tokens=12, engine_s=5, hf_s=5,
        engine=dict(device="cpu", dtype="float32", block_size=16, max_model_len=512, kv_cache_memory=64 << 20,
                    max_num_seqs=8, max_num_batched_tokens=512, enable_prefix_caching=False),
    )


def annotate(result: dict[str, Any], costs: dict[str, float], ceilings: dict[str, float] | None) -> None:
    """Adds bytes moved / FLOPs per step and their rates (and fractions of the measured ceilings)."""
    copy_bw = (ceilings or {}).get("copy_GBps")
    gemm = (ceilings or {}).get("gemm_TFLOPs")
    params = costs["linear_params"] + costs["lm_head_params"]
    for d in result.get("decode", []):
        b, ctx = d["batch"], d["mean_context"]
        nbytes = costs["weight_bytes"] + b * (ctx + 1) * costs["kv_bytes_per_token"]
        flops = b * (2 * params + ctx * costs["attn_flops_per_query_key"])
        for key, ms in (("", d["step_ms"]), ("graph_", d.get("graph_forward_ms"))):
            if ms:
                d[f"{key}GBps"] = nbytes / ms / 1e6
                d[f"{key}TFLOPs"] = flops / ms / 1e9
                if copy_bw:
                    d[f"{key}copy_fraction"] = d[f"{key}GBps"] / copy_bw
                if gemm:
                    d[f"{key}gemm_fraction"] = d[f"{key}TFLOPs"] / gemm
    p = result.get("prefill")
    if p:
        n, length = p["num_prompts"], p["prompt_len"]
        flops = (2 * costs["linear_params"] * n * length + 2 * costs["lm_head_params"] * n
                 + n * length * (length + 1) / 2 * costs["attn_flops_per_query_key"])
        p["TFLOPs"] = flops / p["seconds"] / 1e12
        if gemm:
            p["gemm_fraction"] = p["TFLOPs"] / gemm


def _decode_at(results: dict[str, Any], label: str, batch: int) -> dict[str, Any] | None:
    for d in (results.get(label) or {}).get("decode", []):
        if d["batch"] == batch:
            return d
    return None


def summary(results: dict[str, Any], gpu: bool) -> dict[str, Any]:
    if not gpu:
        return {"note": "dry run on the CPU: no GPU figure was measured; targets not evaluated"}
    out: dict[str, Any] = {}
    b1 = _decode_at(results, "tokenmill_bf16", 1)
    if b1 and "copy_fraction" in b1:
        out["bf16_b1_copy_fraction"] = {"engine_step": b1["copy_fraction"], "graph_forward": b1.get("graph_copy_fraction")}
    b64 = _decode_at(results, "tokenmill_bf16", 64)
    hf64 = next((h for h in results.get("hf_generate") or [] if h["batch"] == 64), None)
    if b64 and hf64 and hf64["tok_s"]:
        out["b64_vs_hf"] = b64["tok_s"] / hf64["tok_s"]
    f1 = _decode_at(results, "tokenmill_fp8", 1)
    if b1 and f1:
        out["fp8_vs_bf16_b1"] = f1["tok_s"] / b1["tok_s"]
    for key, target in TARGETS.items():
        value = out.get(key)
        measured = value["engine_step"] if isinstance(value, dict) else value
        out[f"{key}_target"] = target
        out[f"{key}_met"] = None if measured is None else measured >= target
    return out


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# tokenmill GPU check ({results.get('mode', '?')})", ""]
    env = results.get("environment") or {}
    lines.append("Environment: " + ", ".join(f"{k}={_fmt(v)}" for k, v in env.items()))
    ceil = results.get("ceilings") or {}
    if ceil:
        lines.append(f"Ceilings measured here: copy {_fmt(ceil['copy_GBps'], 0)} GB/s (read+write), "
                     f"GEMM {_fmt(ceil['gemm_TFLOPs'])} TFLOP/s ({ceil['gemm_dtype']}, {ceil['gemm_size']}^3)")
    tests = results.get("kernel_tests") or {}
    if tests:
        lines.append(f"Kernel tests: {'PASS' if tests['passed'] else 'FAIL'} ({tests['summary']})")
    parity = results.get("parity_tiny") or {}
    if parity:
        lines.append(f"HF greedy parity (tiny Llamas, float32): {'PASS' if parity.get('passed') else 'FAIL'}")
    tp = results.get("tensor_parallel") or {}
    if tp:
        verdict = "skipped" if tp.get("passed") is None else "PASS" if tp["passed"] else "FAIL"
        lines.append(f"Tensor parallel TP=2 vs TP=1 greedy (tiny Llama, float32, {tp.get('backend', '-')}): {verdict}"
                     + (f" ({tp['skipped']})" if tp.get("skipped") else ""))
    for name in ("fp8_linear", "fp8_kv"):
        r = results.get(name)
        if r:
            err = r.get("max_rel_err_vs_bf16", r.get("rel_err_vs_bf16_cache"))
            lines.append(f"{name}: {'PASS' if r['passed'] else 'FAIL'} (rel. error {_fmt(err, 4)} < {r['tolerance']})")
    lines += ["", "| run | batch | tok/s | step ms | graph fwd ms | GB/s | % copy | graph % copy | TFLOP/s | % GEMM |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for label in ("tokenmill_bf16", "tokenmill_fp8", "tokenmill_fp8_kv8", "tokenmill_cpu_fp32"):
        for d in (results.get(label) or {}).get("decode", []):
            lines.append(f"| {label} | {d['batch']} | {_fmt(d['tok_s'])} | {_fmt(d['step_ms'], 2)} | "
                         f"{_fmt(d.get('graph_forward_ms'), 2)} | {_fmt(d.get('GBps'), 0)} | "
                         f"{_fmt(100 * d['copy_fraction'] if 'copy_fraction' in d else None)} | "
                         f"{_fmt(100 * d['graph_copy_fraction'] if 'graph_copy_fraction' in d else None)} | "
                         f"{_fmt(d.get('TFLOPs'), 2)} | "
                         f"{_fmt(100 * d['gemm_fraction'] if 'gemm_fraction' in d else None)} |")
    for h in results.get("hf_generate") or []:
        lines.append(f"| hf_generate | {h['batch']} | {_fmt(h['tok_s'])} | {_fmt(h['step_ms'], 2)} | - | - | - | - | - | - |")
    lines += ["", "| run | prefill tokens | tok/s | TFLOP/s | % GEMM | CUDA graph capture s |", "|---|---|---|---|---|---|"]
    for label in ("tokenmill_bf16", "tokenmill_fp8", "tokenmill_fp8_kv8", "tokenmill_cpu_fp32"):
        r = results.get(label) or {}
        p = r.get("prefill")
        if p:
            lines.append(f"| {label} | {p['num_prompts']}x{p['prompt_len']} | {_fmt(p['tok_s'])} | {_fmt(p.get('TFLOPs'), 1)} | "
                         f"{_fmt(100 * p['gemm_fraction'] if 'gemm_fraction' in p else None)} | {_fmt(r.get('capture_s'), 2)} |")
    summ = results.get("summary") or {}
    if summ:
        lines += ["", "Targets: " + ", ".join(f"{k}={_fmt(v, 3) if not isinstance(v, dict) else v}"
                                              for k, v in summ.items())]
    for key in ("skipped", "errors"):
        if results.get(key):
            lines += ["", f"{key.capitalize()}:"] + [f"- {k}: {v}" for k, v in results[key].items()]
    return "\n".join(lines) + "\n"
