"""Prometheus metrics of a serving engine, with vLLM's metric meanings under the `tokenmill:` prefix.

vLLM name (meaning)                        -> ours
vllm:time_to_first_token_seconds           -> tokenmill:time_to_first_token_seconds
vllm:request_time_per_output_token_seconds -> tokenmill:request_time_per_output_token_seconds
vllm:inter_token_latency_seconds           -> tokenmill:inter_token_latency_seconds
vllm:e2e_request_latency_seconds           -> tokenmill:e2e_request_latency_seconds
vllm:request_queue_time_seconds            -> tokenmill:request_queue_time_seconds
vllm:num_requests_running / _waiting       -> tokenmill:num_requests_running / _waiting
vllm:kv_cache_usage_perc                   -> tokenmill:kv_cache_usage_perc (0..1)
vllm:prompt_tokens_total / generation_...  -> tokenmill:prompt_tokens_total / generation_tokens_total
vllm:prefix_cache_queries / _hits (tokens) -> tokenmill:prefix_cache_queries_total / _hits_total
vllm:num_preemptions                       -> tokenmill:num_preemptions_total
vllm:request_success{finished_reason}      -> tokenmill:request_success_total{finished_reason}
vllm:spec_decode_num_drafts / _num_draft_tokens / _num_accepted_tokens / _num_accepted_tokens_per_pos{position}
                                           -> tokenmill:spec_decode_* (the same; with --speculative-config)
plus tokenmill:engine_steps_total and tokenmill:step_num_requests (requests batched per step), and with
--data-parallel-size > 1, per replica (label `replica`): tokenmill:dp_routed_requests_total,
tokenmill:dp_prefix_cache_hits_total and tokenmill:dp_num_requests_running.

The record methods run on one thread at a time (the engine thread; the event loop for a data-parallel engine);
prometheus-client's collectors are thread-safe for the
scraping side. Each EngineMetrics owns its registry, so several engines (tests) never collide.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tokenmill.outputs import FINISH_REASONS, RequestOutput
from tokenmill.spec.governor import SpecDecodingStats

if TYPE_CHECKING:
    from tokenmill.engine.engine_loop import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                    120.0, 240.0, 480.0, 960.0, 1920.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass
class _RequestTrack:
    arrival_time: float
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_generation_tokens: int = 0  # per sample


class RecentSamples:
    """The (time.monotonic(), value) samples of the last window_s seconds, at most max_samples of them (the newest):
    what the dashboard's percentiles are computed from. Added on the recording thread, read on the event loop."""

    def __init__(self, window_s: float = 300.0, max_samples: int = 20_000) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._lock = threading.Lock()

    def add(self, now: float, value: float) -> None:
        with self._lock:
            self._samples.append((now, value))

    def values(self, now: float | None = None) -> list[float]:
        """The values of the samples taken within window_s seconds before `now`, oldest first."""
        since = (time.monotonic() if now is None else now) - self.window_s
        with self._lock:
            while self._samples and self._samples[0][0] < since:
                self._samples.popleft()
            return [value for _, value in self._samples]


class EngineMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        r = self.registry

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(model_name)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        self.ttft = histogram("tokenmill:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.tpot = histogram("tokenmill:request_time_per_output_token_seconds",
                              "Per request: (last token time - first token time) / (output tokens - 1).",
                              _LATENCY_BUCKETS)
        self.itl = histogram("tokenmill:inter_token_latency_seconds",
                             "Time between successive token outputs of a request.", _LATENCY_BUCKETS)
        self.e2e = histogram("tokenmill:e2e_request_latency_seconds", "Arrival to final output.", _REQUEST_BUCKETS)
        self.queue_time = histogram("tokenmill:request_queue_time_seconds",
                                    "Arrival to first scheduled step.", _REQUEST_BUCKETS)
        self.step_num_requests = histogram("tokenmill:step_num_requests",
                                           "Requests computed together in one engine step.", _BATCH_BUCKETS)
        self.num_running = gauge("tokenmill:num_requests_running", "Requests in the running batch.")
        self.num_waiting = gauge("tokenmill:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("tokenmill:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).")
        self.prompt_tokens = counter("tokenmill:prompt_tokens", "Prompt tokens of requests that produced output.")
        self.generation_tokens = counter("tokenmill:generation_tokens", "Generated tokens.")
        self.prefix_queries = counter("tokenmill:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("tokenmill:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("tokenmill:num_preemptions", "Requests preempted (recomputed later).")
        self.steps = counter("tokenmill:engine_steps", "Engine steps that computed tokens.")
        success = Counter("tokenmill:request_success", "Finished requests by finish reason.",
                          labels + ["finished_reason"], registry=r)
        self.finished = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        self._tracks: dict[str, _RequestTrack] = {}
        self._last_prefix = (0, 0)
        self.spec_drafts = counter("tokenmill:spec_decode_num_drafts",
                                   "Request-steps that verified speculative draft tokens.")
        self.spec_draft_tokens = counter("tokenmill:spec_decode_num_draft_tokens", "Draft tokens verified.")
        self.spec_accepted_tokens = counter("tokenmill:spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self._spec_per_pos = Counter("tokenmill:spec_decode_num_accepted_tokens_per_pos",
                                     "Draft tokens accepted, by position in the draft (0 = first).",
                                     labels + ["position"], registry=r)
        self._last_spec = SpecDecodingStats()
        # The dashboard's windows (entrypoints/openai/dashboard.py): the same TTFT and TPOT values as the histograms.
        self.recent_ttft = RecentSamples()
        self.recent_tpot = RecentSamples()

    def track_replicas(self, num_replicas: int) -> None:
        """Adds the per-replica series of a data-parallel engine (label `replica`, "0" .. "D-1")."""
        labels = ["model_name", "replica"]

        def per_replica(kind: type, name: str, doc: str) -> list:
            series = kind(name, doc, labels, registry=self.registry)
            return [series.labels(self.model_name, str(i)) for i in range(num_replicas)]

        self.replica_routed = per_replica(Counter, "tokenmill:dp_routed_requests", "Requests routed to each replica.")
        self.replica_prefix_hits = per_replica(Counter, "tokenmill:dp_prefix_cache_hits",
                                               "Prompt tokens found in each replica's prefix cache.")
        self.replica_running = per_replica(Gauge, "tokenmill:dp_num_requests_running",
                                           "Requests in each replica's running batch.")

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- engine thread ---------------------------------------------------------------------------
    def record_step(self, stats: EngineStats) -> None:
        """The engine's state after a step or an abort (cumulative prefix counts: only their growth is added)."""
        step = stats.step
        if step.num_scheduled_reqs:
            self.steps.inc()
            self.step_num_requests.observe(step.num_scheduled_reqs)
        if step.num_preempted_reqs:
            self.preemptions.inc(step.num_preempted_reqs)
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_usage)
        last_queries, last_hits = self._last_prefix
        self.prefix_queries.inc(max(stats.prefix_queries - last_queries, 0))
        self.prefix_hits.inc(max(stats.prefix_hits - last_hits, 0))
        self._last_prefix = (stats.prefix_queries, stats.prefix_hits)
        if stats.spec is not None:
            self._record_spec(stats.spec)

    def _record_spec(self, spec: SpecDecodingStats) -> None:
        """Adds the growth of the cumulative speculative-decoding counts since the last call."""
        last = self._last_spec
        self.spec_drafts.inc(max(spec.num_drafts - last.num_drafts, 0))
        self.spec_draft_tokens.inc(max(spec.num_draft_tokens - last.num_draft_tokens, 0))
        self.spec_accepted_tokens.inc(max(spec.num_accepted_tokens - last.num_accepted_tokens, 0))
        for position, count in enumerate(spec.accepted_by_position):
            before = last.accepted_by_position[position] if position < len(last.accepted_by_position) else 0
            self._spec_per_pos.labels(self.model_name, str(position)).inc(max(count - before, 0))
        self._last_spec = spec.copy()

    def record_output(self, output: RequestOutput, now: float | None = None) -> None:
        """Call with every DELTA output of a request, in order (the final one last)."""
        now = time.monotonic() if now is None else now
        track = self._tracks.get(output.request_id)
        if track is None:
            arrival = output.metrics.arrival_time if output.metrics else now
            track = self._tracks[output.request_id] = _RequestTrack(arrival)
        num_new = sum(len(c.token_ids) for c in output.outputs)
        if num_new:
            # n > 1 samples advance together: per-sample tokens (for TPOT) are the most any gained.
            num_per_sample = max(len(c.token_ids) for c in output.outputs)
            if track.first_token_time is None:
                track.first_token_time = now
                self.ttft.observe(now - track.arrival_time)
                self.recent_ttft.add(now, now - track.arrival_time)
                self.prompt_tokens.inc(len(output.prompt_token_ids))
            else:
                self.itl.observe(now - track.last_token_time)
            track.last_token_time = now
            track.num_generation_tokens += num_per_sample
            self.generation_tokens.inc(num_new)
        if output.finished:
            self._record_finished(output, track, now)

    def _record_finished(self, output: RequestOutput, track: _RequestTrack, now: float) -> None:
        del self._tracks[output.request_id]
        self.e2e.observe(now - track.arrival_time)
        scheduled = output.metrics.first_scheduled_time if output.metrics else None
        if scheduled is not None:
            self.queue_time.observe(max(scheduled - track.arrival_time, 0.0))
        if track.first_token_time is not None and track.num_generation_tokens > 1:
            per_token = (track.last_token_time - track.first_token_time) / (track.num_generation_tokens - 1)
            self.tpot.observe(per_token)
            self.recent_tpot.add(now, per_token)
        for completion in output.outputs:
            reason = completion.finish_reason or "abort"
            self.finished[reason].inc()
