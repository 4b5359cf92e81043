"""The command line: tokenmill generate / chat / bench throughput on a tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tokenmill import LLM, SamplingParams


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenmill.entrypoints.cli", "--log-level", "WARNING", *args],
        input=stdin, capture_output=True, text=True, timeout=300,
    )


def test_generate_streams_the_same_text_as_the_api(tiny_checkpoint) -> None:
    path = str(tiny_checkpoint("llama"))
    result = _cli("generate", "--model", path, "--max-tokens", "6", "--timing", "Hello there")
    assert result.returncode == 0, result.stderr
    expected = LLM(model=path).generate("Hello there", SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert result.stdout == expected[0].outputs[0].text + "\n"
    assert "process start to first token" in result.stderr


def test_chat_reads_turns_from_stdin(tiny_checkpoint) -> None:
    result = _cli("chat", "--model", str(tiny_checkpoint("llama")), "--max-tokens", "4", stdin="Hi\nAnd again\n\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("> ") >= 2


def test_bad_flag_value_is_a_clear_error(tiny_checkpoint) -> None:
    result = _cli("generate", "--model", str(tiny_checkpoint("llama")), "--max-tokens", "0", "x")
    assert result.returncode == 2
    assert "max_tokens" in result.stderr


def test_bench_throughput_writes_json(tiny_checkpoint, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = _cli(
        "bench", "throughput", "--model", str(tiny_checkpoint("llama")), "--num-prompts", "4",
        "--input-len-range", "8:24", "--output-len-range", "2:6", "--baseline", "hf", "--num-runs", "2",
        "--output-json", str(out),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"tokenmill", "hf"}
    assert len(report["results"]["tokenmill"]["runs_s"]) == 2
    assert report["ratio_vs_hf"] > 0
    assert 4 * 2 <= report["workload"]["output_tokens"] <= 4 * 6


def test_bench_throughput_profile_reports_the_step_breakdown(tiny_checkpoint, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = _cli(
        "bench", "throughput", "--model", str(tiny_checkpoint("llama")), "--num-prompts", "3", "--input-len", "8",
        "--output-len", "4", "--num-runs", "1", "--profile", "--output-json", str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "model forward" in result.stdout and "steps, mean step" in result.stdout
    profile = json.loads(out.read_text())["profile"]
    assert set(profile["sections"]) == {"schedule", "prepare_inputs", "forward", "sample", "update", "other"}
    assert profile["num_steps"] >= 4  # a prefill step, then one step per further output token
    assert all(row["seconds"] >= 0 for row in profile["sections"].values())
    assert sum(row["share"] for row in profile["sections"].values()) == pytest.approx(1.0, abs=0.01)
    assert 0 < profile["non_forward_share"] < 1


@pytest.mark.parametrize("text", ["3:1", "0:4", "x"])
def test_bad_length_range(text: str) -> None:
    from tokenmill.bench.throughput import parse_range

    with pytest.raises(ValueError):
        parse_range(text)
