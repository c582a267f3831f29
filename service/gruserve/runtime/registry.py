"""Every model the server runs, loaded once at start-up.

Each model folder is loaded independently: the latest version unless the
``model_versions`` setting pins one. A model that fails (bad manifest, hash
mismatch, onnxruntime cannot create the session) is logged and recorded as
failed with its reason, visible in ``/readyz`` and ``/v1/models``, and the
others keep serving.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gruserve.errors import GruServeError, ModelNotFound, ModelUnavailable
from gruserve.repository import ModelRepository
from gruserve.runtime.model import LoadedModel

log = logging.getLogger(__name__)


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


class ModelRegistry:
    """Name -> :class:`LoadedModel`, plus the failures.

    Args:
        models: the loaded models.
        failures: name -> reason for the folders that did not load.
    """

    def __init__(
        self, models: Sequence[LoadedModel], failures: Mapping[str, str] | None = None
    ) -> None:
        self._models = {m.name: m for m in models}
        self._failures = dict(failures or {})

    @classmethod
    def load(
        cls,
        root: Path,
        providers: Sequence[str],
        intra_op_threads: int = 1,
        pinned: Mapping[str, int] | None = None,
    ) -> ModelRegistry:
        """Load every model under ``root``; never raises for one bad model."""
        repository = ModelRepository(root)
        pinned = dict(pinned or {})
        models: list[LoadedModel] = []
        failures: dict[str, str] = {}
        names = repository.names()
        for name in sorted(set(pinned) - set(names)):
            failures[name] = f"pinned to version {pinned[name]} but not found in {root}"
        for name in names:
            try:
                model = LoadedModel(
                    repository.resolve(name, pinned.get(name)), providers, intra_op_threads
                )
                model.warm_up()
            except GruServeError as exc:
                failures[name] = str(exc)
                log.error("model %s not loaded: %s", name, exc)
                continue
            except Exception as exc:  # onnxruntime raises its own types for unreadable graphs
                failures[name] = f"{type(exc).__name__}: {exc}"
                log.exception("model %s not loaded", name)
                continue
            models.append(model)
            log.info("model %s v%d loaded on %s", model.name, model.version, model.provider)
        return cls(models, failures)

    def get(self, name: str) -> LoadedModel:
        """The served model called ``name``.

        Raises:
            ModelUnavailable: it exists but failed to load.
            ModelNotFound: no such model.
        """
        model = self._models.get(name)
        if model is not None:
            return model
        if name in self._failures:
            raise ModelUnavailable(name, self._failures[name])
        raise ModelNotFound(name, available=self._models)

    def models(self) -> list[LoadedModel]:
        return [self._models[n] for n in sorted(self._models)]

    def statuses(self) -> list[ModelStatus]:
        loaded = [ModelStatus(m.name, m.version, m.provider, None) for m in self._models.values()]
        failed = [ModelStatus(n, None, None, reason) for n, reason in self._failures.items()]
        return sorted(loaded + failed, key=lambda s: s.name)
