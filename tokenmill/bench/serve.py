"""Serving benchmark: streams random-token prompts to any OpenAI-compatible server and measures
TTFT / TPOT / ITL / E2EL and throughputs (see serve_metrics.py for the definitions).

Works unchanged against `tokenmill serve`, vLLM and llama.cpp's llama-server: every request asks for
exactly `output_len` tokens (`max_tokens`, plus the vLLM/llama-server extensions `min_tokens` and
`ignore_eos`), greedy, streamed with `stream_options.include_usage`. Arrivals are a gamma process
(Poisson when burstiness is 1) at `request_rate`, or all at once when it is inf; `max_concurrency`
caps the requests in flight.
"""

from __future__ import annotations

import asyncio
import json
import math
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

try:  # the event loop uvicorn serves on too; absent on Windows
    import uvloop
except ImportError:  # pragma: no cover - platforms without uvloop
    uvloop = None

from tokenmill.bench.serve_metrics import RequestResult, compute_metrics, format_table

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


class ServerError(RuntimeError):
    """The server cannot be used at all (unreachable, refuses auth, no model); one line of text."""


@dataclass
class ServeBenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None  # None: the first model the server lists at /v1/models
    api_key: str | None = None
    request_rate: float = math.inf  # requests/s; inf sends every request at time 0
    burstiness: float = 1.0  # gamma shape of the inter-arrival times; 1 = Poisson
    num_prompts: int = 100
    input_len: int = 256
    output_len: int = 128
    input_len_range: tuple[int, int] | None = None  # uniform LOW..HIGH, overrides input_len
    # Shared prefixes (vLLM's prefix_repetition dataset): with prefix_len > 0 every prompt starts with one of
    # num_prefixes random prefixes of prefix_len tokens (in turn), followed by its own input_len tokens.
    prefix_len: int = 0
    num_prefixes: int = 1
    output_len_range: tuple[int, int] | None = None
    max_concurrency: int | None = None
    seed: int = 0
    tokenizer: str | None = None  # HF dir or hub name; None: --model if a local dir, else the default model's
    goodput_slos_ms: dict[str, float] = field(default_factory=dict)
    percentiles: list[float] = field(default_factory=lambda: [50.0, 90.0, 99.0])
    warmup: int = 0  # untimed requests sent (and awaited) before the timed run
    request_timeout_s: float = 600.0
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every request body

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (inf for all at once), got {self.request_rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if self.prefix_len < 0 or self.num_prefixes < 1:
            raise ValueError(f"prefix_len must be >= 0 and num_prefixes >= 1, got {self.prefix_len} and "
                             f"{self.num_prefixes}")
        for name in ("num_prompts", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")

    def url(self, path: str) -> str:
        base = self.base_url.rstrip("/")
        if base.endswith("/v1") and path.startswith("/v1/"):  # accept both http://h:p and http://h:p/v1
            base = base[: -len("/v1")]
        return base + path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class SampleRequest:
    prompt: str
    prompt_len: int  # tokens of `prompt` under the benchmark tokenizer (no special tokens added)
    output_len: int


# ---- tokenizer and prompts ------------------------------------------------------------------------

def load_default_tokenizer() -> Any:
    """The default model's tokenizer without loading its weights: from the converted model's cache
    entry when there is one, else converted from the GGUF metadata (~1 s, nothing written)."""
    from tokenmill.loader import default_model_path, load_tokenizer
    from tokenmill.loader.cache import gguf_entry, resolve_cache_dir
    from tokenmill.loader.tokenizer import convert_gguf_tokenizer

    gguf = default_model_path()
    entry = gguf_entry(gguf, resolve_cache_dir(None))
    if (entry / "tokenizer.json").is_file():
        try:
            return load_tokenizer(entry)
        except (OSError, ValueError):
            pass  # a damaged entry: the conversion below does not depend on it
    with tempfile.TemporaryDirectory(prefix="tokenmill-tok-") as tmp:
        return convert_gguf_tokenizer(gguf, tmp)


def resolve_tokenizer(path: str | None, model: str | None) -> Any:
    if path is None and model is not None and Path(model).expanduser().is_dir():
        path = model  # a server started on a local directory names its model by that path
    if path is None:
        return load_default_tokenizer()
    if Path(path).expanduser().is_dir():
        from tokenmill.loader import load_tokenizer

        return load_tokenizer(Path(path).expanduser())
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def allowed_token_ids(tokenizer: Any) -> np.ndarray:
    """Every id of the vocabulary except special and added-special tokens (EOS, chat markers, ...)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(tok, "special", True)}
    ids = np.array([i for i in range(len(tokenizer)) if i not in special], dtype=np.int64)
    if ids.size == 0:
        raise ValueError("the tokenizer has no non-special tokens to build prompts from")
    return ids


def exact_length_prompt(tokenizer: Any, rng: np.random.Generator, allowed: np.ndarray, n: int) -> tuple[str, int]:
    """Text of random tokens that re-encodes to exactly `n` tokens where the tokenizer allows it.

    Decoding then encoding can merge or split tokens, so the ids are trimmed or topped up and the
    round trip repeated; the returned length is always the true token count of the returned text.
    """
    ids = rng.choice(allowed, n).tolist()
    text, length = "", 0
    for _ in range(16):
        text = tokenizer.decode(ids)
        ids = tokenizer.encode(text, add_special_tokens=False)
        length = len(ids)
        if length == n:
            break
        ids = ids[:n] if length > n else ids + rng.choice(allowed, n - length).tolist()
    return text, length


def random_requests(tokenizer: Any, config: ServeBenchConfig, num: int, seed: int) -> list[SampleRequest]:
    rng = np.random.default_rng(seed)

    def lengths(fixed: int, span: tuple[int, int] | None) -> list[int]:
        return [fixed] * num if span is None else rng.integers(span[0], span[1] + 1, num).tolist()

    in_lens = lengths(config.input_len, config.input_len_range)
    out_lens = lengths(config.output_len, config.output_len_range)
    allowed = allowed_token_ids(tokenizer)
    prefixes = [exact_length_prompt(tokenizer, rng, allowed, config.prefix_len)[0] + " "
                for _ in range(config.num_prefixes)] if config.prefix_len else [""]
    requests = []
    for i, (n_in, n_out) in enumerate(zip(in_lens, out_lens, strict=True)):
        text, length = exact_length_prompt(tokenizer, rng, allowed, n_in)
        prefix = prefixes[i % len(prefixes)]
        if prefix:
            text = prefix + text
            length = len(tokenizer.encode(text, add_special_tokens=False))
        requests.append(SampleRequest(text, length, n_out))
    return requests


# ---- one streamed request -------------------------------------------------------------------------

def request_body(config: ServeBenchConfig, model: str, req: SampleRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model, "max_tokens": req.output_len, "min_tokens": req.output_len, "ignore_eos": True,
        "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
    }
    if config.endpoint == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    body.update(config.extra_body)
    return body


def _chunk_has_content(choice: dict[str, Any]) -> bool:
    """A chunk carries output when it has text (completions), delta content or reasoning (chat),
    or token ids/logprobs (a token whose text is still incomplete UTF-8 may have empty text)."""
    delta = choice.get("delta") or {}
    return bool(
        choice.get("text") or delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
        or choice.get("token_ids") or choice.get("logprobs")
    )


async def send_request(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: dict[str, Any], req: SampleRequest,
) -> RequestResult:
    """Stream one request; any failure is recorded in the result, never raised."""
    result = RequestResult(prompt_len=req.prompt_len, requested_output_len=req.output_len)
    num_chunks = 0
    start = last = time.perf_counter()
    try:
        async with session.post(url, json=body, headers=headers) as response:
            if response.status != 200:
                text = await response.text(errors="replace")
                result.error = f"HTTP {response.status}: {text[:300]}"
                return result
            async for raw in response.content:  # one line at a time
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, ": keep-alive" comments, "event:" lines
                data = line[len(b"data:"):].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    result.error = f"error in stream: {json.dumps(chunk['error'])[:300]}"
                    return result
                now = time.perf_counter()
                choices = chunk.get("choices") or []
                if choices and _chunk_has_content(choices[0]):
                    if result.ttft_s is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
                    num_chunks += 1
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    result.output_tokens, result.usage_reported = int(usage["completion_tokens"]), True
                    result.server_prompt_tokens = usage.get("prompt_tokens")
        result.latency_s = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - connection drops, timeouts, bad JSON: a failed request, never a crash
        result.error = f"{type(exc).__name__}: {exc}"[:300]
        return result
    if not result.usage_reported:
        result.output_tokens = num_chunks  # without usage, one content chunk counts as one token
    if result.ttft_s is None:
        result.error = "the stream ended without any generated text"
        return result
    result.success = True
    return result


# ---- the run --------------------------------------------------------------------------------------

async def probe_server(config: ServeBenchConfig) -> str:
    """Check the server answers and return the model name to use (the first listed when not given)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10.0)) as session:
        try:
            async with session.get(config.url("/v1/models"), headers=config.headers()) as response:
                status, text = response.status, await response.text(errors="replace")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise ServerError(
                f"cannot reach the server at {config.base_url} ({type(exc).__name__}: {exc or 'no answer'}); "
                "is it running? (start one with `tokenmill serve`, or pass --base-url)"
            ) from None
    if status in (401, 403):
        raise ServerError(f"the server at {config.base_url} refused access (HTTP {status}); pass --api-key")
    if config.model is not None:
        return config.model
    try:
        return str(json.loads(text)["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise ServerError(
            f"could not read a model name from {config.url('/v1/models')} (HTTP {status}); pass --model"
        ) from None


def arrival_delays(num: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds from the start at which each request is sent: cumulative gamma(shape=burstiness,
    mean=1/rate) gaps (exponential, i.e. Poisson arrivals, at burstiness 1); all 0 at rate inf."""
    if math.isinf(rate):
        return [0.0] * num
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), num)
    gaps[0] = 0.0  # the first request starts the clock
    return np.cumsum(gaps).tolist()


async def run_requests(
    config: ServeBenchConfig, model: str, requests: list[SampleRequest], delays: list[float],
) -> tuple[list[RequestResult], float]:
    """Send every request at its arrival time (waiting for a concurrency slot); results in order."""
    limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    url, headers = config.url(config.endpoint), config.headers()
    # request_timeout_s bounds each wait for the next bytes (a stalled stream), not a whole request
    timeout = aiohttp.ClientTimeout(total=None, connect=10.0, sock_read=config.request_timeout_s)
    # read_bufsize: a streamed line may hold up to twice it (aiohttp's readline); chunks with logprobs grow long
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0),
                                     read_bufsize=1 << 20) as session:

        async def one(req: SampleRequest) -> RequestResult:
            body = request_body(config, model, req)
            if limit is None:
                return await send_request(session, url, headers, body, req)
            async with limit:
                return await send_request(session, url, headers, body, req)

        start = time.perf_counter()
        tasks = []
        for req, delay in zip(requests, delays, strict=True):
            wait = start + delay - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(req)))
        results = list(await asyncio.gather(*tasks))
        return results, time.perf_counter() - start


def run_async(coro: Any) -> Any:
    """Runs coro to completion on a new event loop: uvloop's where installed (the client handles every streamed
    chunk of every request; on a 2-core machine its CPU time is taken from the server it measures), else asyncio's."""
    return uvloop.run(coro) if uvloop is not None else asyncio.run(coro)


def benchmark(config: ServeBenchConfig, tokenizer: Any = None) -> dict[str, Any]:
    """Run the whole benchmark and return the JSON-ready report. Raises ServerError only when the
    server cannot be used at all; individual request failures are counted in the report."""
    model = run_async(probe_server(config))
    if tokenizer is None:
        tokenizer = resolve_tokenizer(config.tokenizer, model)
    requests = random_requests(tokenizer, config, config.num_prompts, config.seed)
    warmup_failed = 0
    if config.warmup:
        warm = random_requests(tokenizer, config, config.warmup, config.seed + 1)
        warm_results, _ = run_async(run_requests(config, model, warm, [0.0] * len(warm)))
        warmup_failed = sum(not r.success for r in warm_results)
    delays = arrival_delays(len(requests), config.request_rate, config.burstiness, config.seed)
    results, duration = run_async(run_requests(config, model, requests, delays))
    metrics = compute_metrics(results, duration, config.percentiles, config.goodput_slos_ms)
    settings = asdict(config)
    settings.pop("api_key")
    settings["request_rate"] = "inf" if math.isinf(config.request_rate) else config.request_rate
    return {
        "benchmark": "serve", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": model,
        "tokenizer": config.tokenizer or getattr(tokenizer, "name_or_path", None) or None,
        "config": settings, "client": {"platform": platform.platform(), "python": platform.python_version()},
        **metrics,
        "warmup_failed": warmup_failed,
        "errors": [r.error for r in results if not r.success][:10],
        "requests": [r.summary() for r in results],
    }


def table_header(report: dict[str, Any]) -> dict[str, Any]:
    config = report["config"]
    return {
        "Endpoint:": config["base_url"].rstrip("/") + config["endpoint"], "Model:": report["model"],
        "Request rate configured (req/s):": config["request_rate"], "Burstiness:": config["burstiness"],
        "Maximum request concurrency:": config["max_concurrency"],
    }


def print_report(report: dict[str, Any]) -> None:
    print(format_table(report, report["config"]["percentiles"], table_header(report)))
    if report["errors"]:
        print(f"first errors ({report['failed']} failed):")
        for error in report["errors"][:3]:
            print(f"  {error}")


