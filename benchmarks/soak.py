"""Soak: `tokenmill serve` at saturation for a set time, with clients that misbehave, then checks that nothing leaked.

Clients (asyncio, httpx; --concurrency of them, each sending its next request as soon as the last ends) mix:
completions and chat, streamed and not (some with n = 2), streams dropped after a few chunks, requests whose client
gives up after a random short timeout (an abort), bad inputs (invalid JSON, n too large, negative max_tokens, an
unknown model, a prompt longer than the context, empty messages), and prompts that share long prefixes (prefix-cache
hits). Phases: a warm-up load, a pause until the server is idle (the baseline: RSS, open file descriptors, threads),
the main load, a pause until idle again (the end). Checks, each pass or fail in the report (exit status 1 on any
failure):
  - every request got exactly one final response (a streamed choice: exactly one chunk with a finish_reason, then
    [DONE]; a bad input: a 4xx with OpenAI's error body), or ended by its own client (dropped, timed out); no 5xx;
  - on the idle server, /metrics reports 0 running, 0 waiting and 0 KV-cache usage (every block free);
  - RSS grew < 5% from the baseline to the end; no more file descriptors or threads at the end than at the baseline;
  - the server still answers (/health 200 and one more completion).

    .venv/bin/python benchmarks/soak.py [--minutes 20] [--concurrency 24] [--output PATH]
    .venv/bin/python benchmarks/soak.py --minutes 1      # the make-test version (tests/e2e/test_soak.py)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tokenmill.bench.results import write_json_report
from tokenmill.bench.server_process import free_port, running_server
from tokenmill.worker.capabilities import detect_capabilities

WORDS = ["river", "stone", "lantern", "orbit", "maple", "signal", "copper", "harbor", "meadow", "quartz", "violet",
         "engine", "canyon", "ember", "velvet", "compass", "thunder", "glacier", "saffron", "beacon"]
MAX_MODEL_LEN = 1024
# name -> weight of each kind of client request
MIX = {"completion": 20, "chat": 15, "stream": 20, "stream_n2": 5, "dropped_stream": 15, "timeout": 10, "bad": 15}
BAD_KINDS = ("invalid_json", "n_too_large", "negative_max_tokens", "unknown_model", "too_long", "empty_messages")


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)  # "kind/outcome" -> count
    failures: list[str] = field(default_factory=list)  # what broke a check, first 50 kept

    def ok(self, kind: str, outcome: str) -> None:
        self.outcomes[f"{kind}/{outcome}"] += 1

    def fail(self, kind: str, what: str) -> None:
        self.outcomes[f"{kind}/FAILED"] += 1
        if len(self.failures) < 50:
            self.failures.append(f"{kind}: {what}")


def _prefixes(rng: random.Random) -> list[str]:
    """Four long shared prefixes (~300 words each): requests that start with one hit the prefix cache."""
    return [" ".join(rng.choice(WORDS) for _ in range(300)) for _ in range(4)]


def _prompt(rng: random.Random, prefixes: list[str]) -> str:
    tail = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
    return f"{rng.choice(prefixes)} {tail}" if rng.random() < 0.6 else tail


def _check_final(kind: str, response: httpx.Response, tally: Tally) -> None:
    if response.status_code != 200:
        tally.fail(kind, f"HTTP {response.status_code}: {response.text[:200]}")
        return
    body = response.json()
    reasons = [c.get("finish_reason") for c in body.get("choices", [])]
    if not reasons or any(r not in ("stop", "length") for r in reasons) or "usage" not in body:
        tally.fail(kind, f"not one final output per choice: {reasons}")
        return
    tally.ok(kind, "final")


async def _stream(client: httpx.AsyncClient, kind: str, body: dict[str, Any], n: int, drop_after: int | None,
                  tally: Tally) -> None:
    """A streamed chat request read to its end (each choice: exactly one chunk with a finish_reason, then [DONE]),
    or dropped by the client after `drop_after` chunks."""
    finals: Counter = Counter()
    chunks = 0
    done = False
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            tally.fail(kind, f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if done:
                tally.fail(kind, "data after [DONE]")
                return
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                tally.fail(kind, f"error in stream: {chunk['error']}")
                return
            for choice in chunk.get("choices", []):
                if choice.get("finish_reason") is not None:
                    finals[choice["index"]] += 1
            chunks += 1
            if drop_after is not None and chunks >= drop_after:
                tally.ok(kind, "dropped_by_client")
                return  # leaving the block closes the connection mid-stream
    if not done or sorted(finals) != list(range(n)) or any(v != 1 for v in finals.values()):
        tally.fail(kind, f"stream ended with [DONE]={done}, finals per choice {dict(finals)}")
        return
    tally.ok(kind, "final")


async def _bad(client: httpx.AsyncClient, rng: random.Random, model: str, tally: Tally) -> None:
    bad = rng.choice(BAD_KINDS)
    good = {"model": model, "prompt": "hello", "max_tokens": 4}
    if bad == "invalid_json":
        response = await client.post("/v1/completions", content=b'{"prompt": "x", "max_tokens": ',
                                     headers={"content-type": "application/json"})
    else:
        body = {
            "n_too_large": {**good, "n": 10_000},
            "negative_max_tokens": {**good, "max_tokens": -5},
            "unknown_model": {**good, "model": "no-such-model"},
            "too_long": {**good, "prompt": [11] * (MAX_MODEL_LEN + 10)},
            "empty_messages": {"model": model, "messages": [], "max_tokens": 4},
        }[bad]
        path = "/v1/chat/completions" if bad == "empty_messages" else "/v1/completions"
        response = await client.post(path, json=body)
    kind = f"bad:{bad}"
    error = response.json().get("error") if response.headers.get("content-type", "").startswith("application/json") \
        else None
    if 400 <= response.status_code < 500 and isinstance(error, dict) and error.get("message"):
        tally.ok(kind, f"rejected_{response.status_code}")
    else:
        tally.fail(kind, f"HTTP {response.status_code}: {response.text[:200]}")


async def _one(client: httpx.AsyncClient, rng: random.Random, prefixes: list[str], model: str, max_tokens: int,
               tally: Tally) -> None:
    kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
    tokens = rng.randint(1, max_tokens)
    messages = [{"role": "user", "content": _prompt(rng, prefixes)}]
    try:
        if kind == "completion":
            body = {"model": model, "prompt": _prompt(rng, prefixes), "max_tokens": tokens, "temperature": 0.8}
            _check_final(kind, await client.post("/v1/completions", json=body), tally)
        elif kind == "chat":
            body = {"model": model, "messages": messages, "max_tokens": tokens, "temperature": 0.0}
            _check_final(kind, await client.post("/v1/chat/completions", json=body), tally)
        elif kind in ("stream", "stream_n2", "dropped_stream"):
            n = 2 if kind == "stream_n2" else 1
            body = {"model": model, "messages": messages, "max_tokens": max(tokens, 8), "stream": True, "n": n,
                    "temperature": 0.7}
            drop = rng.randint(1, 6) if kind == "dropped_stream" else None
            await _stream(client, kind, body, n, drop, tally)
        elif kind == "timeout":
            body = {"model": model, "prompt": _prompt(rng, prefixes), "max_tokens": max_tokens, "ignore_eos": True}
            try:
                response = await client.post("/v1/completions", json=body, timeout=rng.uniform(0.05, 1.5))
                _check_final(kind, response, tally)
            except httpx.TimeoutException:
                tally.ok(kind, "timed_out_by_client")
        else:
            await _bad(client, rng, model, tally)
    except httpx.TimeoutException:
        tally.fail(kind, "no answer within the client's 120 s")
    except httpx.TransportError as exc:
        tally.fail(kind, f"transport error: {type(exc).__name__}: {exc}")


async def _load(base_url: str, seconds: float, concurrency: int, seed: int, model: str, max_tokens: int,
                tally: Tally) -> None:
    """Requests from `concurrency` clients until `seconds` pass (each recorded in `tally`: one outcome each)."""
    deadline = time.monotonic() + seconds
    rng = random.Random(seed)
    prefixes = _prefixes(rng)

    async def client_loop(i: int) -> None:
        crng = random.Random(seed * 1000 + i)
        limits = httpx.Limits(max_connections=4, max_keepalive_connections=2)
        async with httpx.AsyncClient(base_url=base_url, timeout=120.0, limits=limits, trust_env=False) as client:
            while time.monotonic() < deadline:
                await _one(client, crng, prefixes, model, max_tokens, tally)

    await asyncio.gather(*(client_loop(i) for i in range(concurrency)))


def _proc_stats(pid: int) -> dict[str, float]:
    """RSS (MiB), open file descriptors and threads of the server process."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields_ = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_mib": int(fields_["VmRSS"].split()[0]) / 1024, "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(fields_["Threads"])}


def _fd_targets(pid: int) -> list[str]:
    """What the server's open file descriptors point to (sockets, pipes, files), for the report."""
    targets = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue  # closed meanwhile
    return targets


def _settled_stats(pid: int, baseline: dict[str, float], timeout_s: float = 10.0) -> dict[str, float]:
    """The server's stats once its last connections have closed: a connection the clients just dropped may hold a
    descriptor for a moment after the engine is idle; a leak is one that stays. Waits up to timeout_s for the fds
    and threads to come back to the baseline's."""
    deadline = time.monotonic() + timeout_s
    stats = _proc_stats(pid)
    while (stats["fds"] > baseline["fds"] or stats["threads"] > baseline["threads"]) and time.monotonic() < deadline:
        time.sleep(0.25)
        stats = _proc_stats(pid)
    return stats


def _gauges(base_url: str) -> dict[str, float]:
    text = httpx.get(base_url + "/metrics", timeout=10.0, trust_env=False).text
    wanted = {"tokenmill:num_requests_running": "running", "tokenmill:num_requests_waiting": "waiting",
              "tokenmill:kv_cache_usage_perc": "kv_usage"}
    values = {}
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in wanted:
            values[wanted[name]] = values.get(wanted[name], 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def _wait_idle(base_url: str, timeout_s: float = 60.0) -> tuple[bool, dict[str, float], float]:
    """Until /metrics shows nothing running or waiting and no KV block in use; (idle, gauges, seconds waited)."""
    start = time.monotonic()
    gauges: dict[str, float] = {}
    while time.monotonic() - start < timeout_s:
        gauges = _gauges(base_url)
        if gauges and all(v == 0 for v in gauges.values()):
            return True, gauges, time.monotonic() - start
        time.sleep(0.25)
    return False, gauges, time.monotonic() - start


class _Sampler:
    """The server's RSS, fds and threads every `every_s` seconds, in the background of the load."""

    def __init__(self, pid: int, every_s: float) -> None:
        self.pid, self.every_s, self.curve = pid, every_s, []
        self.t0 = time.monotonic()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.curve.append({"t_s": round(time.monotonic() - self.t0, 1), **_proc_stats(self.pid)})
            try:
                await asyncio.wait_for(stop.wait(), self.every_s)
            except asyncio.TimeoutError:
                pass


async def _phase(base_url: str, seconds: float, args: argparse.Namespace, seed: int, tally: Tally,
                 sampler: _Sampler) -> None:
    stop = asyncio.Event()
    sampling = asyncio.create_task(sampler.run(stop))
    await _load(base_url, seconds, args.concurrency, seed, args.model_name, args.max_tokens, tally)
    stop.set()
    await sampling


def soak(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--port", str(port),
           "--served-model-name", args.model_name, "--max-model-len", str(MAX_MODEL_LEN), *args.server_args]
    log_path = Path(args.log or f"/tmp/tokenmill-soak-{port}.log")
    total_s = args.minutes * 60
    warmup_s = min(max(10.0, 0.1 * total_s), 120.0)
    tally = Tally()
    checks: dict[str, bool] = {}
    with running_server("tokenmill", cmd, port, log_path) as server:
        pid, base = server.proc.pid, server.base_url
        sampler = _Sampler(pid, args.sample_every_s)
        asyncio.run(_phase(base, warmup_s, args, 1, tally, sampler))
        idle, gauges, _ = _wait_idle(base)
        time.sleep(2.0)  # the warm-up's last connections close before the baseline is taken
        baseline = _proc_stats(pid)
        baseline_fds = _fd_targets(pid)
        start = time.monotonic()
        asyncio.run(_phase(base, total_s - warmup_s, args, 2, tally, sampler))
        load_s = time.monotonic() - start
        idle, gauges, idle_wait = _wait_idle(base)
        end = _settled_stats(pid, baseline)
        end_fds = _fd_targets(pid)
        health = httpx.get(base + "/health", timeout=10.0, trust_env=False).status_code
        last = httpx.post(base + "/v1/completions", json={"model": args.model_name, "prompt": "Still there?",
                                                          "max_tokens": 4}, timeout=60.0, trust_env=False)
        checks["every request got exactly one final response or ended by its client"] = not tally.failures
        checks["idle: 0 running, 0 waiting, every KV block free (/metrics)"] = idle
        growth = end["rss_mib"] / baseline["rss_mib"] - 1
        checks["RSS grew < 5% after warm-up"] = growth < 0.05
        checks["no file descriptors leaked"] = end["fds"] <= baseline["fds"]
        checks["no threads leaked"] = end["threads"] <= baseline["threads"]
        checks["still answers (/health 200, a completion)"] = health == 200 and last.status_code == 200
        alive = server.proc.poll() is None
    checks["the server ran to the end"] = alive
    sent = sum(tally.outcomes.values())  # every request sent records exactly one outcome
    return {"machine": detect_capabilities().summary(), "args": vars(args), "requests_sent": sent,
            "requests_per_s": sent / (warmup_s + load_s), "outcomes": dict(sorted(tally.outcomes.items())),
            "failures": tally.failures, "baseline": baseline, "end": end, "rss_growth": growth,
            "idle_gauges": gauges, "idle_wait_s": idle_wait, "fd_targets": {"baseline": baseline_fds, "end": end_fds},
            "curve": sampler.curve, "checks": checks,
            "passed": all(checks.values()), "server_log": str(log_path)}


def _print_report(report: dict[str, Any]) -> None:
    print(f"machine: {report['machine']}")
    print(f"requests: {report['requests_sent']} ({report['requests_per_s']:.1f}/s)")
    print("\n| outcome | count |\n|---|---|")
    for key, count in report["outcomes"].items():
        print(f"| {key} | {count} |")
    b, e = report["baseline"], report["end"]
    print(f"\nRSS {b['rss_mib']:.0f} -> {e['rss_mib']:.0f} MiB ({report['rss_growth'] * 100:+.1f}%), "
          f"fds {b['fds']} -> {e['fds']}, threads {b['threads']} -> {e['threads']}; idle after "
          f"{report['idle_wait_s']:.1f} s: {report['idle_gauges']}")
    curve = report["curve"]
    step = max(1, len(curve) // 12)
    print("RSS curve (s: MiB): " + ", ".join(f"{p['t_s']:.0f}: {p['rss_mib']:.0f}" for p in curve[::step]))
    print("\n| check | result |\n|---|---|")
    for name, ok in report["checks"].items():
        print(f"| {name} | {'pass' if ok else 'FAIL'} |")
    for failure in report["failures"][:10]:
        print(f"failure: {failure}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=24, help="clients, each with one request at a time")
    parser.add_argument("--max-tokens", type=int, default=48, help="the largest max_tokens a client asks")
    parser.add_argument("--sample-every-s", type=float, default=5.0, help="RSS / fds / threads sampling period")
    parser.add_argument("--model-name", default="soak-model")
    parser.add_argument("--log", default=None, help="the server's log file (default /tmp/tokenmill-soak-PORT.log)")
    parser.add_argument("--output", default=None)
    parser.add_argument("server_args", nargs="*", help="after --: more `tokenmill serve` flags")
    args = parser.parse_args(argv)
    report = soak(args)
    _print_report(report)
    print(f"report: {write_json_report(report, 'soak', args.output)}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
