"""Prometheus metrics of the server (one registry per app, so several apps can
live in one process, as in tests)."""

from __future__ import annotations

from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_HOST_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class AdapterLabels:
    """Bounded label values for per-adapter series: the first ``limit`` adapters that get traffic keep their
    name, later ones share ``"other"`` (so /metrics stays small with thousands of adapters); base-model
    requests are labelled with the served model's name."""

    OTHER = "other"

    def __init__(self, limit: int, base: str) -> None:
        self.limit = limit
        self.base = base
        self._named: set[str] = set()

    def __call__(self, adapter: Optional[str]) -> str:
        if adapter is None:
            return self.base
        adapter = adapter.partition("@")[0]  # one series per adapter, whatever version a request named
        if adapter in self._named:
            return adapter
        if len(self._named) < self.limit:
            self._named.add(adapter)
            return adapter
        return self.OTHER

    @property
    def named(self) -> set[str]:
        return set(self._named)


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict[str, float]], base: str = "base", max_adapters: int = 32) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._stats = stats
        self.label = AdapterLabels(max_adapters, base)
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
        # per adapter (label: AdapterLabels)
        self.a_requests = Counter("loraplex_adapter_requests", "Finished requests per adapter and finish reason",
                                  ["adapter", "finish_reason"], registry=r)
        self.a_prompt = Counter("loraplex_adapter_prompt_tokens", "Prompt tokens per adapter", ["adapter"], registry=r)
        self.a_generated = Counter("loraplex_adapter_generation_tokens", "Tokens generated per adapter", ["adapter"],
                                   registry=r)
        self.a_ttft = Histogram("loraplex_adapter_time_to_first_token_seconds", "Time to first token per adapter",
                                ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.a_itl = Histogram("loraplex_adapter_inter_token_latency_seconds", "Time between streamed tokens per "
                               "adapter", ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.a_hits = Counter("loraplex_adapter_slot_hits", "Requests admitted with their adapter already in a "
                              "device slot", ["adapter"], registry=r)
        self.a_loads = Histogram("loraplex_adapter_load_seconds", "Adapter loads: into a device slot (source "
                                 "host) or re-read from disk after host eviction (source disk)",
                                 ["adapter", "source"], buckets=_LATENCY_BUCKETS, registry=r)
        self.a_residency = Gauge("loraplex_adapter_residency", "1 for the tier each adapter is in now (device: a "
                                 "slot, host: host memory, disk: its folder only); other: how many are there",
                                 ["adapter", "tier"], registry=r)
        self.registered: Callable[[], list[str]] = lambda: []  # names of the registered adapters (set by Serving)

    def observe_events(self, events: list) -> None:
        """Adapter events the engine reported with a step (LoRAPool.drain_events)."""
        for name, kind, seconds in events:
            label = self.label(name)
            if kind == "hit":
                self.a_hits.labels(adapter=label).inc()
            else:
                self.a_loads.labels(adapter=label, source="host" if kind == "load" else "disk").observe(seconds)

    def observe_finish(self, finish_reason: Optional[str], prompt_tokens: int, generated: int,
                       ttft: Optional[float], e2e: float, adapter: Optional[str] = None) -> None:
        self.requests.labels(finish_reason=finish_reason or "abort").inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated)
        if ttft is not None:
            self.ttft.observe(ttft)
        self.e2e.observe(e2e)
        label = self.label(adapter)
        self.a_requests.labels(adapter=label, finish_reason=finish_reason or "abort").inc()
        self.a_prompt.labels(adapter=label).inc(prompt_tokens)
        self.a_generated.labels(adapter=label).inc(generated)
        if ttft is not None:
            self.a_ttft.labels(adapter=label).observe(ttft)

    def observe_itl(self, gap: float, adapter: Optional[str]) -> None:
        self.itl.observe(gap)
        self.a_itl.labels(adapter=self.label(adapter)).observe(gap)

    def _residency(self, s: dict) -> None:
        device, host = set(s.get("lora_device", ())), set(s.get("lora_host", ()))
        others = {"device": 0, "host": 0, "disk": 0}
        named = self.label.named
        for name in self.registered():
            tier = "device" if name in device else "host" if name in host else "disk"
            if name in named:
                for t in others:
                    self.a_residency.labels(adapter=name, tier=t).set(1.0 if t == tier else 0.0)
            else:
                others[tier] += 1
        for name in named - set(self.registered()):  # unloaded: in no tier
            for t in others:
                self.a_residency.labels(adapter=name, tier=t).set(0.0)
        for t, n in others.items():
            self.a_residency.labels(adapter=AdapterLabels.OTHER, tier=t).set(n)

    def render(self) -> bytes:
        s = self._last = self._stats()
        self.running.set(s["running"])
        self.waiting.set(s["waiting"])
        self.kv_usage.set(s["kv_usage"])
        self.loras.set(s["loras_registered"])
        self.lora_slots.set(s["lora_slots_used"])
        self._residency(s)
        return generate_latest(self.registry)


class _EngineCounters:
    """Cumulative figures the engine keeps itself (prefix and encoder caches, adapter merges), exposed as
    Prometheus counters."""

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
            ("loraplex_lora_merges", "lora_merges", "Adapters merged into the base weights (enable_lora_merging)"),
            ("loraplex_lora_merge_restores", "lora_merge_restores", "Base weights restored after a merge"),
        ]:
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(s.get(key, 0.0)))
            yield c
        g = GaugeMetricFamily("loraplex_prefix_cache_blocks", "KV blocks held in the prefix cache")
        g.add_metric([], float(s.get("prefix_cache_blocks", 0.0)))
        yield g
        g = GaugeMetricFamily("loraplex_lora_merged", "1 while an adapter is merged into the base weights")
        g.add_metric([], float(s.get("lora_merged", 0.0)))
        yield g
