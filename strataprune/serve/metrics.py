"""The server's Prometheus metrics (text exposition format at ``/metrics``), one registry per server.

Latencies are histograms in seconds: time to first token (TTFT, from arrival to the first generated
token, queueing and prefill included), time per output token (TPOT, the mean gap between later
tokens of one request) and end-to-end latency. ``decode_batch_size`` records how many sequences each
batched decode step ran; ``batched_decode_steps_total`` counts the steps that ran more than one.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # the *_created series only repeat the start time

PREFIX = "strataprune_serve_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServeMetrics:
    def __init__(self, max_running: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            PREFIX + "requests", "HTTP requests answered, by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds", "arrival to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            PREFIX + "time_per_output_token_seconds", "mean gap between tokens after the first", buckets=TOKEN_BUCKETS, registry=r
        )
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "arrival to last token", buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter(PREFIX + "generation_tokens", "tokens generated", registry=r)
        self.running = Gauge(PREFIX + "requests_running", "sequences holding a KV cache (prefilling or decoding)", registry=r)
        self.waiting = Gauge(PREFIX + "requests_waiting", "requests queued for a slot", registry=r)
        self.batch_size = Histogram(
            PREFIX + "decode_batch_size",
            "sequences in each decode step",
            buckets=tuple(float(b) for b in range(1, max_running + 1)),
            registry=r,
        )
        self.decode_steps = Counter(PREFIX + "decode_steps", "decode steps (one forward each)", registry=r)
        self.batched_steps = Counter(PREFIX + "batched_decode_steps", "decode steps that ran two or more sequences", registry=r)
        self.prefill_chunks = Counter(PREFIX + "prefill_chunks", "prefill forwards (chunks of a prompt)", registry=r)
        self.kv_bytes = Gauge(PREFIX + "kv_cache_bytes", "bytes held by KV caches now (padding included)", registry=r)
        self.kv_bound = Gauge(PREFIX + "kv_cache_bound_bytes", "most bytes the KV caches can hold", registry=r)
        self.cancelled = Counter(PREFIX + "cancelled_requests", "sequences freed before they finished", ["reason"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
