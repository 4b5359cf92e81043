"""Process start to first generated token for `tokenmill generate` on the default model.

Runs the CLI in fresh processes (warm: the converted-GGUF cache exists; cold: a fresh, empty cache
directory) and reports the median of several runs, with `python -c "import torch"` measured in the
same run as the floor no Python engine can go under. Writes JSON.

    .venv/bin/python benchmarks/startup.py --runs 5 [--cold-runs 1] [--output-json PATH]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from tokenmill.bench.results import write_json_report

_TIMING = re.compile(r"process start to first token: ([0-9.]+) s")


def first_token_seconds(env: dict[str, str]) -> float:
    cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "--log-level", "WARNING", "generate", "--timing",
           "--max-tokens", "4", "Write a haiku about autumn"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    match = _TIMING.search(result.stderr)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"tokenmill generate failed:\n{result.stderr[-2000:]}")
    return float(match.group(1))


def import_torch_seconds() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cold-runs", type=int, default=1)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()

    env = dict(os.environ)
    first_token_seconds(env)  # make sure the warm cache exists
    warm, torch_floor = [], []
    for _ in range(args.runs):
        warm.append(first_token_seconds(env))
        torch_floor.append(import_torch_seconds())
    cold = []
    for _ in range(args.cold_runs):
        with tempfile.TemporaryDirectory() as cache:
            cold.append(first_token_seconds({**env, "XDG_CACHE_HOME": cache}))
    report = {
        "benchmark": "startup",
        "warm_first_token_s": {"runs": warm, "median": statistics.median(warm)},
        "cold_first_token_s": {"runs": cold, "median": statistics.median(cold) if cold else None},
        "import_torch_s": {"runs": torch_floor, "median": statistics.median(torch_floor)},
    }
    out = write_json_report(report, "startup", args.output_json)
    print(f"warm: median {report['warm_first_token_s']['median']:.2f} s over {len(warm)} runs {warm}")
    if cold:
        print(f"cold: median {report['cold_first_token_s']['median']:.2f} s over {len(cold)} runs {cold}")
    print(f"import torch alone: median {report['import_torch_s']['median']:.2f} s")
    print(f"report: {out}")


if __name__ == "__main__":
    main()
