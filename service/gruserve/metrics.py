"""Prometheus collectors, all registered on a registry the caller passes in.

Nothing here touches prometheus-client's global registry: the composition root
makes one :class:`~prometheus_client.CollectorRegistry` per app, so two apps in
one process (tests, benchmarks) never collide. Hot paths hold the labelled
children returned by :meth:`Metrics.for_model` instead of calling ``labels()``
per event.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus-client's multiprocess mode: set (``gruserve serve --workers N`` sets it), every
process writes its samples to files in this folder and a scrape of any one of them sums
all of them."""
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class ModelMetrics:
    """The labelled collectors of one model, resolved once."""

    batch_size: Histogram
    batch_seconds: Histogram
    queue_seconds: Histogram
    steps: Counter
    timesteps: Counter
    batch_failures: Counter
    inline_batches: Counter


class Metrics:
    """Every gruserve collector.

    Args:
        registry: where the collectors register; never the global default in tests.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
        # (read from /proc at each scrape; nothing on systems without it)
        self.process = ProcessCollector(registry=registry)
        self.batch_size = Histogram(
            "gruserve_batch_size",
            "Steps coalesced into one onnxruntime run.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "gruserve_batch_seconds",
            "Duration of one batched onnxruntime run.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "gruserve_queue_seconds",
            "Time a step waited before its batch started.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.steps = Counter(
            "gruserve_steps", "Session steps run through the batcher.", ["model"], registry=registry
        )
        self.timesteps = Counter(
            "gruserve_timesteps", "Timesteps run through the batcher.", ["model"], registry=registry
        )
        self.batch_failures = Counter(
            "gruserve_batch_failures", "Batched runs that raised.", ["model"], registry=registry
        )
        self.inline_batches = Counter(
            "gruserve_inline_batches",
            "Batched runs made on the event loop (recent runs of that size were cheaper than "
            "a hand-off to the thread pool).",
            ["model"],
            registry=registry,
        )
        self.predictions = Counter(
            "gruserve_predictions", "Stateless predict calls.", ["model"], registry=registry
        )
        self.http_requests = Counter(
            "gruserve_http_requests",
            "HTTP requests answered.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.http_seconds = Histogram(
            "gruserve_http_request_seconds",
            "HTTP request latency.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.grpc_requests = Counter(
            "gruserve_grpc_requests",
            "gRPC requests answered: unary calls, and each message of ModelStreamInfer.",
            ["method", "code"],
            registry=registry,
        )
        self.grpc_seconds = Histogram(
            "gruserve_grpc_request_seconds",
            "gRPC request latency (per message on ModelStreamInfer).",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ws_messages = Counter(
            "gruserve_websocket_messages",
            "WebSocket step messages answered.",
            ["kind"],
            registry=registry,
        )
        self.errors = Counter(
            "gruserve_errors", "Errors returned to clients, by type.", ["type"], registry=registry
        )
        self.sessions = Gauge(
            "gruserve_sessions",
            "Sessions in the store (updated on every scrape).",
            registry=registry,
            multiprocess_mode="mostrecent",  # several workers count the same shared store
        )
        self.sessions_expired = Counter(
            "gruserve_sessions_expired",
            "Sessions removed after their idle TTL or their maximum lifetime.",
            ["reason"],
            registry=registry,
        )
        for reason in ("idle", "lifetime"):
            self.sessions_expired.labels(reason)
        self.sessions_evicted = Counter(
            "gruserve_sessions_evicted",
            "Least recently used sessions evicted to make room (GRUSERVE_SESSION_EVICTION=lru).",
            registry=registry,
        )
        self.step_replays = Counter(
            "gruserve_step_replays",
            "Retried steps (same step number) answered with the stored result, not run again.",
            registry=registry,
        )
        self.cas_conflicts = Counter(
            "gruserve_session_conflicts",
            "Session updates retried because another server advanced the session first.",
            registry=registry,
        )
        self.recent_misses = Counter(
            "gruserve_session_recent_misses",
            "Steps begun on this server's kept copy of their session's last write "
            "(GRUSERVE_STORE_RECENT_RECORDS) that found it stale and read the session again.",
            registry=registry,
        )
        self.models = Gauge(
            "gruserve_model_loaded",
            "1 for each served model, 0 for one that failed to load.",
            ["model", "version", "provider"],
            registry=registry,
            multiprocess_mode="max",  # every worker loads the same models
        )

        self.version_bytes = Gauge(
            "gruserve_model_version_bytes",
            "ONNX bytes of each loaded model version (updated on every scrape).",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.version_sessions = Gauge(
            "gruserve_model_version_sessions",
            "Sessions on each model version (memory store: counted on every scrape; Redis: the "
            "fleet's, counted every GRUSERVE_SESSION_CENSUS_INTERVAL_S).",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.version_failures = Counter(
            "gruserve_model_version_load_failures",
            "Model versions that failed to load, verify or warm up (never made the default).",
            ["model"],
            registry=registry,
        )
        self.session_upgrades = Counter(
            "gruserve_session_upgrades",
            "Sessions moved to another version of their model, by how: upgrade or replay "
            "(POST /v1/sessions/{id}/upgrade without or with replay), reset-on-gone or "
            "upgrade-on-gone (GRUSERVE_SESSION_ON_VERSION_GONE).",
            ["model", "from_version", "to_version", "how"],
            registry=registry,
        )
        self.upgrade_replayed = Counter(
            "gruserve_session_upgrade_replayed_timesteps",
            "Kept input timesteps run to warm sessions moved to another version.",
            ["model"],
            registry=registry,
        )

    def watch_versions(self, registry: Any) -> None:
        """Count ``registry``'s load failures and show its loaded versions."""
        registry.on_failure = lambda name, version, reason: self.version_failures.labels(name).inc()
        self.show_versions(registry)

    def show_versions(
        self, registry: Any, sessions: dict[tuple[str, int], int] | None = None
    ) -> None:
        """Set the per-version gauges to what ``registry`` holds now (a
        :class:`~gruserve.runtime.registry.ModelRegistry`); ``sessions``: counts per
        (model, version) when the store can tell."""
        self.version_bytes.clear()
        self.models.clear()
        for status in registry.statuses():
            if not status.ready:
                self.models.labels(status.name, "", "").set(0)
        for model in registry.models():
            self.models.labels(model.name, str(model.version), model.provider).set(1)
            self.version_bytes.labels(model.name, str(model.version)).set(model.size_bytes)
        if sessions is not None:
            self.version_sessions.clear()
            for (name, version), count in sorted(sessions.items()):
                self.version_sessions.labels(name, str(version)).set(count)

    def count_upgrade(
        self, model: str, from_version: int, to_version: int, how: str, replayed: int
    ) -> None:
        """Count one session moved between versions of ``model`` (``how``: one of
        ``upgrade``, ``replay``, ``reset-on-gone``, ``upgrade-on-gone``; versions are the
        repository's, so the label sets stay as few as the versions on disk)."""
        self.session_upgrades.labels(model, str(from_version), str(to_version), how).inc()
        if replayed:
            self.upgrade_replayed.labels(model).inc(replayed)

    def exposition(self) -> bytes:
        """What ``/metrics`` answers: this registry's samples or, in multiprocess mode (several
        workers, :data:`MULTIPROCESS_DIR`), every worker's, counters and histograms summed."""
        if os.environ.get(MULTIPROCESS_DIR):
            merged = CollectorRegistry()
            MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)

    def for_model(self, model: str) -> ModelMetrics:
        return ModelMetrics(
            self.batch_size.labels(model),
            self.batch_seconds.labels(model),
            self.queue_seconds.labels(model),
            self.steps.labels(model),
            self.timesteps.labels(model),
            self.batch_failures.labels(model),
            self.inline_batches.labels(model),
        )
