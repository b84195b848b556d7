"""Prometheus metrics: request outcomes and latencies, tokens, and the pool's state at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from droidpool.core.model import Usage
from droidpool.core.service import TurnService

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class PoolCollector(Collector):
    """Reads the pool's gauges and counters when Prometheus scrapes: no second bookkeeping."""

    def __init__(self, turns: TurnService) -> None:
        self.pool = turns.pool

    def collect(self) -> Iterator[Metric]:
        stats = self.pool.stats()
        workers = GaugeMetricFamily("droidpool_workers", "droid worker processes by state", labels=["state"])
        for state, count in stats["workers"].items():
            if state != "queued":
                workers.add_metric([state], count)
        yield workers
        yield GaugeMetricFamily("droidpool_workers_max", "the process cap", value=stats["max_workers"])
        yield GaugeMetricFamily("droidpool_queue_length", "requests waiting for a worker",
                                value=stats["workers"]["queued"])
        yield GaugeMetricFamily("droidpool_workers_rss_bytes", "resident memory of all worker process groups",
                                value=stats["rss_bytes"])
        yield GaugeMetricFamily("droidpool_ready", "1 when the pool can serve", value=int(self.pool.ready))
        yield GaugeMetricFamily("droidpool_minted_sessions",
                                "1 when new conversations start in minted sessions; 0: a fresh process each "
                                "(the self-test failed, is pending, or minting is off)",
                                value=int(self.pool.mode == "minted"))
        wait = stats["queue_wait"]
        yield CounterMetricFamily("droidpool_queue_wait_seconds", "time requests waited for a worker",
                                  value=wait["sum_s"])
        yield CounterMetricFamily("droidpool_leases", "workers handed to requests", value=wait["count"])
        events = CounterMetricFamily("droidpool_pool_events", "spawns, crashes, evictions, recycles, ...",
                                     labels=["event"])
        for key, value in stats.items():
            if key.endswith("_total"):
                events.add_metric([key.removesuffix("_total")], value)
        yield events


class TurnsCollector(Collector):
    """Turns parked on client tools, read from the turn service when Prometheus scrapes."""

    EVENTS = ("parked", "resumed", "park_expired", "park_refused", "park_yielded", "park_undelivered",
              "resume_refused", "tool_results_fallback", "tools_deferred")

    def __init__(self, turns: TurnService) -> None:
        self.turns = turns

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("droidpool_parked_turns", "turns waiting for client tool results (each holds a worker)",
                                value=len(self.turns.parked))
        events = CounterMetricFamily(
            "droidpool_tool_events",
            "client tools: turns parked on calls, resumed with results, expired, refused (limit), yielded to a "
            "waiting request, released because their client never got the calls, resumes refused for their "
            "content, results that came too late (sent as a message), turns where droid deferred the tools "
            "behind ToolSearch",
            labels=["event"])
        for event in self.EVENTS:
            events.add_metric([event], self.turns.counters[event])
        yield events


class LedgerCollector(Collector):
    """Standard tokens and budget warnings, read from the ledger when Prometheus scrapes."""

    def __init__(self, turns: TurnService) -> None:
        self.ledger = turns.ledger

    def collect(self) -> Iterator[Metric]:
        tokens = CounterMetricFamily("droidpool_standard_tokens",
                                     "standard tokens of recorded turns (weighted tokens x the model's multiplier)",
                                     labels=["model", "key"])
        for (model, key), value in sorted(self.ledger.standard_tokens.items()):
            tokens.add_metric([model, key], value)
        yield tokens
        warnings = CounterMetricFamily("droidpool_budget_warnings", "budgets found past a warning threshold",
                                       labels=["window", "threshold"])
        for (window, threshold), count in sorted(self.ledger.warnings.items()):
            warnings.add_metric([window, threshold], count)
        yield warnings
        used = GaugeMetricFamily("droidpool_budget_used_ratio",
                                 "each budget's use as last checked (1 = used up), by window and key (\"\": service)",
                                 labels=["window", "key"])
        for (window, key), ratio in sorted(self.ledger.last_ratio.items()):
            used.add_metric([window, key], ratio)
        yield used


class NodesCollector(Collector):
    """Forwards, takeovers and session-file restores of this node, with several nodes."""

    def __init__(self, turns: TurnService) -> None:
        self.turns = turns

    def collect(self) -> Iterator[Metric]:
        cluster = self.turns.cluster
        if cluster is None:
            return
        events = CounterMetricFamily("droidpool_node_events",
                                     "turns forwarded to the node holding their session, forwards that failed (the "
                                     "turn then ran here), sessions taken over, session-file bytes stored",
                                     labels=["event"])
        for event in ("forwards", "forward_failures", "takeovers", "files_saved_bytes", "files_save_failed"):
            events.add_metric([event], cluster.counters[event])
        yield events
        yield CounterMetricFamily("droidpool_takeover_seconds", "time to take sessions over (restoring their files)",
                                  value=cluster.takeover_seconds)
        yield GaugeMetricFamily("droidpool_store_ok", "1 while the last heartbeat reached the shared store",
                                value=int(cluster.store_ok))


class Metrics:
    """One registry per daemon (no global state), scraped at GET /metrics."""

    def __init__(self, turns: TurnService) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("droidpool_requests", "turn requests by outcome",
                                ["status", "stream"], registry=self.registry)
        self.dialects = Counter("droidpool_dialect_requests", "turn requests by wire dialect",
                                ["dialect"], registry=self.registry)
        self.ttft = Histogram("droidpool_time_to_first_token_seconds", "request start to first token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.duration = Histogram("droidpool_request_duration_seconds", "whole turn requests",
                                  buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("droidpool_tokens", "tokens droid reported", ["kind"], registry=self.registry)
        for collector in (PoolCollector, TurnsCollector, LedgerCollector, NodesCollector):
            self.registry.register(collector(turns))

    def observe(self, *, status: int, stream: bool, duration_s: float, ttft_s: float | None,
                usage: Usage | None, dialect: str) -> None:
        self.requests.labels(str(status), str(stream).lower()).inc()
        self.dialects.labels(dialect).inc()
        self.duration.observe(duration_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if usage is None:
            return
        for kind, count in (("input", usage.input_tokens), ("output", usage.output_tokens),
                            ("cache_read", usage.cache_read_tokens), ("cache_creation", usage.cache_creation_tokens),
                            ("thinking", usage.thinking_tokens)):
            if count:
                self.tokens.labels(kind).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
