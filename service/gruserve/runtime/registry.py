"""Every model the server runs, several versions of each, loaded beside serving.

Each model has a set of loaded versions and one *default* version (what new sessions
and unversioned requests get). A per-model :class:`~gruserve.runtime.policy.VersionPolicy`
says which versions on disk are loaded ahead of need; a session keeps the version it
was created on, and a step for a version on disk that is not loaded loads it
(:meth:`ModelRegistry.ensure`, in a thread of its own, never on the event loop).

Load before switch: a version becomes the default only once it is loaded, its sha256
checked (by :class:`~gruserve.repository.ModelRepository`) and one warm-up batch run.
A version that fails is recorded with its reason (the repository index, the log, a
metric) and never becomes the default; the previous default keeps serving. A model
whose every version failed is recorded as failed, visible in ``/readyz`` and
``/v1/models``, and the others keep serving.

Loads run one at a time in the registry's own thread, so a large model loading never
takes an inference thread; swapping the tables is a few dict assignments under a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gruserve.errors import (
    GruServeError,
    InvalidInput,
    ModelNotFound,
    ModelUnavailable,
    ModelVersionGone,
    RepositoryError,
)
from gruserve.repository import ModelRepository, versions
from gruserve.runtime._background import lower_this_thread
from gruserve.runtime.model import LoadedModel
from gruserve.runtime.policy import VersionPolicy

log = logging.getLogger(__name__)

VersionState = Literal["READY", "LOADING", "UNAVAILABLE"]


@dataclass(frozen=True)
class ModelStatus:
    """One model folder's outcome: loaded (``error`` None) or failed."""

    name: str
    version: int | None
    provider: str | None
    error: str | None

    @property
    def ready(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class IndexEntry:
    """One model version as the repository index lists it (Triton's words)."""

    name: str
    version: int
    state: VersionState
    reason: str
    default: bool = False


@dataclass
class _Versions:
    """What the registry knows of one model."""

    loaded: dict[int, LoadedModel] = field(default_factory=dict)
    default: int | None = None
    failed: dict[int, str] = field(default_factory=dict)
    loading: set[int] = field(default_factory=set)
    last_used: dict[int, float] = field(default_factory=dict)
    unloaded: str | None = None  # why the whole model was unloaded on request
    removed: set[int] = field(default_factory=set)  # known versions gone from disk


def _load(
    repository: ModelRepository, name: str, version: int, providers: Sequence[str], threads: int
) -> LoadedModel:
    """Read, verify (sha256), load and warm one version: what must pass before it serves."""
    model = LoadedModel(repository.resolve(name, version), providers, threads)
    model.warm_up()
    return model


class ModelRegistry:
    """Name -> loaded versions and the default one, plus the failures.

    Args:
        models: models already loaded (each becomes its name's default).
        failures: name -> reason for the folders that did not load.
        repository: where versions are found and re-read (None: no loading at run time).
        providers, intra_op_threads: how versions are loaded.
        pinned: name -> the version that is always the default (``model_versions``).
        policies: name -> which versions stay loaded (others: ``latest: 1``).
        grace_s: how long an idle version no policy keeps stays loaded.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        models: Sequence[LoadedModel] = (),
        failures: Mapping[str, str] | None = None,
        *,
        repository: ModelRepository | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_threads: int = 1,
        pinned: Mapping[str, int] | None = None,
        policies: Mapping[str, VersionPolicy] | None = None,
        grace_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._models: dict[str, _Versions] = {}
        for m in models:
            entry = self._models.setdefault(m.name, _Versions())
            entry.loaded[m.version] = m
            entry.default = m.version
        self._failures = dict(failures or {})
        self.repository = repository
        self._providers, self._threads = list(providers), intra_op_threads
        self._pinned = dict(pinned or {})
        self._policies = dict(policies or {})
        self.grace_s, self._clock = grace_s, clock
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(
            1,
            thread_name_prefix="gruserve-load",
            # loads yield the CPU to serving; not with a pool its threads would inherit it from
            initializer=lower_this_thread if intra_op_threads == 1 else None,
        )
        self._pending: dict[tuple[str, int], asyncio.Future[LoadedModel]] = {}
        self.on_failure: Callable[[str, int, str], None] | None = None
        """Called (name, version, reason) when a version fails to load (metrics hook)."""

    @classmethod
    def load(
        cls,
        root: Path,
        providers: Sequence[str],
        intra_op_threads: int = 1,
        pinned: Mapping[str, int] | None = None,
        policies: Mapping[str, VersionPolicy] | None = None,
        grace_s: float = 300.0,
    ) -> ModelRegistry:
        """Load every model under ``root`` per its policy; never raises for one bad model."""
        registry = cls(
            repository=ModelRepository(root),
            providers=providers,
            intra_op_threads=intra_op_threads,
            pinned=pinned,
            policies=policies,
            grace_s=grace_s,
        )
        names = registry.repository.names() if registry.repository else []
        for name in sorted(set(registry._pinned) - set(names)):
            registry._failures[name] = (
                f"pinned to version {registry._pinned[name]} but not found in {root}"
            )
        for name in names:
            registry.refresh(name)
        return registry

    # -- lookups (event loop; never block) ---------------------------------------------------
    def get(self, name: str) -> LoadedModel:
        """The default version of the served model called ``name``.

        Raises:
            ModelUnavailable: it exists but failed to load (or was unloaded on request).
            ModelNotFound: no such model.
        """
        entry = self._models.get(name)
        if entry is not None and entry.default is not None and entry.unloaded is None:
            model = entry.loaded.get(entry.default)
            if model is not None:
                return model
        if entry is not None and entry.unloaded is not None:
            raise ModelUnavailable(name, entry.unloaded)
        if name in self._failures:
            raise ModelUnavailable(name, self._failures[name])
        raise ModelNotFound(name, available=self._served())

    def loaded(self, name: str, version: int, use: bool = True) -> LoadedModel | None:
        """``name`` at ``version`` if it is loaded now, else None; ``use``: it is about to
        serve a request (which keeps it from being unloaded as idle)."""
        entry = self._models.get(name)
        if entry is None or entry.unloaded is not None:
            return None
        model = entry.loaded.get(version)
        if model is not None and use:
            entry.last_used[version] = self._clock()
        return model

    async def ensure(
        self, name: str, version: int, session_id: str | None = None, field: str | None = None
    ) -> LoadedModel:
        """``name`` at ``version``, loaded first (in the loader thread) if it is on disk only.

        Args:
            session_id: the session that needs it, for the message when it is gone.
            field: the request field that named the version: an unknown version is then a
                client error naming it (InvalidInput) rather than a vanished one.

        Raises:
            ModelNotFound, ModelUnavailable: as :meth:`get`.
            InvalidInput: ``field`` given and no such version ever existed here.
            ModelVersionGone: the version is no longer on disk.
            ModelUnavailable: it is on disk but failed to load.
        """
        model = self.loaded(name, version)
        if model is not None:
            return model
        self.get(name)  # unknown or unloaded models fail the same way as everywhere
        on_disk = self._on_disk(name)
        if version not in on_disk:
            if field is not None:
                raise InvalidInput(
                    field,
                    f"model {name!r} has no version {version}; versions: {on_disk}",
                )
            raise ModelVersionGone(session_id, name, version, on_disk)
        entry = self._models[name]
        if version in entry.failed:  # tried again only by an explicit load (refresh)
            raise ModelUnavailable(name, f"version {version}: {entry.failed[version]}")
        key = (name, version)
        pending = self._pending.get(key)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = asyncio.ensure_future(
                loop.run_in_executor(self._loader, self._load_one, name, version)
            )
            self._pending[key] = pending
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
        return await asyncio.shield(pending)

    def versions_loaded(self, name: str) -> list[int]:
        entry = self._models.get(name)
        return sorted(entry.loaded) if entry else []

    def default_version(self, name: str) -> int | None:
        entry = self._models.get(name)
        return entry.default if entry else None

    def models(self) -> list[LoadedModel]:
        """Every loaded version of every model, by name then version."""
        return [
            e.loaded[v]
            for n, e in sorted(self._models.items())
            if e.unloaded is None
            for v in sorted(e.loaded)
        ]

    def statuses(self) -> list[ModelStatus]:
        """One line per model: its default version, or why it has none."""
        found: list[ModelStatus] = []
        for name in sorted(set(self._models) | set(self._failures)):
            try:
                model = self.get(name)
            except ModelUnavailable as exc:
                found.append(ModelStatus(name, None, None, exc.reason))
                continue
            except ModelNotFound:
                continue
            found.append(ModelStatus(name, model.version, model.provider, None))
        return found

    def index(self) -> list[IndexEntry]:
        """Every version on disk or loaded, with its state and the reason when not READY."""
        names: set[str] = set(self._models) | set(self._failures)
        if self.repository is not None:
            with contextlib.suppress(RepositoryError):
                names |= set(self.repository.names())
        found: list[IndexEntry] = []
        for name in sorted(names):
            entry = self._models.get(name, _Versions())
            on_disk = self._on_disk(name)
            known = set(on_disk) | set(entry.loaded) | set(entry.failed) | entry.removed
            for version in sorted(known):
                found.append(self._entry(name, version, entry, version in on_disk))
        return found

    def _entry(self, name: str, version: int, entry: _Versions, on_disk: bool) -> IndexEntry:
        is_default = version == entry.default and entry.unloaded is None
        if entry.unloaded is not None:
            return IndexEntry(name, version, "UNAVAILABLE", entry.unloaded)
        if version in entry.loading:
            return IndexEntry(name, version, "LOADING", "")
        if version in entry.loaded:
            return IndexEntry(name, version, "READY", "", is_default)
        if version in entry.failed:
            return IndexEntry(name, version, "UNAVAILABLE", entry.failed[version])
        if not on_disk:
            return IndexEntry(name, version, "UNAVAILABLE", "removed from the repository")
        return IndexEntry(name, version, "UNAVAILABLE", "not loaded (loads on first use)")

    def _served(self) -> list[str]:
        return [n for n, e in self._models.items() if e.default is not None]

    def _on_disk(self, name: str) -> list[int]:
        if self.repository is None:
            entry = self._models.get(name)
            return sorted(entry.loaded) if entry else []
        return versions(self.repository.root / name)

    # -- changes (blocking: the loader thread, or start-up) ----------------------------------
    def policy(self, name: str) -> VersionPolicy:
        pinned = self._pinned.get(name)
        if pinned is not None and name not in self._policies:
            return VersionPolicy(None, (pinned,))
        return self._policies.get(name, VersionPolicy())

    def refresh(self, name: str, retry_failed: bool = True) -> list[IndexEntry]:
        """Rescan ``name`` on disk and apply its policy: load the versions it keeps (newest
        first), then make the newest loaded one the default (or the pinned one), and drop
        versions removed from disk. Blocking; returns the model's index entries.

        Args:
            retry_failed: load again versions that failed before (an explicit load
                request); polling passes False so a broken version is not retried forever.
        """
        if self.repository is None:
            return [e for e in self.index() if e.name == name]
        on_disk = self._on_disk(name)
        with self._lock:
            entry = self._models.setdefault(name, _Versions())
            entry.unloaded = None
            entry.removed -= set(on_disk)
            for gone in [v for v in entry.loaded if v not in on_disk]:
                del entry.loaded[gone]
                entry.removed.add(gone)
                log.info("model %s v%d removed from the repository: unloaded", name, gone)
            for gone in [v for v in entry.failed if v not in on_disk]:
                del entry.failed[gone]
                entry.removed.add(gone)
        kept = self.policy(name).kept(on_disk)
        for version in reversed(kept):
            if version in entry.loaded or (version in entry.failed and not retry_failed):
                continue
            with contextlib.suppress(GruServeError):  # recorded; the old default keeps serving
                self._load_one(name, version)
        with self._lock:
            pinned = self._pinned.get(name)
            ready = [v for v in kept if v in entry.loaded]
            if pinned is not None:
                entry.default = pinned if pinned in entry.loaded else None
            elif ready:
                entry.default = ready[-1]
            elif entry.default not in entry.loaded:
                entry.default = max(entry.loaded) if entry.loaded else None
            if entry.default is not None:
                self._failures.pop(name, None)
                log.info("model %s: default version %d", name, entry.default)
            else:
                reasons = [f"v{v}: {entry.failed[v]}" for v in sorted(entry.failed)]
                if pinned is not None and pinned not in on_disk:
                    reasons = [f"pinned to version {pinned}, which is not in the repository"]
                self._failures[name] = "; ".join(reasons) or "no version loaded"
        return [e for e in self.index() if e.name == name]

    def _load_one(self, name: str, version: int) -> LoadedModel:
        """Load, verify and warm one version, then publish it (blocking).

        Raises:
            ModelUnavailable: it failed; the reason is recorded for the index.
        """
        with self._lock:
            entry = self._models.setdefault(name, _Versions())
            if version in entry.loaded:
                return entry.loaded[version]
            entry.loading.add(version)
        try:
            if self.repository is None:
                raise RepositoryError("this registry has no repository to load versions from")
            model = _load(self.repository, name, version, self._providers, self._threads)
        except Exception as exc:  # onnxruntime raises its own types for unreadable graphs
            reason = str(exc) if isinstance(exc, GruServeError) else f"{type(exc).__name__}: {exc}"
            log.error("model %s v%d not loaded: %s", name, version, reason)
            with self._lock:
                entry.loading.discard(version)
                entry.failed[version] = reason
            if self.on_failure is not None:
                self.on_failure(name, version, reason)
            raise ModelUnavailable(name, f"version {version}: {reason}") from None
        with self._lock:
            entry.loading.discard(version)
            entry.failed.pop(version, None)
            entry.loaded[version] = model
            entry.last_used[version] = self._clock()
            if entry.default is None and name not in self._pinned:
                entry.default = version
                self._failures.pop(name, None)
        log.info("model %s v%d loaded on %s", name, version, model.provider)
        return model

    def load_now(self, name: str, version: int) -> LoadedModel:
        """``name`` at ``version``, loaded here if it is on disk (blocking: start-up only).

        Raises:
            ModelNotFound, ModelUnavailable, ModelVersionGone.
        """
        model = self.loaded(name, version)
        if model is not None:
            return model
        self.get(name)
        on_disk = self._on_disk(name)
        if version not in on_disk:
            raise ModelVersionGone(None, name, version, on_disk)
        return self._load_one(name, version)

    def unload(self, name: str) -> None:
        """Unload every version of ``name`` (the repository API's unload): its requests
        answer 503 until it is loaded again. Sessions stay in the store."""
        if name not in self._models:
            raise ModelNotFound(name, available=self._served())
        with self._lock:
            entry = self._models[name]
            entry.loaded.clear()
            entry.unloaded = "unloaded through the repository API; load it to serve again"
        log.info("model %s unloaded on request", name)

    def sweep(self) -> list[tuple[str, int]]:
        """Unload the versions no policy keeps, that are not a default, and that no step
        has used for ``grace_s``; returns them."""
        now = self._clock()
        dropped: list[tuple[str, int]] = []
        with self._lock:
            for name, entry in self._models.items():
                kept = set(self.policy(name).kept(self._on_disk(name)))
                for version in list(entry.loaded):
                    idle = now - entry.last_used.get(version, now)
                    if version == entry.default or version in kept or idle < self.grace_s:
                        continue
                    del entry.loaded[version]
                    dropped.append((name, version))
                    log.info("model %s v%d unloaded after %.0f s idle", name, version, idle)
        return dropped

    async def refresh_async(self, name: str, retry_failed: bool = True) -> list[IndexEntry]:
        """:meth:`refresh` in the loader thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._loader, self.refresh, name, retry_failed)

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
