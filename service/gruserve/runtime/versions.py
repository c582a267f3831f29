"""Serving several versions of a model: one batcher per loaded (model, version), and the
background task that follows the repository and unloads idle versions.

Steps of two versions never share a batch (their weights, even their state sizes,
differ), so each loaded version gets its own :class:`~gruserve.runtime.batcher.Batcher`,
made on first use. A batcher whose version was unloaded is dropped once it is idle.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import suppress

from gruserve.errors import RepositoryError
from gruserve.runtime.batcher import Batcher
from gruserve.runtime.model import LoadedModel
from gruserve.runtime.registry import ModelRegistry

log = logging.getLogger(__name__)


class Batchers(Mapping[str, Batcher]):
    """(model, version) -> its batcher, made by ``make`` on first use.

    As a mapping it is name -> the batcher of that name's default version (what v2's
    model configuration describes).
    """

    def __init__(self, registry: ModelRegistry, make: Callable[[LoadedModel], Batcher]) -> None:
        self._registry, self._make = registry, make
        self._by_key: dict[tuple[str, int], Batcher] = {}
        self.made: list[Callable[[Batcher], None]] = []
        """Called with each new batcher (tracing instruments it)."""

    def of(self, model: LoadedModel) -> Batcher:
        """The batcher running ``model`` (this very loaded object: a version loaded again
        after an unload gets a new batcher)."""
        key = (model.name, model.version)
        batcher = self._by_key.get(key)
        if batcher is None or batcher.model is not model:
            batcher = self._make(model)
            for hook in self.made:
                hook(batcher)
            self._by_key[key] = batcher
        return batcher

    def __getitem__(self, name: str) -> Batcher:
        return self.of(self._registry.get(name))

    def __iter__(self) -> Iterator[str]:
        return iter(sorted({name for name, _ in self._by_key}))

    def __len__(self) -> int:
        return len({name for name, _ in self._by_key})

    def all(self) -> list[Batcher]:
        return list(self._by_key.values())

    def values(self) -> list[Batcher]:  # type: ignore[override]
        """Every batcher made (every version), for closing and instrumenting."""
        return self.all()

    def prune(self) -> None:
        """Drop the idle batchers of versions no longer loaded."""
        for key, batcher in list(self._by_key.items()):
            if self._registry.loaded(*key, use=False) is not batcher.model and batcher.idle:
                del self._by_key[key]


class RepositoryWatcher:
    """Every ``tick_s``: rescan the repository when ``poll_s`` has passed (``poll_s`` 0:
    never), unload idle versions past their grace period, drop their batchers.

    Args:
        registry, batchers: what it updates.
        poll_s: seconds between rescans (0: only through the repository API).
    """

    def __init__(
        self,
        registry: ModelRegistry,
        batchers: Batchers,
        poll_s: float,
    ) -> None:
        self._registry, self._batchers = registry, batchers
        self.poll_s = poll_s
        grace = registry.grace_s
        candidates = [s for s in (poll_s, grace / 4) if s > 0]
        self.tick_s = max(0.05, min(candidates)) if candidates else 1.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task

    async def rescan(self) -> None:
        """Apply every model's policy to what is on disk now (in the loader thread)."""
        repository = self._registry.repository
        if repository is None:
            return
        try:
            names = await asyncio.to_thread(repository.names)
        except RepositoryError as exc:
            log.error("repository poll: %s", exc)
            return
        for name in names:
            await self._registry.refresh_async(name, retry_failed=False)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_scan = loop.time()
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                if self.poll_s > 0 and loop.time() - last_scan >= self.poll_s:
                    last_scan = loop.time()
                    await self.rescan()
                self._registry.sweep()
                self._batchers.prune()
            except Exception:  # one bad pass must not end the watching
                log.exception("repository watcher pass failed")
