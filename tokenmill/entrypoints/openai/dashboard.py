"""GET /dashboard: a live page of the server's own metrics; GET /dashboard/data: the JSON it polls (about 1 s).

The page (static/: HTML, vanilla JS and CSS shipped in the package, no build step, no CDN) shows what
`dashboard_data` returns, and everything there comes from the engine:
- running / waiting requests, KV-cache usage, token and request counters: the Prometheus collectors of
  EngineMetrics (engine/metrics.py), read from its registry, so they are the numbers /metrics renders;
- prompt and generation tokens/s: the growth of those counters over the last RATE_WINDOW_S seconds, from
  snapshots taken at each /dashboard/data call (null until two calls are at least MIN_RATE_SPAN_S apart);
- prefix-cache hit rate: hit tokens / looked-up tokens since start (null before any lookup);
- TTFT and TPOT p50/p90/p99: nearest-rank percentiles of the exact values the histograms observed in the last
  5 minutes (EngineMetrics.recent_ttft / recent_tpot), null when there are none;
- the execution plan: EngineClient.execution_plan (worker/plan.py), or why there is none.
No value is ever NaN or infinite. The routes are open like /metrics (server.py: OPEN_PATHS): a browser cannot send
the API key on navigation, and they expose only what /metrics does plus the plan's kernel choices.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from tokenmill import __version__
from tokenmill.engine.metrics import EngineMetrics, RecentSamples
from tokenmill.entrypoints.openai.context import ServerContext
from tokenmill.outputs import FINISH_REASONS
from tokenmill.worker.plan import ExecutionPlan

_ASSETS = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}
OPEN_PATHS = ("/dashboard", "/dashboard/", "/dashboard/data", *(f"/dashboard/{name}" for name in _ASSETS))
# Only this server's own files: no inline script, nothing fetched from elsewhere.
_HEADERS = {"Cache-Control": "no-cache", "Content-Security-Policy": "default-src 'self'; img-src 'self' data:"}
RATE_WINDOW_S = 10.0
MIN_RATE_SPAN_S = 0.5
PERCENTILES = (50, 90, 99)
NO_PLAN = ("no execution plan in this process: it is built for CPU engines without --compile, and data-parallel "
           "replicas each hold their own")

_COUNTERS = {  # dashboard name -> Prometheus sample name (engine/metrics.py)
    "prompt_tokens": "tokenmill:prompt_tokens_total",
    "generation_tokens": "tokenmill:generation_tokens_total",
    "prefix_queries": "tokenmill:prefix_cache_queries_total",
    "prefix_hits": "tokenmill:prefix_cache_hits_total",
    "preemptions": "tokenmill:num_preemptions_total",
    "engine_steps": "tokenmill:engine_steps_total",
}
_GAUGES = {"running": "tokenmill:num_requests_running", "waiting": "tokenmill:num_requests_waiting",
           "kv_usage": "tokenmill:kv_cache_usage_perc"}
_FINISHED = "tokenmill:request_success_total"


def read_metrics(metrics: EngineMetrics) -> dict[str, Any]:
    """The counters and gauges the dashboard shows, read in one pass over the Prometheus registry."""
    samples = {(s.name, s.labels.get("finished_reason")): s.value
               for family in metrics.registry.collect() for s in family.samples}
    values: dict[str, Any] = {key: samples.get((name, None), 0.0) for key, name in {**_COUNTERS, **_GAUGES}.items()}
    values["finished"] = {reason: samples.get((_FINISHED, reason), 0.0) for reason in FINISH_REASONS}
    return values


@dataclass
class _Snapshot:
    time: float  # time.monotonic()
    prompt_tokens: float
    generation_tokens: float


class RateWindow:
    """Token counters sampled at each data call; rates are their growth since the oldest sample of the last
    window_s seconds (samples older than that are dropped, so a long pause between calls never averages in)."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._snapshots: deque[_Snapshot] = deque(maxlen=1000)

    def rates(self, now: float, prompt_tokens: float, generation_tokens: float) -> dict[str, float | None]:
        while self._snapshots and self._snapshots[0].time < now - self.window_s:
            self._snapshots.popleft()
        oldest = self._snapshots[0] if self._snapshots else None
        if not self._snapshots or now - self._snapshots[-1].time >= 0.2:  # several viewers: keep it bounded
            self._snapshots.append(_Snapshot(now, prompt_tokens, generation_tokens))
        span = now - oldest.time if oldest is not None else 0.0
        if oldest is None or span < MIN_RATE_SPAN_S:
            return {"prompt_tokens_per_s": None, "generation_tokens_per_s": None, "span_s": None}
        return {"prompt_tokens_per_s": max(prompt_tokens - oldest.prompt_tokens, 0.0) / span,
                "generation_tokens_per_s": max(generation_tokens - oldest.generation_tokens, 0.0) / span,
                "span_s": span}


def percentiles(values: list[float]) -> dict[str, Any]:
    """Nearest-rank percentiles (the smallest value with at least p% of the values at or below it); None when
    there are no values."""
    ordered = sorted(values)
    result: dict[str, Any] = {"count": len(ordered)}
    for p in PERCENTILES:
        result[f"p{p}"] = ordered[max(0, -(-p * len(ordered) // 100) - 1)] if ordered else None
    return result


def latency_window(recent: RecentSamples, now: float) -> dict[str, Any]:
    return {"window_s": recent.window_s, **percentiles(recent.values(now))}


def plan_data(plan: ExecutionPlan | None) -> dict[str, Any]:
    if plan is None:
        return {"available": False, "reason": NO_PLAN, "choices": []}
    return {"available": True, "reason": None, "machine": plan.machine, "cached": plan.cached,
            "build_seconds": plan.build_seconds,
            "choices": [{"operation": c.operation, "rows": c.rows, "kernel": c.kernel, "seconds": c.seconds,
                         "runner_up_ratio": c.runner_up_ratio()} for c in plan.choices]}


def engine_state(ctx: ServerContext) -> dict[str, Any]:
    alive = ctx.engine.is_alive
    error = ctx.engine.dead_error
    detail = (str(error) or type(error).__name__) if error is not None else "not running"
    return {"alive": alive, "error": None if alive else detail}


def dashboard_data(ctx: ServerContext, rates: RateWindow) -> dict[str, Any]:
    """Everything the page shows, from the engine's metrics and plan (see the module's docstring)."""
    now = time.monotonic()
    data: dict[str, Any] = {"model": ctx.model_name, "version": __version__, "engine": engine_state(ctx),
                            "in_flight": ctx.engine.num_in_flight,  # HTTP requests not yet answered in full
                            "plan": plan_data(ctx.engine.execution_plan)}
    metrics = ctx.engine.metrics
    data["metrics_enabled"] = metrics is not None
    if metrics is None:
        return data
    values = read_metrics(metrics)
    queries, hits = values["prefix_queries"], values["prefix_hits"]
    data.update(
        requests={"running": values["running"], "waiting": values["waiting"], "finished": values["finished"]},
        tokens={"prompt": values["prompt_tokens"], "generation": values["generation_tokens"]},
        throughput={"window_s": rates.window_s,
                    **rates.rates(now, values["prompt_tokens"], values["generation_tokens"])},
        kv_cache={"usage": values["kv_usage"]},
        prefix_cache={"queries": queries, "hits": hits, "hit_rate": hits / queries if queries else None},
        latency={"ttft": latency_window(metrics.recent_ttft, now), "tpot": latency_window(metrics.recent_tpot, now)},
        preemptions=values["preemptions"], engine_steps=values["engine_steps"],
    )
    return data


def _static(name: str) -> bytes:
    return resources.files("tokenmill.entrypoints.openai").joinpath("static", name).read_bytes()


def register_dashboard(app: FastAPI, ctx: ServerContext) -> None:
    """Adds GET /dashboard, its assets and /dashboard/data (the files are read once, here)."""
    page = _static("dashboard.html")
    assets = {name: _static(name) for name in _ASSETS}
    rates = RateWindow()

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=_HEADERS)

    @app.get("/dashboard/data", include_in_schema=False)
    async def data() -> JSONResponse:
        return JSONResponse(dashboard_data(ctx, rates), headers={"Cache-Control": "no-store"})

    for name, media_type in _ASSETS.items():
        app.add_api_route(f"/dashboard/{name}", _asset_route(assets[name], media_type), include_in_schema=False)


def _asset_route(body: bytes, media_type: str) -> Any:
    async def asset() -> Response:
        return Response(body, media_type=media_type, headers=_HEADERS)
    return asset
