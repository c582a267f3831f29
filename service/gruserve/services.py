"""The objects a running server is made of, built by :mod:`gruserve.server`.

The API layer receives one :class:`Services` and never constructs anything
itself, so tests and the benchmark build the same graph as production.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from gruserve.errors import SnapshotError
from gruserve.metrics import Metrics
from gruserve.runtime.predictor import Predictor
from gruserve.runtime.registry import ModelRegistry
from gruserve.runtime.versions import Batchers, RepositoryWatcher
from gruserve.sessions import snapshot
from gruserve.sessions.census import VersionCensus
from gruserve.sessions.memory import MemorySessionStore
from gruserve.sessions.service import SessionService
from gruserve.sessions.store import SessionStore
from gruserve.sessions.sweeper import Sweeper
from gruserve.settings import Settings

log = logging.getLogger("gruserve")


@dataclass
class Services:
    settings: Settings
    registry: ModelRegistry
    batchers: Batchers
    predictor: Predictor
    sessions: SessionService
    store: SessionStore
    metrics: Metrics
    executor: ThreadPoolExecutor
    tracing: Any = None
    """A :class:`gruserve.tracing.Tracing` when OpenTelemetry tracing is on, else None."""
    sweeper: Sweeper | None = None
    """Forgets expired sessions in the background while serving (:meth:`start`)."""
    watcher: RepositoryWatcher | None = None
    """Follows the repository and unloads idle versions; started with the app."""
    census: VersionCensus | None = None
    """Counts sessions per model version for ``/metrics`` (in the background on Redis)."""

    def start(self) -> None:
        """Start the background work of a serving process (in its event loop)."""
        if self.sweeper is not None:
            self.sweeper.start()
        if self.watcher is not None:
            self.watcher.start()
        if self.census is not None:
            self.census.start()

    async def aclose(self) -> None:
        """Finish running batches, write the snapshot (if configured), then release the store
        and the threads."""
        if self.sweeper is not None:
            await self.sweeper.stop()
        if self.watcher is not None:
            await self.watcher.stop()
        if self.census is not None:
            await self.census.stop()
        await asyncio.gather(*(b.close() for b in self.batchers.values()))
        self.registry.close()
        self.write_snapshot()
        await self.store.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.tracing is not None:
            self.tracing.shutdown()  # exports the spans still buffered

    def write_snapshot(self) -> None:
        """Write every live session to ``settings.snapshot_path`` (memory store only).

        A failure is logged, not raised: shutting down must go on.
        """
        path = self.settings.snapshot_path
        if path is None or not isinstance(self.store, MemorySessionStore):
            return
        records = self.store.records()
        try:
            snapshot.write(path, records)
        except SnapshotError as exc:
            log.error("%s; the sessions are lost", exc)
            return
        log.info("wrote %d sessions to %s", len(records), path)
