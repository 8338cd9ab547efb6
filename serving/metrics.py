"""The model's Prometheus metrics, served by Triton on its metrics port (/metrics).

Each quantity is exported under our name (gemma_*, labelled model, version and instance) and, where
vLLM exports it, under vLLM's name too (vllm:*, labelled model_name and engine, as vLLM labels them),
so that dashboards and routers written for vLLM read this server unchanged: the Gateway API Inference
Extension's endpoint picker reads vllm:num_requests_waiting, vllm:num_requests_running and
vllm:kv_cache_usage_perc (deploy/k8s/components/inference-pool). FAMILIES lists every family; the
families of one quantity get the same updates.

Counters and histograms are fed per finished request (RequestRecord); gauges and the engine's own
counters from `Engine.stats()`, all from the model's monitor thread. Every update of a Triton metric
is a blocking IPC round trip to the server process, made with the stub's GIL held (Triton 2.51's
Python backend; 18.6 us a call on the CPU VM, 60-126 us while another thread of the stub runs), so
what a period brings is sent once at its end (`flush`): a counter moves once by its sum. A Triton
histogram takes one observation a call: a call per generated token for the three inter-token
families, and six per request for the others (then; the engine's phases add four per choice), which
at the H100's ~560 requests a second held the stub's GIL for a sixth of its time. So every histogram
is exported as the three series Prometheus makes of one, `<name>_bucket` by `le` (cumulative), `<name>_sum` and `<name>_count`, each a counter
(`BucketCounters`), moved every HISTOGRAM_PERIODS flushes by what it counted (a flush moves every
bucket from the lowest observation's up, so fewer flushes, fewer calls): the same samples, so PromQL reads them as
it reads a histogram (histogram_quantile over rate of _bucket); their TYPE line says counter, and
their buckets are listed in no order. A reader of the text that needs TYPE histogram, or the +Inf
bucket as the last line (the vLLM backend's CI test reads it so), gets Triton histograms with the
model's `histograms` setting "native", at a call per observation (`PerObservation`).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import triton_python_backend_utils as pb_utils

from backend.outputs import RequestPhases
from backend.params import MAX_SPECULATIVE_TOKENS

OUTCOMES = ("success", "cancelled", "invalid", "overloaded", "error")
ENGINE_STATES = ("serving", "restarting", "failed")
# Our finish reasons under vLLM's names (its FinishReason): a cancelled request is vLLM's "abort".
VLLM_FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# vLLM's bounds (vllm/v1/metrics/loggers.py) for its names: a quantile query written against vLLM
# reads the same buckets here.
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                     10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
VLLM_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)
VLLM_N_BUCKETS = (1, 2, 5, 10, 20)
# vLLM's 1-2-5 series for token counts. vLLM stops it at max_model_len; this one runs past the longest
# Gemma context (128k), so it needs no engine setting and its bounds up to any max_model_len match.
TOKEN_COUNT_BUCKETS = tuple(m * 10**e for e in range(6) for m in (1, 2, 5))

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
# The histograms' buckets go out on every 10th flush: once a second at the model's period of 0.1 s
# (METRICS_PERIOD_S in model.py), a delay no scrape interval notices.
HISTOGRAM_PERIODS = 10
# Speculative decoding's draft positions (0-based, as vLLM's `position` label): one series each.
DRAFT_POSITIONS = tuple(str(i) for i in range(MAX_SPECULATIVE_TOKENS))
SPEC_DECODE = {"spec_drafts": "num_drafts", "spec_draft_tokens": "num_draft_tokens",
               "spec_accepted": "num_accepted_tokens"}  # quantity -> EngineStats.spec_decode's field


@dataclass(frozen=True)
class Family:
    quantity: str  # what it shows; every family of a quantity is fed the same values
    name: str  # vllm:* names get vLLM's labels, the others ours
    kind: str
    help: str
    buckets: tuple[float, ...] = ()  # histograms only
    per: tuple[str, tuple[str, ...]] | None = None  # a label and its values: one series per value


FAMILIES = (
    # Per finished request (GemmaMetrics.record).
    Family("outcome", "gemma_requests_total", COUNTER, "Finished requests by outcome", per=("outcome", OUTCOMES)),
    Family("finish_reason", "vllm:request_success_total", COUNTER, "Requests the engine finished, by finish reason",
           per=("finished_reason", tuple(VLLM_FINISH_REASONS.values()))),
    Family("prompt_tokens", "gemma_prompt_tokens_total", COUNTER, "Prompt tokens of admitted requests"),
    Family("prompt_tokens", "vllm:prompt_tokens_total", COUNTER, "Prompt tokens of admitted requests"),
    Family("generated_tokens", "gemma_generated_tokens_total", COUNTER, "Generated tokens"),
    Family("generated_tokens", "vllm:generation_tokens_total", COUNTER, "Generated tokens"),
    Family("ttft", "gemma_time_to_first_token_seconds", HISTOGRAM, "Time from submit to the first token",
           TTFT_BUCKETS),
    Family("ttft", "vllm:time_to_first_token_seconds", HISTOGRAM, "Seconds from submit to the first token",
           VLLM_TTFT_BUCKETS),
    Family("inter_token", "gemma_inter_token_latency_seconds", HISTOGRAM,
           "Time between consecutive output deltas", ITL_BUCKETS),
    Family("inter_token", "vllm:inter_token_latency_seconds", HISTOGRAM,
           "Seconds between consecutive output tokens", VLLM_ITL_BUCKETS),
    # The name Triton's vLLM backend gives the same observations (vLLM's own before it was renamed).
    Family("inter_token", "vllm:time_per_output_token_seconds", HISTOGRAM,
           "Seconds between consecutive output tokens (the older name of vllm:inter_token_latency_seconds)",
           VLLM_ITL_BUCKETS),
    Family("e2e", "vllm:e2e_request_latency_seconds", HISTOGRAM, "Seconds from submit to the final response",
           VLLM_E2E_BUCKETS),
    # vLLM's request phases, by the engine's clock, once per choice whose sequence got a first token
    # (a choice ended by a stop string, which the front finds, is not among them).
    Family("queue_time", "vllm:request_queue_time_seconds", HISTOGRAM,
           "Seconds a request waited in the engine's queue before its first step", VLLM_E2E_BUCKETS),
    Family("prefill_time", "vllm:request_prefill_time_seconds", HISTOGRAM,
           "Seconds from a request's first step to its first token", VLLM_E2E_BUCKETS),
    Family("decode_time", "vllm:request_decode_time_seconds", HISTOGRAM,
           "Seconds from a request's first token to its end", VLLM_E2E_BUCKETS),
    Family("inference_time", "vllm:request_inference_time_seconds", HISTOGRAM,
           "Seconds from a request's first step to its end (prefill + decode)", VLLM_E2E_BUCKETS),
    Family("request_prompt_tokens", "vllm:request_prompt_tokens", HISTOGRAM, "Prompt tokens per finished request",
           TOKEN_COUNT_BUCKETS),
    Family("request_generated_tokens", "vllm:request_generation_tokens", HISTOGRAM,
           "Generated tokens per finished request", TOKEN_COUNT_BUCKETS),
    Family("n", "vllm:request_params_n", HISTOGRAM, "Choices (n) asked for per finished request", VLLM_N_BUCKETS),
    # From Engine.stats() (GemmaMetrics.set_engine_stats).
    Family("kv_used", "gemma_kv_blocks_used", GAUGE, "KV cache blocks in use"),
    Family("kv_total", "gemma_kv_blocks_total", GAUGE, "KV cache blocks in the pool"),
    Family("kv_cached", "gemma_kv_blocks_cached", GAUGE, "Unreferenced KV blocks kept for prefix reuse"),
    Family("kv_usage", "vllm:kv_cache_usage_perc", GAUGE,
           "Fraction of the KV cache blocks in use, 0 to 1; blocks kept only for prefix reuse count as free"),
    Family("prefix_queries", "gemma_prefix_cache_queries_total", COUNTER,
           "Prompt tokens looked up in the prefix cache"),
    Family("prefix_queries", "vllm:prefix_cache_queries_total", COUNTER,
           "Prompt tokens looked up in the prefix cache"),
    Family("prefix_hits", "gemma_prefix_cache_hits_total", COUNTER, "Prompt tokens found in the prefix cache"),
    Family("prefix_hits", "vllm:prefix_cache_hits_total", COUNTER, "Prompt tokens found in the prefix cache"),
    Family("preemptions", "gemma_preemptions_total", COUNTER, "Sequences preempted when the KV cache ran dry"),
    Family("preemptions", "vllm:num_preemptions_total", COUNTER, "Sequences preempted when the KV cache ran dry"),
    Family("running", "gemma_running_requests", GAUGE, "Sequences being decoded"),
    Family("running", "vllm:num_requests_running", GAUGE, "Sequences being decoded"),
    Family("waiting", "gemma_queue_depth", GAUGE, "Requests waiting for a slot"),
    Family("waiting", "vllm:num_requests_waiting", GAUGE, "Requests waiting for a batch slot or KV cache blocks"),
    # Speculative decoding (EngineConfig.speculative_config); a draft is one sequence's proposal verified in one step.
    Family("spec_drafts", "gemma_spec_decode_drafts_total", COUNTER, "Speculative decoding: drafts verified"),
    Family("spec_drafts", "vllm:spec_decode_num_drafts_total", COUNTER, "Number of spec decoding drafts"),
    Family("spec_draft_tokens", "gemma_spec_decode_draft_tokens_total", COUNTER,
           "Speculative decoding: draft tokens proposed"),
    Family("spec_draft_tokens", "vllm:spec_decode_num_draft_tokens_total", COUNTER, "Number of draft tokens"),
    Family("spec_accepted", "gemma_spec_decode_accepted_tokens_total", COUNTER,
           "Speculative decoding: draft tokens accepted"),
    Family("spec_accepted", "vllm:spec_decode_num_accepted_tokens_total", COUNTER, "Number of accepted tokens"),
    Family("spec_accepted_per_pos", "gemma_spec_decode_accepted_tokens_per_pos_total", COUNTER,
           "Speculative decoding: drafts whose token at this position (0-based) was accepted",
           per=("position", DRAFT_POSITIONS)),
    Family("spec_accepted_per_pos", "vllm:spec_decode_num_accepted_tokens_per_pos_total", COUNTER,
           "Accepted tokens per draft position", per=("position", DRAFT_POSITIONS)),
    # By the model itself (GemmaMetrics.count_engine_restart, set_health).
    Family("engine_restarts", "gemma_engine_restarts_total", COUNTER,
           "Engine processes started again after one died or stopped answering"),
    # The model's health for probes and alerts (deploy/k8s/base/health.py): Triton 2.51 gives a Python
    # model no way to turn its own readiness false in model control mode none (docs/deploy.md, Health).
    Family("engine_state", "gemma_engine_state", GAUGE,
           "1 for the engine's current state: serving; restarting (it died or hung, a fresh one is on its "
           "way); failed (no restart left, or the model unloads itself)", per=("state", ENGINE_STATES)),
    Family("heartbeat", "gemma_heartbeat_timestamp_seconds", GAUGE,
           "Unix time of the model's last health check (every 0.1 s); it stops advancing when the model's "
           "stub process is dead or stuck"),
)


@dataclass
class RequestRecord:
    """What one finished request contributes to the counters and histograms."""
    outcome: str
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    inter_token_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None  # submit to final response
    n: int = 1  # choices the request asked for
    finish_reason: str | None = None  # the engine's ("stop", "length", "cancelled", "error"); None: refused
    phases: list[RequestPhases] = field(default_factory=list)  # one per choice the engine ended after a first token


class BucketCounters:
    """One series of a histogram: observations are counted here by bucket, and `flush` sends what came
    since the last one as increments of the counters `counter(suffix, labels)` makes, named as
    Prometheus names a histogram's series."""

    def __init__(self, bounds: tuple[float, ...], counter, labels: dict[str, str]):
        self._bounds = bounds
        self._buckets = [counter("_bucket", {**labels, "le": _le(bound)}) for bound in (*bounds, math.inf)]
        self._sum, self._count = counter("_sum", labels), counter("_count", labels)
        self._new = [0] * (len(bounds) + 1)  # observations since the last flush, by bucket (not cumulative)
        self._new_sum = 0.0

    def observe(self, value: float) -> None:
        self._new[bisect.bisect_left(self._bounds, value)] += 1  # le: a value on a bound is in its bucket
        self._new_sum += value

    def flush(self) -> None:
        new, self._new = self._new, [0] * len(self._new)
        new_sum, self._new_sum = self._new_sum, 0.0
        cumulative = sum(new)
        if not cumulative:
            return
        self._count.increment(cumulative)
        # From +Inf down: a scrape between two of these reads buckets that still never shrink as le grows.
        for bucket, count in zip(reversed(self._buckets), reversed(new)):
            if cumulative:
                bucket.increment(cumulative)
            cumulative -= count
        if new_sum:
            self._sum.increment(new_sum)


class PerObservation:
    """A histogram series as a Triton histogram: each observation is one IPC call, made at once."""

    def __init__(self, metric):
        self._metric = metric

    def observe(self, value: float) -> None:
        self._metric.observe(value)

    def flush(self) -> None:
        pass


def _le(bound: float) -> str:
    """A bucket's bound as Prometheus writes `le`: 0.025, 1, +Inf."""
    return "+Inf" if bound == math.inf else repr(bound).removesuffix(".0")


class GemmaMetrics:
    """The model's metrics. record, set_engine_stats, set_health and flush come from one thread (the
    model's monitor): what record and set_engine_stats add waits for that thread's next flush."""

    def __init__(self, model: str, version: str, instance: str, native_histograms: bool = False):
        """`native_histograms`: the histogram families as Triton histograms (PerObservation), not
        BucketCounters."""
        # Each model instance has its own series, sum them for the model; instances sharing an engine
        # (one device's) export its own gauges and counters from one of them (model.py).
        # vLLM labels a series with the served model and the engine, which for us is the instance.
        ours = {"model": model, "version": version, "instance": instance}
        vllms = {"model_name": model, "engine": instance}
        self._families = []  # families must outlive their metrics: keep references to both
        self._series: dict[str, list] = {}  # quantity -> its metrics ({label value: metric} for `per`)
        self._histograms: list[BucketCounters | PerObservation] = []
        for f in FAMILIES:
            labels = vllms if f.name.startswith("vllm:") else ours
            if f.kind == HISTOGRAM:
                series = (PerObservation(self._family(f.name, f.help, HISTOGRAM).Metric(labels=labels,
                                                                                       buckets=list(f.buckets)))
                          if native_histograms else BucketCounters(f.buckets, self._counter_maker(f), labels))
                self._histograms.append(series)
            elif f.per is None:
                series = self._family(f.name, f.help, f.kind).Metric(labels=labels)
            else:
                family, (label, values) = self._family(f.name, f.help, f.kind), f.per
                series = {value: family.Metric(labels={**labels, label: value}) for value in values}
            self._series.setdefault(f.quantity, []).append(series)
        self._pending: dict[tuple[str, str | None], float] = {}  # (quantity, label value) -> added this period
        self._flushes = 0
        # The engine counts these itself; the counters advance by what it added since the last update.
        self._engine_totals = {"prefix_queries": 0, "prefix_hits": 0, "preemptions": 0, **dict.fromkeys(SPEC_DECODE, 0)}
        self._accepted_per_pos = [0] * len(DRAFT_POSITIONS)
        self._engine_state: str | None = None  # as last exported

    def _family(self, name: str, help: str, kind: str):
        kinds = {COUNTER: pb_utils.MetricFamily.COUNTER, GAUGE: pb_utils.MetricFamily.GAUGE,
                 HISTOGRAM: pb_utils.MetricFamily.HISTOGRAM}
        family = pb_utils.MetricFamily(name=name, description=help, kind=kinds[kind])
        self._families.append(family)
        return family

    def _counter_maker(self, f: Family):
        """A histogram's counters: one family per series name (<name>_bucket, _sum, _count)."""
        families: dict[str, object] = {}

        def counter(suffix: str, labels: dict[str, str]):
            if suffix not in families:
                families[suffix] = self._family(f.name + suffix, f.help, COUNTER)
            return families[suffix].Metric(labels=labels)
        return counter

    def record(self, r: RequestRecord) -> None:
        self._add("outcome", 1, key=r.outcome)
        self._add("prompt_tokens", r.prompt_tokens)
        self._add("generated_tokens", r.output_tokens)
        self._observe("ttft", r.ttft_s)
        for series in self._series["inter_token"]:
            for gap in r.inter_token_s:
                series.observe(gap)
        reason = VLLM_FINISH_REASONS.get(r.finish_reason)
        if reason is None:  # refused before the engine had it: vLLM would not have seen it either
            return
        self._add("finish_reason", 1, key=reason)
        self._observe("e2e", r.e2e_s)
        self._observe("request_prompt_tokens", r.prompt_tokens)
        self._observe("request_generated_tokens", r.output_tokens)
        self._observe("n", r.n)
        for phases in r.phases:
            self._observe("queue_time", phases.queue_s)
            self._observe("prefill_time", phases.prefill_s)
            self._observe("decode_time", phases.decode_s)
            self._observe("inference_time", phases.prefill_s + phases.decode_s)

    def set_engine_stats(self, stats) -> None:
        kv = stats.kv_cache
        self._set("kv_used", kv.used_blocks)
        self._set("kv_total", kv.total_blocks)
        self._set("kv_cached", kv.cached_blocks)
        self._set("kv_usage", kv.used_blocks / kv.total_blocks)
        spec = stats.spec_decode
        for quantity, total in (("prefix_queries", stats.prefix_cache.queries),
                                ("prefix_hits", stats.prefix_cache.hits), ("preemptions", stats.num_preemptions),
                                *((quantity, getattr(spec, name)) for quantity, name in SPEC_DECODE.items())):
            if total < self._engine_totals[quantity]:  # a restarted engine counts from 0 again
                self._engine_totals[quantity] = 0
            if total > self._engine_totals[quantity]:
                self._add(quantity, total - self._engine_totals[quantity])
                self._engine_totals[quantity] = total
        for position, total in enumerate(spec.num_accepted_tokens_per_pos[:len(DRAFT_POSITIONS)]):
            if total < self._accepted_per_pos[position]:
                self._accepted_per_pos[position] = 0
            if total > self._accepted_per_pos[position]:
                self._add("spec_accepted_per_pos", total - self._accepted_per_pos[position], key=DRAFT_POSITIONS[position])
                self._accepted_per_pos[position] = total
        self._set("running", stats.num_running)
        self._set("waiting", stats.num_waiting)

    def count_engine_restart(self) -> None:
        """Sent at once: it is rare, and comes from the restarting thread, not the one that flushes."""
        for series in self._series["engine_restarts"]:
            series.increment(1)

    def set_health(self, engine_state: str, now: float) -> None:
        """The engine's state (one of ENGINE_STATES) and the heartbeat, Unix time `now`."""
        if engine_state != self._engine_state:  # 3 IPC calls: only on a change
            for state in ENGINE_STATES:
                for series in self._series["engine_state"]:
                    series[state].set(1 if state == engine_state else 0)
            self._engine_state = engine_state
        self._set("heartbeat", now)

    def flush(self) -> None:
        """Send what this period added: each counter's sum in one update; every HISTOGRAM_PERIODS
        flushes, the histograms' buckets."""
        pending, self._pending = self._pending, {}
        for (quantity, key), amount in pending.items():
            for series in self._series[quantity]:
                (series if key is None else series[key]).increment(amount)
        self._flushes += 1
        if self._flushes % HISTOGRAM_PERIODS == 0:
            for series in self._histograms:
                series.flush()

    def _add(self, quantity: str, amount: float, key: str | None = None) -> None:
        if amount:  # a counter in _pending costs an IPC call at the flush: none for nothing
            self._pending[quantity, key] = self._pending.get((quantity, key), 0) + amount

    def _observe(self, quantity: str, value: float | None) -> None:
        if value is not None:
            for series in self._series[quantity]:
                series.observe(value)

    def _set(self, quantity: str, value: float) -> None:
        for series in self._series[quantity]:
            series.set(value)
