"""The model's Prometheus metrics, served by Triton on its metrics port (/metrics).

Counters and histograms are fed per finished request; gauges from `Engine.stats()`. Every update is
an IPC call to the Triton server process, so the model makes them from its monitor thread, never
from the engine thread.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import triton_python_backend_utils as pb_utils

OUTCOMES = ("success", "cancelled", "invalid", "overloaded", "error")
TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


@dataclass
class RequestRecord:
    """What one finished request contributes to the counters and histograms."""
    outcome: str
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    inter_token_s: list[float] = field(default_factory=list)


class GemmaMetrics:
    def __init__(self, model: str, version: str, instance: str):
        # One engine per model instance (one per GPU): each has its own series, sum them for the model.
        labels = {"model": model, "version": version, "instance": instance}

        def family(name: str, kind, doc: str):
            return pb_utils.MetricFamily(name=name, description=doc, kind=kind)

        C, G, H = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.HISTOGRAM
        # Families must outlive their metrics; keep references to both.
        self._families = [
            requests := family("gemma_requests_total", C, "Finished requests by outcome"),
            prompt := family("gemma_prompt_tokens_total", C, "Prompt tokens of admitted requests"),
            generated := family("gemma_generated_tokens_total", C, "Generated tokens"),
            ttft := family("gemma_time_to_first_token_seconds", H, "Time from submit to the first token"),
            itl := family("gemma_inter_token_latency_seconds", H, "Time between consecutive output deltas"),
            kv_used := family("gemma_kv_blocks_used", G, "KV cache blocks in use"),
            kv_total := family("gemma_kv_blocks_total", G, "KV cache blocks in the pool"),
            kv_cached := family("gemma_kv_blocks_cached", G, "Unreferenced KV blocks kept for prefix reuse"),
            prefix_queries := family("gemma_prefix_cache_queries_total", C, "Prompt tokens looked up in the prefix cache"),
            prefix_hits := family("gemma_prefix_cache_hits_total", C, "Prompt tokens found in the prefix cache"),
            preemptions := family("gemma_preemptions_total", C, "Sequences preempted when the KV cache ran dry"),
            running := family("gemma_running_requests", G, "Sequences being decoded"),
            waiting := family("gemma_queue_depth", G, "Requests waiting for a slot"),
        ]
        self.requests = {o: requests.Metric(labels={**labels, "outcome": o}) for o in OUTCOMES}
        self.prompt_tokens = prompt.Metric(labels=labels)
        self.generated_tokens = generated.Metric(labels=labels)
        self.ttft = ttft.Metric(labels=labels, buckets=TTFT_BUCKETS)
        self.itl = itl.Metric(labels=labels, buckets=ITL_BUCKETS)
        self.kv_used = kv_used.Metric(labels=labels)
        self.kv_total = kv_total.Metric(labels=labels)
        self.kv_cached = kv_cached.Metric(labels=labels)
        # The engine counts these itself; the counters advance by what it added since the last update.
        self._engine_counters = {"prefix_queries": (prefix_queries.Metric(labels=labels), 0),
                                 "prefix_hits": (prefix_hits.Metric(labels=labels), 0),
                                 "preemptions": (preemptions.Metric(labels=labels), 0)}
        self.running = running.Metric(labels=labels)
        self.waiting = waiting.Metric(labels=labels)

    def record(self, r: RequestRecord) -> None:
        self.requests[r.outcome].increment(1)
        if r.prompt_tokens:
            self.prompt_tokens.increment(r.prompt_tokens)
        if r.output_tokens:
            self.generated_tokens.increment(r.output_tokens)
        if r.ttft_s is not None:
            self.ttft.observe(r.ttft_s)
        for s in r.inter_token_s:
            self.itl.observe(s)

    def set_engine_stats(self, stats) -> None:
        self.kv_used.set(stats.kv_cache.used_blocks)
        self.kv_total.set(stats.kv_cache.total_blocks)
        self.kv_cached.set(stats.kv_cache.cached_blocks)
        for name, total in (("prefix_queries", stats.prefix_cache.queries), ("prefix_hits", stats.prefix_cache.hits),
                            ("preemptions", stats.num_preemptions)):
            metric, reported = self._engine_counters[name]
            if total > reported:
                metric.increment(total - reported)
                self._engine_counters[name] = (metric, total)
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
