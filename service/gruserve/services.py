"""The objects a running server is made of, built by :mod:`gruserve.server`.

The API layer receives one :class:`Services` and never constructs anything
itself, so tests and the benchmark build the same graph as production.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from gruserve.metrics import Metrics
from gruserve.runtime.batcher import Batcher
from gruserve.runtime.predictor import Predictor
from gruserve.runtime.registry import ModelRegistry
from gruserve.sessions.service import SessionService
from gruserve.sessions.store import SessionStore
from gruserve.settings import Settings


@dataclass
class Services:
    settings: Settings
    registry: ModelRegistry
    batchers: dict[str, Batcher]
    predictor: Predictor
    sessions: SessionService
    store: SessionStore
    metrics: Metrics
    executor: ThreadPoolExecutor

    async def aclose(self) -> None:
        """Finish running batches, then release the store and the threads."""
        await asyncio.gather(*(b.close() for b in self.batchers.values()))
        await self.store.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
