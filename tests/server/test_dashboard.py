"""GET /dashboard: the page, its assets and /dashboard/data over HTTP, then the page itself in a headless chromium.

The live-server tests share one module server (tests/server/conftest.py) and run in file order: the first one sees
it before any request."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import uvicorn

from tests.server.conftest import LiveServer, free_port, uvicorn_in_thread
from tokenmill.engine.input_processor import InputProcessor
from tokenmill.engine.metrics import EngineMetrics
from tokenmill.entrypoints.openai.context import ServerContext
from tokenmill.entrypoints.openai.dashboard import RateWindow, dashboard_data, percentiles, plan_data
from tokenmill.entrypoints.openai.server import build_app
from tokenmill.worker.plan import Choice, ExecutionPlan

CHROMIUM = Path("/usr/bin/chromium")
# A prompt of several full KV blocks: sent twice, its second lookup hits the prefix cache.
PROMPT = "The history of the mill begins with water wheels turning stones along the river. " * 4


def _data(server: LiveServer) -> dict[str, Any]:
    response = httpx.get(server.base_url + "/dashboard/data")  # no API key: open like /metrics
    assert response.status_code == 200, response.text
    return response.json()


def _complete(server: LiveServer, max_tokens: int = 8) -> dict[str, Any]:
    payload = {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    response = httpx.post(server.v1 + "/completions", json=payload, headers=server.headers(), timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["usage"]


class _DeadEngine:
    """An engine client whose engine died before serving anything (what the dashboard reads of one)."""

    def __init__(self, inputs: InputProcessor) -> None:
        self.inputs = inputs  # the real model's tokenizer: what the routes and ServerContext read of it
        self.metrics = EngineMetrics("dead-model")
        self.is_alive = False
        self.dead_error = RuntimeError("the engine thread died (injected)")
        self.num_in_flight = 0
        self.execution_plan = None

    def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass


@contextmanager
def _dead_engine_server(loaded: Any) -> Iterator[str]:
    """A server whose engine is dead; plain uvicorn, as GracefulServer would stop itself (launcher.py)."""
    app = build_app(ServerContext(_DeadEngine(InputProcessor(loaded, 512)), "dead-model"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    with uvicorn_in_thread(server, "test-dead-uvicorn"):
        yield f"http://127.0.0.1:{server.config.port}"


# -- the data, without a model ---------------------------------------------------------------------
def test_percentiles_are_nearest_rank_and_empty_is_none() -> None:
    assert percentiles([]) == {"count": 0, "p50": None, "p90": None, "p99": None}
    assert percentiles([0.5]) == {"count": 1, "p50": 0.5, "p90": 0.5, "p99": 0.5}
    values = [float(v) for v in range(100, 0, -1)]
    assert percentiles(values) == {"count": 100, "p50": 50.0, "p90": 90.0, "p99": 99.0}


def test_rates_need_two_samples_and_forget_old_ones() -> None:
    window = RateWindow(window_s=10.0)
    assert window.rates(100.0, 0, 0)["generation_tokens_per_s"] is None
    assert window.rates(100.2, 5, 5)["generation_tokens_per_s"] is None  # under MIN_RATE_SPAN_S
    rates = window.rates(102.0, 40, 200)
    assert rates["prompt_tokens_per_s"] == pytest.approx(20.0) and rates["generation_tokens_per_s"] == 100.0
    # A pause longer than the window: the old samples are dropped, not averaged in.
    assert window.rates(200.0, 40, 200)["generation_tokens_per_s"] is None
    assert window.rates(201.0, 40, 210)["generation_tokens_per_s"] == pytest.approx(10.0)


def test_dead_engine_and_no_metrics_give_null_not_nan() -> None:
    engine = SimpleNamespace(metrics=EngineMetrics("m"), is_alive=False, dead_error=RuntimeError("thread died"),
                             num_in_flight=0, execution_plan=None)
    ctx = SimpleNamespace(engine=engine, model_name="m")
    data = dashboard_data(ctx, RateWindow())
    json.dumps(data, allow_nan=False)
    assert data["engine"] == {"alive": False, "error": "thread died"}
    assert data["requests"]["running"] == 0 and data["tokens"] == {"prompt": 0, "generation": 0}
    assert data["prefix_cache"]["hit_rate"] is None and data["latency"]["ttft"]["p50"] is None
    assert data["plan"]["available"] is False and "no execution plan" in data["plan"]["reason"]
    engine.metrics = None
    data = dashboard_data(ctx, RateWindow())
    assert data["metrics_enabled"] is False and "requests" not in data


def test_plan_data_lists_every_choice() -> None:
    plan = ExecutionPlan("key", "some cpu", [Choice("qkv_proj", 16, "c_f32_panels",
                                                    {"c_f32_panels": 1e-3, "torch_fp32": 2e-3})], 1.5)
    data = plan_data(plan)
    assert data["available"] and data["machine"] == "some cpu" and not data["cached"]
    assert data["choices"] == [{"operation": "qkv_proj", "rows": 16, "kernel": "c_f32_panels",
                                "seconds": {"c_f32_panels": 1e-3, "torch_fp32": 2e-3}, "runner_up_ratio": 1.0}]


# -- over HTTP ----------------------------------------------------------------------------------------
def test_idle_server_gives_zeros(server: LiveServer) -> None:
    data = _data(server)
    json.dumps(data, allow_nan=False)
    assert data["engine"] == {"alive": True, "error": None} and data["metrics_enabled"]
    assert data["model"] == server.model_name
    assert data["tokens"] == {"prompt": 0, "generation": 0}
    assert data["requests"]["running"] == 0 and data["requests"]["waiting"] == 0
    assert set(data["requests"]["finished"].values()) == {0}
    assert data["kv_cache"]["usage"] == 0 and data["prefix_cache"]["hit_rate"] is None
    for name in ("ttft", "tpot"):
        assert data["latency"][name] == {"window_s": 300.0, "count": 0, "p50": None, "p90": None, "p99": None}


def test_page_and_assets_are_served_without_the_api_key(server: LiveServer) -> None:
    page = httpx.get(server.base_url + "/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="dashboard/dashboard.js"' in page.text and 'href="dashboard/dashboard.css"' in page.text
    assert "http" not in page.text.split("<body>")[0]  # nothing loaded from elsewhere
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        asset = httpx.get(f"{server.base_url}/dashboard/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind) and asset.text
    assert httpx.get(server.v1 + "/models").status_code == 401  # the rest still needs the key


def test_numbers_move_after_requests(server: LiveServer) -> None:
    before = _data(server)
    usages = [_complete(server) for _ in range(3)]
    time.sleep(0.5)  # the rate needs two samples MIN_RATE_SPAN_S apart
    after = _data(server)
    generated = sum(u["completion_tokens"] for u in usages)
    assert after["tokens"]["generation"] - before["tokens"]["generation"] == generated == 24
    assert after["tokens"]["prompt"] - before["tokens"]["prompt"] == sum(u["prompt_tokens"] for u in usages)
    assert after["requests"]["finished"]["length"] - before["requests"]["finished"]["length"] == 3
    assert after["throughput"]["generation_tokens_per_s"] > 0 and after["throughput"]["prompt_tokens_per_s"] > 0
    assert after["prefix_cache"]["hits"] > 0 and 0 < after["prefix_cache"]["hit_rate"] < 1
    assert after["engine_steps"] > before["engine_steps"]
    for name in ("ttft", "tpot"):
        window = after["latency"][name]
        assert window["count"] - before["latency"][name]["count"] == 3
        assert 0 < window["p50"] <= window["p90"] <= window["p99"]


def test_plan_is_the_engines(server: LiveServer) -> None:
    plan = server.engine.core.plan
    data = _data(server)["plan"]
    assert data == json.loads(json.dumps(plan_data(plan)))
    if plan is not None:
        assert data["available"] and len(data["choices"]) == len(plan.choices) > 0


def test_dead_engine_is_reported(default_loaded: Any) -> None:
    with _dead_engine_server(default_loaded) as base_url:
        response = httpx.get(base_url + "/dashboard/data")
    assert response.status_code == 200
    data = response.json()
    assert data["engine"] == {"alive": False, "error": "the engine thread died (injected)"}
    assert data["tokens"] == {"prompt": 0, "generation": 0} and data["plan"]["available"] is False


# -- in a browser ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    if not CHROMIUM.exists():
        pytest.skip(f"no {CHROMIUM}: install Debian's chromium (`make test` does, as root with apt-get)")
    with sync_api.sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--headless=new", "--no-sandbox"])
        except Exception as exc:  # noqa: BLE001 - any launch failure means no browser here
            pytest.skip(f"chromium could not be launched: {exc}")
        yield browser
        browser.close()


def _shown_number(page: Any, element_id: str) -> float:
    return float(page.text_content(f"#{element_id}").replace(",", ""))


def test_page_numbers_move_while_requests_run(server: LiveServer, browser: Any) -> None:
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server.base_url + "/dashboard")
    page.wait_for_function("() => document.getElementById('status').textContent === 'live'")
    before = _shown_number(page, "gen-total")
    requests = threading.Thread(target=lambda: [_complete(server, 16) for _ in range(4)])
    requests.start()
    try:
        page.wait_for_function("b => Number(document.getElementById('gen-total').textContent.replace(/,/g, '')) > b",
                               arg=before, timeout=60_000)
        page.wait_for_function("() => parseFloat(document.getElementById('gen-rate').textContent) > 0", timeout=60_000)
    finally:
        requests.join()
    page.wait_for_function(f"() => Number(document.getElementById('gen-total').textContent.replace(/,/g, '')) >= "
                           f"{before + 64}", timeout=30_000)
    assert _shown_number(page, "ttft-count") > 0 and page.text_content("#ttft-p50").endswith(("ms", " s"))
    plan = server.engine.core.plan
    summary = page.text_content("#plan-summary")
    if plan is not None:
        assert f"{len(plan.choices)} choices" in summary and page.is_visible("#plan-routes")
    assert "NaN" not in page.inner_text("body") and "undefined" not in page.inner_text("body")
    page.close()
    assert errors == []


def test_page_shows_a_dead_engine(browser: Any, default_loaded: Any) -> None:
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    with _dead_engine_server(default_loaded) as base_url:
        page.goto(base_url + "/dashboard")
        page.wait_for_function("() => document.getElementById('status').textContent === 'engine dead'")
        assert "the engine thread died (injected)" in page.text_content("#banner")
        assert page.text_content("#gen-total") == "0" and page.text_content("#ttft-p50") == "—"
        assert "no execution plan" in page.text_content("#plan-summary")
        page.close()
    assert errors == []
