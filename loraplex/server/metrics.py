"""Prometheus metrics of the server (one registry per app, so several apps can
live in one process, as in tests)."""

from __future__ import annotations

from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_HOST_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict[str, float]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._stats = stats
        self.requests = Counter("loraplex_requests", "Finished requests by finish reason",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("loraplex_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("loraplex_e2e_request_latency_seconds", "Request latency, arrival to finish",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("loraplex_inter_token_latency_seconds", "Time between streamed tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.step = Histogram("loraplex_engine_step_seconds", "Duration of one engine step",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.step_host = Histogram("loraplex_engine_step_host_seconds", "Host time of one engine step: its "
                                   "duration less the wait for the device's results", buckets=_HOST_BUCKETS,
                                   registry=r)
        self.running = Gauge("loraplex_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("loraplex_num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_usage = Gauge("loraplex_kv_cache_usage_ratio", "Fraction of KV cache blocks in use", registry=r)
        self.loras = Gauge("loraplex_loras_registered", "Adapters registered (servable)", registry=r)
        self.lora_slots = Gauge("loraplex_lora_slots_used", "Device adapter slots holding an adapter", registry=r)
        self._last: dict[str, float] = {}
        r.register(_EngineCounters(lambda: self._last))

    def observe_finish(self, finish_reason: Optional[str], prompt_tokens: int, generated: int,
                       ttft: Optional[float], e2e: float) -> None:
        self.requests.labels(finish_reason=finish_reason or "abort").inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated)
        if ttft is not None:
            self.ttft.observe(ttft)
        self.e2e.observe(e2e)

    def render(self) -> bytes:
        s = self._last = self._stats()
        self.running.set(s["running"])
        self.waiting.set(s["waiting"])
        self.kv_usage.set(s["kv_usage"])
        self.loras.set(s["loras_registered"])
        self.lora_slots.set(s["lora_slots_used"])
        return generate_latest(self.registry)


class _EngineCounters:
    """Cumulative figures the engine keeps itself (prefix and encoder caches), exposed as Prometheus counters."""

    def __init__(self, stats: Callable[[], dict[str, float]]) -> None:
        self._stats = stats

    def collect(self):
        s = self._stats()
        for name, key, doc in [
            ("loraplex_prefix_cache_queries", "prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache"),
            ("loraplex_prefix_cache_hits", "prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache"),
            ("loraplex_prefix_cache_evictions", "prefix_cache_evictions", "Cached KV blocks evicted for new ones"),
            ("loraplex_encoder_cache_queries", "encoder_cache_queries", "Images looked up in the vision encoder cache"),
            ("loraplex_encoder_cache_hits", "encoder_cache_hits", "Images found in the vision encoder cache"),
        ]:
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(s.get(key, 0.0)))
            yield c
        g = GaugeMetricFamily("loraplex_prefix_cache_blocks", "KV blocks held in the prefix cache")
        g.add_metric([], float(s.get("prefix_cache_blocks", 0.0)))
        yield g
