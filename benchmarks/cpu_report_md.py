"""Targets and Markdown tables of benchmarks/cpu_report.py, from its JSON report (plain dicts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    label: str
    path: tuple[str, ...]  # where the measured value sits under report["sections"]
    goal: float
    at_least: bool  # pass when value >= goal; else when value < goal
    unit: str


BUSY_LOAD = 1.0  # 1-minute load average, before the run, above which the timings are flagged as disturbed
W1, MIXED, BATCH1 = ("w1", "results"), ("mixed", "results"), ("batch1", "results")
TARGETS = (
    Target("W1 offline: tokenmill fp32 vs HF", (*W1, "tokenmill fp32", "ratio_vs_hf"), 2.5, True, "x"),
    Target("W1 offline: tokenmill int8 vs HF", (*W1, "tokenmill int8", "ratio_vs_hf"), 3.0, True, "x"),
    Target("batch-1 decode: tokenmill int8 vs HF", (*BATCH1, "tokenmill int8", "decode_ratio_vs_hf"), 6.0, True, "x"),
    Target("batch-1 decode: tokenmill int4 vs HF", (*BATCH1, "tokenmill int4", "decode_ratio_vs_hf"), 6.0, True, "x"),
    Target("batch-1 decode: tokenmill fp32 vs HF", (*BATCH1, "tokenmill fp32", "decode_ratio_vs_hf"), 2.5, True, "x"),
    Target("serving at 1 req/s: p99 TTFT", ("serve", "summary", "p99_ttft_ms"), 500.0, False, " ms"),
    Target("serving at 1 req/s: p99 TPOT", ("serve", "summary", "p99_tpot_ms"), 100.0, False, " ms"),
    Target("mixed lengths: tokenmill fp32 vs HF", (*MIXED, "tokenmill fp32", "ratio_vs_hf"), 4.0, True, "x"),
    Target("mixed lengths: tokenmill int8 vs HF", (*MIXED, "tokenmill int8", "ratio_vs_hf"), 4.0, True, "x"),
)


def evaluate_targets(sections: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for target in TARGETS:
        value: Any = sections
        for key in target.path:
            value = value.get(key) if isinstance(value, dict) else None
        passed = None if value is None else (value >= target.goal if target.at_least else value < target.goal)
        rows.append({"target": target.label, "value": value, "unit": target.unit, "pass": passed,
                     "goal": f"{'>=' if target.at_least else '<'} {target.goal:g}{target.unit}"})
    return rows


def fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def md_machine(m: dict[str, Any]) -> list[str]:
    cpu = m["cpu"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["flags"].items())
    rows = [[f"fp32 GEMM peak ({m['gemm_peak_size']}^3)", fmt(m["gemm_peak_gflops"], suffix=" GFLOP/s")]]
    rows += [[f"fp32 GEMM {name} (M,K,N = {', '.join(map(str, g['mkn']))})", fmt(g["gflops"], suffix=" GFLOP/s")]
             for name, g in m["gemm_shapes"].items()]
    rows += [["read bandwidth (x.sum())", fmt(m["read_GBps"], suffix=" GB/s")],
             ["copy bandwidth (read + write bytes)", fmt(m["copy_GBps"], suffix=" GB/s")]]
    return ["## Machine", "",
            (f"{cpu['model_name']}; {cpu['logical_cores']} logical cores, torch threads {cpu['torch_threads']}, "
             f"L3 {cpu['l3_cache']}; torch {cpu['torch']}; flags: {flags}."), "",
            *table(["ceiling", f"median of {m['repeats']}"], rows)]


def md_throughput(sections: dict[str, Any]) -> list[str]:
    rows = []
    for name in ("w1", "mixed"):
        if name not in sections:
            continue
        section = sections[name]
        for engine, r in section["results"].items():
            rows.append([name, section["workload"]["description"], engine, fmt(r["median_s"], ".2f"),
                         fmt(r["output_tok_per_s"]), fmt(r["total_tok_per_s"]), fmt(r.get("ratio_vs_hf"), ".2f", "x"),
                         fmt(r["gflops"]), fmt(r["gemm_peak_fraction"] and 100 * r["gemm_peak_fraction"], ".0f", "%")])
    if not rows:
        return []
    return ["## Offline throughput", "", *table(
        ["section", "workload", "engine", "median s", "output tok/s", "total tok/s", "vs HF", "GFLOP/s",
         "of GEMM peak"], rows)]


def md_batch1(section: dict[str, Any]) -> list[str]:
    rows = [[engine, fmt(r["decode_tok_per_s"]), fmt(r["e2e_tok_per_s"]), fmt(1e3 * r["ttft_s"], ".0f", " ms"),
             fmt(r.get("decode_ratio_vs_hf"), ".2f", "x"), fmt(r.get("e2e_ratio_vs_hf"), ".2f", "x"),
             fmt(r["weight_bytes_per_step"] / 1e6, ".0f"), fmt(r["weight_GBps"]),
             fmt(r["read_bw_fraction"] and 100 * r["read_bw_fraction"], ".0f", "%")]
            for engine, r in section["results"].items()]
    return [f"## Batch-1 decode ({section['workload']['description']})", "", *table(
        ["engine", "decode tok/s", "end-to-end tok/s", "prefill + 1 token", "decode vs HF", "e2e vs HF",
         "weight MB/step", "weight GB/s", "of read BW"], rows)]


def md_serve(section: dict[str, Any]) -> list[str]:
    s, w = section["summary"], section["workload"]
    row = [section["quantization"], f"{w['description']}, {w['request_rate']:g} req/s",
           f"{s['completed']} / {s['failed']}", *(fmt(s[f"{p}_{m}_ms"], ".0f") for m in ("ttft", "tpot")
                                                  for p in ("p50", "p99")),
           fmt(s["output_throughput"]), f"exit {section['server']['returncode']}"]
    title = f"## Serving (`tokenmill serve`, Poisson arrivals; median of {section.get('num_runs', 1)} run(s))"
    per_run = [" / ".join(fmt(r[f"p99_{m}_ms"], ".0f") for r in section.get("runs", [])) for m in ("ttft", "tpot")]
    note = ["", f"Per run, p99 TTFT ms: {per_run[0]}; p99 TPOT ms: {per_run[1]}."] if section.get("runs") else []
    return [title, "", *table(
        ["quantization", "workload", "completed / failed", "p50 TTFT ms", "p99 TTFT ms", "p50 TPOT ms",
         "p99 TPOT ms", "output tok/s", "server"], [row]), *note]


def md_targets(rows: list[dict[str, Any]]) -> list[str]:
    status = {True: "pass", False: "FAIL", None: "not measured"}
    body = [[r["target"], fmt(r["value"], ".2f" if r["unit"] == "x" else ".0f", r["unit"]), r["goal"],
             status[r["pass"]]] for r in rows]
    return ["## Targets", "", *table(["target", "measured", "goal", "status"], body)]


def md_method(report: dict[str, Any]) -> list[str]:
    c = report["model"]["costs"]
    per_token, per_row = c["flops_per_token"] / 1e6, c["flops_per_sampled_row"] / 1e6
    weight_mb = {q: b / 1e6 for q, b in c["decode_weight_bytes"].items()}
    return ["## How the fractions are computed", "",
            (f"- FLOPs = {per_token:.1f} M x processed tokens + {per_row:.1f} M x sampled rows, i.e. 2 x decoder"
             " matmul parameters x (prompt + output tokens - prompts) + 2 x hidden x vocab x output tokens"
             " (attention products left out); fraction = FLOPs / median time / GEMM peak."),
            (f"- Batch-1 weight bytes per decode step: fp32 {weight_mb['none']:.0f} MB (4 bytes per parameter), int8"
             f" {weight_mb['int8']:.0f} MB (1 byte per decoder matmul and lm_head weight + a 4-byte scale per output"
             f" channel; norms fp32), int4 {weight_mb.get('int4', float('nan')):.0f} MB (0.625 bytes per decoder"
             " matmul weight: 4 bits + an fp16 scale and minimum per 32; lm_head as int8); fraction = bytes x decode tok/s / read bandwidth (above 100% means the"
             " weights partly stay in cache)."),
            "- Decode tok/s = (output tokens - 1) / (time of the full run - time of a 1-token run of the same prompt)."]


def markdown(report: dict[str, Any]) -> str:
    sections = report["sections"]
    load = report["load_average"]
    lines = [f"# CPU performance report, {report['date']}", "",
             (f"Model: {report['model']['name']}. Median of {report['args']['runs']} interleaved run(s), "
              f"{report['torch_threads']} torch threads. "
              f"Load average (1 min) at start {load['start']:.2f}, at end {fmt(load.get('end'), '.2f')}. "
              f"Took {fmt(report.get('elapsed_s'), '.0f', ' s')}."), "", f"`{report['command']}`", ""]
    if load["start"] >= BUSY_LOAD:
        lines += [(f"**The machine was busy (load average {load['start']:.2f} before this run started): other"
                   " processes took cores from the timed threads, so these timings do not measure tokenmill. Re-run on"
                   " an idle machine.**"), ""]
    parts = [md_machine(sections["machine"]) if "machine" in sections else [], md_throughput(sections),
             md_batch1(sections["batch1"]) if "batch1" in sections else [],
             md_serve(sections["serve"]) if "serve" in sections else [], md_targets(report["targets"]),
             md_method(report)]
    for part in parts:
        if part:
            lines += [*part, ""]
    return "\n".join(lines)
