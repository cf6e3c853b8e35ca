"""Prometheus metrics, named like vLLM's with a `jaxllm:` prefix.

Gauges and the prefix-cache counters are read from the engine at scrape time (a custom collector), so
they are never stale; token counters and latency histograms are fed per output by AsyncLLMEngine.
Each server gets its own CollectorRegistry, so several apps can live in one process (tests).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jaxllm.engine import LLMEngine
from jaxllm.entrypoints.async_engine import RequestTimes

disable_created_metrics()  # no `*_created` series, as vLLM

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)


class _EngineStateCollector:
    """Scheduler and KV-cache state, read when /metrics is scraped."""

    def __init__(self, engine: LLMEngine, model_name: str):
        self.engine = engine
        self.labels = {"model_name": model_name}

    def _gauge(self, name, doc, value):
        g = GaugeMetricFamily(name, doc, labels=list(self.labels))
        g.add_metric(list(self.labels.values()), value)
        return g

    def _counter(self, name, doc, value):
        c = CounterMetricFamily(name, doc, labels=list(self.labels))
        c.add_metric(list(self.labels.values()), value)
        return c

    def collect(self):
        sched, kv = self.engine.scheduler, self.engine.kv_cache_manager
        yield self._gauge("jaxllm:num_requests_running", "Requests in model execution batches.", len(sched.running))
        yield self._gauge("jaxllm:num_requests_waiting", "Requests waiting to be scheduled.", len(sched.waiting))
        yield self._gauge("jaxllm:kv_cache_usage_perc", "KV-cache usage: 1 means 100 percent of blocks in use.",
                          kv.usage)
        yield self._gauge("jaxllm:num_gpu_blocks", "KV-cache blocks in the pool.", kv.num_blocks)
        yield self._gauge("jaxllm:num_free_gpu_blocks", "KV-cache blocks with no reference.", kv.num_free_blocks)
        yield self._counter("jaxllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                            kv.prefix_cache_queries)
        yield self._counter("jaxllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                            kv.prefix_cache_hits)
        yield self._counter("jaxllm:num_preemptions", "Requests preempted (recomputed later).",
                            getattr(sched, "num_preemptions", 0))


class ServerMetrics:
    """The server's metrics. `observe` is AsyncLLMEngine's on_output callback."""

    def __init__(self, engine: LLMEngine, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStateCollector(engine, model_name))
        labels = ["model_name"]
        kw = {"labelnames": labels, "registry": self.registry}
        self.prompt_tokens = Counter("jaxllm:prompt_tokens", "Prefill tokens processed.", **kw).labels(model_name)
        self.generation_tokens = Counter("jaxllm:generation_tokens", "Generation tokens processed.",
                                         **kw).labels(model_name)
        self.request_success = Counter("jaxllm:request_success", "Finished requests by finish reason.",
                                       labelnames=["model_name", "finished_reason"], registry=self.registry)
        self.ttft = Histogram("jaxllm:time_to_first_token_seconds", "Time to first token.",
                              buckets=_TTFT_BUCKETS, **kw).labels(model_name)
        self.tpot = Histogram("jaxllm:time_per_output_token_seconds", "Time per output token after the first.",
                              buckets=_TPOT_BUCKETS, **kw).labels(model_name)
        self.e2e = Histogram("jaxllm:e2e_request_latency_seconds", "End-to-end request latency.",
                             buckets=_E2E_BUCKETS, **kw).labels(model_name)
        self.model_name = model_name

    def observe(self, times: RequestTimes, num_new_tokens: int, now: float) -> None:
        if times.last_token is None:  # this output carries the first token, and all of them if not streamed
            self.prompt_tokens.inc(times.num_prompt_tokens)
            self.ttft.observe(times.first_token - times.arrival)
            if num_new_tokens > 1:
                gap = (now - times.first_token) / (num_new_tokens - 1)
                for _ in range(num_new_tokens - 1):
                    self.tpot.observe(gap)
        elif num_new_tokens > 0:
            gap = (now - times.last_token) / num_new_tokens
            for _ in range(num_new_tokens):
                self.tpot.observe(gap)
        self.generation_tokens.inc(max(num_new_tokens, 0))
        if times.finish_reason is not None:
            self.request_success.labels(self.model_name, times.finish_reason).inc()
            self.e2e.observe(now - times.arrival)

    def observe_abort(self, num_requests: int) -> None:
        self.request_success.labels(self.model_name, "abort").inc(num_requests)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class PoolingMetrics:
    """A pooling server's metrics, named as the generation server's: requests in flight, finished requests,
    their prompt tokens and their latency. `track` wraps one request's handling."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        kw = {"labelnames": ["model_name"], "registry": self.registry}
        self.running = Gauge("jaxllm:num_requests_running", "Requests being handled.", **kw).labels(model_name)
        self.prompt_tokens = Counter("jaxllm:prompt_tokens", "Prompt tokens pooled.", **kw).labels(model_name)
        # a pooling request ends when its vectors are ready: vLLM counts it with finished_reason "stop"
        self.request_success = Counter("jaxllm:request_success", "Finished requests by finish reason.",
                                       labelnames=["model_name", "finished_reason"],
                                       registry=self.registry).labels(model_name, "stop")
        self.e2e = Histogram("jaxllm:e2e_request_latency_seconds", "End-to-end request latency.",
                             buckets=_E2E_BUCKETS, **kw).labels(model_name)

    async def track(self, work) -> dict:
        """Await a request's `work` (its answer, with OpenAI's `usage`), counting it once it succeeds."""
        arrival = time.monotonic()
        self.running.inc()
        try:
            answer = await work
        finally:
            self.running.dec()
        usage = answer.get("usage") or {}
        self.prompt_tokens.inc(usage.get("prompt_tokens", usage.get("total_tokens", 0)))
        self.request_success.inc()
        self.e2e.observe(time.monotonic() - arrival)
        return answer

    def render(self) -> bytes:
        return generate_latest(self.registry)
