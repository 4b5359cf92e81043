"""Data-parallel replicas (`tokenmill serve --data-parallel-size 2`, engine/data_parallel.py): each replica a process
with its own engine; greedy outputs equal one engine's, under concurrency too; requests sharing a prompt prefix land
on one replica, whose prefix cache then hits, while unrelated ones spread (read from /metrics); Ctrl-C (SIGINT to
the whole process group) stops every replica through the server (exit 0); a replica killed with SIGKILL gives errors, /health 503, a non-zero exit and no orphan process."""

from __future__ import annotations

import concurrent.futures
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.e2e.served import children, running, serving, spawned_children, stream_outcome
from tokenmill import LLM, SamplingParams

MAX_TOKENS = 6
ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", "256", "--kv-cache-memory", str(32 << 20)]


@contextmanager
def _dp_server(model: str, log_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    with serving(["--model", model, "--data-parallel-size", "2", *ENGINE_ARGS], log_path) as server:
        yield server.base_url, server.proc


def _complete(url: str, prompt: list[int]) -> list[int]:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True, "logprobs": 1}
    response = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["logprobs"]["tokens"]


def _metric(text: str, name: str, replica: int) -> float:
    match = re.search(rf'^{re.escape(name)}\{{[^}}]*replica="{replica}"\}} (\S+)$', text, re.MULTILINE)
    assert match, f"{name} for replica {replica} missing from /metrics"
    return float(match.group(1))


def test_replicas_route_by_prefix_and_match_one_engine(tiny_checkpoint, tmp_path) -> None:
    model = str(tiny_checkpoint("llama"))
    rng = random.Random(0)
    system = [rng.randrange(1000, 40000) for _ in range(64)]  # four full KV blocks
    shared = [system + [rng.randrange(1000, 40000) for _ in range(5)] for _ in range(6)]
    unrelated = [[rng.randrange(1000, 40000) for _ in range(40)] for _ in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
    with LLM(model=model, dtype="float32", max_model_len=256, kv_cache_memory=32 << 20) as llm:
        expected = [[llm.engine.tokenizer.decode([t]) for t in out.outputs[0].token_ids]
                    for out in llm.generate(shared + unrelated, params, use_tqdm=False)]
    with _dp_server(model, tmp_path / "server.log") as (url, server):
        assert len(spawned_children(server.pid)) == 2
        for i, prompt in enumerate(shared):  # one at a time: each finds the previous ones' blocks cached
            assert _complete(url, prompt) == expected[i]
        metrics = httpx.get(url + "/metrics").text
        routed = [_metric(metrics, "tokenmill:dp_routed_requests_total", r) for r in (0, 1)]
        hits = [_metric(metrics, "tokenmill:dp_prefix_cache_hits_total", r) for r in (0, 1)]
        holder = routed.index(6.0)
        assert routed[1 - holder] == 0.0
        assert hits[holder] >= 5 * 64 and hits[1 - holder] == 0.0
        for i, prompt in enumerate(unrelated):
            assert _complete(url, prompt) == expected[len(shared) + i]
        metrics = httpx.get(url + "/metrics").text
        assert [_metric(metrics, "tokenmill:dp_routed_requests_total", r) for r in (0, 1)] == [7.0, 7.0]
        # Concurrent clients: every answer is still one engine's.
        prompts = shared + unrelated
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda p: _complete(url, p), prompts * 2))
        assert got == expected * 2
        metrics = httpx.get(url + "/metrics").text
        assert min(_metric(metrics, "tokenmill:dp_routed_requests_total", r) for r in (0, 1)) >= 14
        assert re.search(r'^tokenmill:num_requests_running\{[^}]*\} 0\.0$', metrics, re.MULTILINE)
        pids = children(server.pid)
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C: the replicas ignore it, the server drains and stops them
        assert server.wait(timeout=60) == 0
        time.sleep(0.5)
        assert not any(running(pid) for pid in pids), "a process of the server outlived it"
        assert "stopped (" not in (tmp_path / "server.log").read_text()  # no replica died on its own


def test_a_killed_replica_gives_errors_503_and_a_nonzero_exit(tiny_checkpoint, tmp_path) -> None:
    with _dp_server(str(tiny_checkpoint("llama")), tmp_path / "server.log") as (url, server):
        assert len(_complete(url, [5, 6, 7, 8])) == MAX_TOKENS
        pids = children(server.pid)
        replicas = spawned_children(server.pid)
        assert len(replicas) == 2
        # Whichever replica serves the stream, it ends in an error.
        long_stream = {"prompt": [1, 2, 3, 4], "max_tokens": 240, "ignore_eos": True, "stream": True}
        assert stream_outcome(url, long_stream, lambda: os.kill(replicas[0], signal.SIGKILL)) in ("error", "cut")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # /health says 503 until the server is gone
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 503:
                    failed = httpx.post(url + "/v1/completions", json={"prompt": [9, 10], "max_tokens": 2},
                                        timeout=60)
                    assert failed.status_code == 503 and "error" in failed.json()
                    break
            except httpx.HTTPError:
                break  # the server was already gone
            time.sleep(0.05)
        assert server.wait(timeout=60) != 0
        time.sleep(1)
        assert not any(running(pid) for pid in pids), "a process of the server outlived it"


def test_offline_engines_refuse_data_parallelism() -> None:
    with pytest.raises(ValueError, match="data_parallel_size"):
        LLM(data_parallel_size=2)
