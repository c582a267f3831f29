"""Prometheus collectors, all registered on a registry the caller passes in.

Nothing here touches prometheus-client's global registry: the composition root
makes one :class:`~prometheus_client.CollectorRegistry` per app, so two apps in
one process (tests, benchmarks) never collide. Hot paths hold the labelled
children returned by :meth:`Metrics.for_model` instead of calling ``labels()``
per event.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

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


class VersionSource(Protocol):
    """What :class:`ModelVersions` reads of the model registry
    (:class:`~gruserve.runtime.registry.ModelRegistry`)."""

    on_failure: Callable[[str, int, str], None] | None

    def statuses(self) -> Iterable[Any]:
        """One status per model (``name``, ``ready``)."""

    def models(self) -> Iterable[Any]:
        """Every loaded version (``name``, ``version``, ``provider``, ``size_bytes``)."""


class SessionCounts(Protocol):
    """Sessions per (model, version) (:class:`~gruserve.sessions.census.VersionCensus`)."""

    def counts(self) -> dict[tuple[str, int], int] | None:
        """The latest counts; None while none has been made."""


class ModelVersions(Collector):
    """``gruserve_model_loaded``, ``gruserve_model_version_bytes`` and
    ``gruserve_model_version_sessions``, read from the model registry when scraped.

    They describe what is loaded now, so they are made at each scrape rather than kept in
    gauges: a gauge's label set outlives an unloaded version unless removed, and
    prometheus-client cannot remove label sets in its multiprocess mode (``--workers N``),
    where an unloaded version stayed in every scrape as loaded, and a model that failed and
    then loaded stayed at 0 (its alert firing). Under ``--workers N`` a scrape shows the
    versions of the worker that answers it; every worker loads the same repository.
    """

    def __init__(self, models: VersionSource, census: SessionCounts) -> None:
        self.models, self.census = models, census

    def collect(self) -> Iterator[Metric]:
        loaded = GaugeMetricFamily(
            "gruserve_model_loaded",
            "1 for each served model version, 0 for a model that failed to load.",
            labels=["model", "version", "provider"],
        )
        for status in self.models.statuses():
            if not status.ready:
                loaded.add_metric([status.name, "", ""], 0)
        size = GaugeMetricFamily(
            "gruserve_model_version_bytes",
            "ONNX bytes of each loaded model version.",
            labels=["model", "version"],
        )
        for model in self.models.models():
            loaded.add_metric([model.name, str(model.version), model.provider], 1)
            size.add_metric([model.name, str(model.version)], model.size_bytes)
        sessions = GaugeMetricFamily(
            "gruserve_model_version_sessions",
            "Sessions on each model version (memory store: counted on every scrape; Redis: the "
            "fleet's, counted every GRUSERVE_SESSION_CENSUS_INTERVAL_S).",
            labels=["model", "version"],
        )
        for (name, version), count in sorted((self.census.counts() or {}).items()):
            sessions.add_metric([name, str(version)], count)
        yield from (loaded, size, sessions)


SUPERVISOR_FILE = "supervisor.pid"
"""In the multiprocess folder: the pid of the ``--workers N`` supervisor
(:mod:`gruserve.workers` writes it), whose process figures a scrape reports too."""
_SAMPLES_OF = re.compile(r"_(\d+)\.db$")  # prometheus-client's files: <kind>_<pid>.db


class ServerProcesses(Collector):
    """``process_*`` of every process of a ``--workers N`` server, labelled ``pid``: each
    worker and the supervisor.

    prometheus-client's multiprocess mode carries no process figures (a scrape merges the
    sample files, and a ProcessCollector reads only the process it runs in), so under
    workers ``/metrics`` had no CPU seconds or resident memory at all and the dashboard's
    panels for them stayed empty. Here each process's figures are read from ``/proc`` at the
    scrape by prometheus-client's own ProcessCollector: the workers are the processes that
    wrote sample files to ``folder`` and still run (a replaced worker's files stay, its
    figures go), the supervisor is the one :data:`SUPERVISOR_FILE` names. Summed by
    instance, as the dashboard does, they are the whole server's.
    """

    def __init__(self, folder: str, proc: str = "/proc") -> None:
        self.folder, self.proc = Path(folder), proc

    def pids(self) -> list[int]:
        """The server's running processes: the supervisor, and the workers with sample files
        (its children: a pid the system gave again to another process is not one)."""
        written = {
            int(m.group(1)) for f in self.folder.glob("*.db") if (m := _SAMPLES_OF.search(f.name))
        }
        try:
            supervisor = int((self.folder / SUPERVISOR_FILE).read_text())
        except (OSError, ValueError):  # not `gruserve serve --workers`: every live writer
            return sorted(pid for pid in written if self._parent(pid) is not None)
        workers = [pid for pid in written if self._parent(pid) == supervisor]
        alive = self._parent(supervisor) is not None
        return sorted([supervisor, *workers] if alive else workers)

    def _parent(self, pid: int) -> int | None:
        """``pid``'s parent, from ``/proc``; None: no such process."""
        try:
            stat = Path(self.proc, str(pid), "stat").read_text()
        except OSError:
            return None
        return int(stat.rpartition(")")[2].split()[1])

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for pid in self.pids():
            reader = ProcessCollector(pid=_returning(pid), proc=self.proc, registry=None)
            for family in reader.collect():  # nothing for a process that just went
                into = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    into.add_sample(sample.name, {**sample.labels, "pid": str(pid)}, sample.value)
        yield from merged.values()


def _returning(pid: int) -> Callable[[], int]:
    """``pid`` as ProcessCollector takes it: a function answering which process to read."""
    return lambda: pid


class Metrics:
    """Every gruserve collector.

    Args:
        registry: where the collectors register; never the global default in tests.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.versions: ModelVersions | None = None  # once watch_versions is called
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

    def watch_versions(self, models: VersionSource, census: SessionCounts) -> None:
        """Count ``models``' load failures, and show its loaded versions (and ``census``'
        sessions per version) on every scrape (:class:`ModelVersions`)."""
        models.on_failure = lambda name, version, reason: self.version_failures.labels(name).inc()
        self.versions = ModelVersions(models, census)
        self.registry.register(self.versions)

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
        folder = os.environ.get(MULTIPROCESS_DIR)
        if folder:
            merged = CollectorRegistry()
            MultiProcessCollector(merged)
            merged.register(ServerProcesses(folder))
            if self.versions is not None:  # what this worker has loaded (see ModelVersions)
                merged.register(self.versions)
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
