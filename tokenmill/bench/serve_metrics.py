"""Metrics of the serving benchmark: per-request records -> vLLM-style summary (names and meanings).

Definitions (times in seconds in records, milliseconds in the summary):
  TTFT  time from sending the request to the first streamed chunk that carries text or a token
  ITL   gaps between successive content chunks of one request (all requests' gaps pooled)
  E2EL  time from sending the request to the end of its stream
  TPOT  (E2EL - TTFT) / (output_tokens - 1), only for requests with more than one output token
Throughputs divide by the benchmark duration (first send to last completion) and count completed
requests only. Goodput counts completed requests that met every given SLO.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
                   "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}


@dataclass
class RequestResult:
    """What one request produced. `success` implies `ttft_s` is set and `output_tokens >= 1`."""

    prompt_len: int
    requested_output_len: int
    success: bool = False
    output_tokens: int = 0
    usage_reported: bool = False  # output_tokens came from the server's usage chunk, not a chunk count
    server_prompt_tokens: int | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    latency_s: float = 0.0
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        if not self.success or self.ttft_s is None or self.output_tokens <= 1:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    def meets(self, slos_ms: dict[str, float]) -> bool:
        """True when completed and within every SLO (an undefined TPOT, one output token, passes)."""
        if not self.success:
            return False
        values_ms = {"ttft": self.ttft_s, "tpot": self.tpot_s, "e2el": self.latency_s}
        return all(values_ms[k] is None or values_ms[k] * 1000.0 <= v for k, v in slos_ms.items())

    def summary(self) -> dict[str, Any]:
        def ms(x: float | None) -> float | None:
            return None if x is None else round(x * 1000.0, 3)

        return {
            "success": self.success, "prompt_len": self.prompt_len, "requested_output_len": self.requested_output_len,
            "output_tokens": self.output_tokens, "usage_reported": self.usage_reported,
            "server_prompt_tokens": self.server_prompt_tokens, "ttft_ms": ms(self.ttft_s),
            "tpot_ms": ms(self.tpot_s), "e2el_ms": ms(self.latency_s) if self.success else None,
            "error": self.error or None,
        }


def parse_percentiles(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--percentiles must be comma-separated numbers like 50,90,99, got {text!r}") from None
    if not values or not all(0 < p <= 100 for p in values):
        raise ValueError(f"percentiles must lie in (0, 100], got {text!r}")
    return sorted(set(values))


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--goodput takes NAME:MS with NAME in {', '.join(SLO_METRICS)}, got {item!r}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if slos[name] <= 0:
            raise ValueError(f"--goodput {item!r}: the SLO must be positive")
    return slos


def percentile_key(p: float) -> str:
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def _stats(name: str, values_s: list[float], percentiles: list[float]) -> dict[str, float | None]:
    """mean/median/std/pNN of one metric in ms; None for all of them when there are no values."""
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    out: dict[str, float | None] = {}
    for stat, fn in (("mean", np.mean), ("median", np.median), ("std", np.std)):
        out[f"{stat}_{name}_ms"] = float(fn(arr)) if arr.size else None
    for p in percentiles:
        out[f"{percentile_key(p)}_{name}_ms"] = float(np.percentile(arr, p)) if arr.size else None
    return out


def compute_metrics(
    results: list[RequestResult], duration_s: float, percentiles: list[float], slos_ms: dict[str, float],
) -> dict[str, Any]:
    done = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in done)
    total_out = sum(r.output_tokens for r in done)
    duration_s = max(duration_s, 1e-9)
    metrics: dict[str, Any] = {
        "duration": duration_s, "completed": len(done), "failed": len(results) - len(done),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(done) / duration_s,
        "request_goodput": None, "good_completed": None, "goodput_slos_ms": slos_ms or None,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
    }
    if slos_ms:
        good = sum(r.meets(slos_ms) for r in done)
        metrics["good_completed"], metrics["request_goodput"] = good, good / duration_s
    series = {
        "ttft": [r.ttft_s for r in done if r.ttft_s is not None],
        "tpot": [t for r in done if (t := r.tpot_s) is not None],
        "itl": [gap for r in done for gap in r.itl_s],
        "e2el": [r.latency_s for r in done],
    }
    for name, values in series.items():
        metrics.update(_stats(name, values, percentiles))
    return metrics


def format_table(metrics: dict[str, Any], percentiles: list[float], header: dict[str, Any]) -> str:
    """A fixed-width, human-readable report of `compute_metrics` output."""
    width = 60

    def row(label: str, value: Any) -> str:
        if value is None:
            text = "-"
        elif isinstance(value, float):
            text = f"{value:.2f}"
        else:
            text = str(value)
        return label + " " * max(1, width - len(label) - len(text)) + text

    lines = [" Serving Benchmark Result ".center(width, "=")]
    lines += [row(k, v) for k, v in header.items()]
    lines += [
        row("Successful requests:", metrics["completed"]),
        row("Failed requests:", metrics["failed"]),
        row("Benchmark duration (s):", metrics["duration"]),
        row("Total input tokens:", metrics["total_input_tokens"]),
        row("Total generated tokens:", metrics["total_output_tokens"]),
        row("Request throughput (req/s):", metrics["request_throughput"]),
    ]
    if metrics.get("goodput_slos_ms"):
        slos = " ".join(f"{k}:{v:g}" for k, v in metrics["goodput_slos_ms"].items())
        lines.append(row(f"Request goodput (req/s) [{slos} ms]:", metrics["request_goodput"]))
        lines.append(row("Requests within SLOs:", metrics["good_completed"]))
    lines += [
        row("Output token throughput (tok/s):", metrics["output_throughput"]),
        row("Total token throughput (tok/s):", metrics["total_token_throughput"]),
    ]
    for name, title in LATENCY_METRICS.items():
        lines.append(f" {title} ".center(width, "-"))
        upper = name.upper()
        for stat in ("mean", "median", "std"):
            lines.append(row(f"{stat.capitalize()} {upper} (ms):", metrics[f"{stat}_{name}_ms"]))
        for p in percentiles:
            key = percentile_key(p)
            lines.append(row(f"{key.upper()} {upper} (ms):", metrics[f"{key}_{name}_ms"]))
    lines.append("=" * width)
    return "\n".join(lines)
