"""Stateless prediction: a request is already a batch, so it runs on the model directly.

Sessions go through the batcher because their steps are small and many;
a predict call carries whole sequences, so batching it with others would
only add latency. It still runs in the shared thread pool, off the event loop.

What a request may cost is decided from its shape before it runs
(:class:`~gruserve.runtime.limits.WorkLimits`), and a large batch runs as several
smaller onnxruntime runs, one thread-pool job each, so that its working memory is
bounded by the limits and other requests get the threads in between.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from gruserve.errors import InvalidInput
from gruserve.metrics import Metrics
from gruserve.runtime.limits import WorkLimits
from gruserve.runtime.model import LoadedModel
from gruserve.runtime.registry import ModelRegistry
from gruserve.runtime.validation import StateValue, check_batch, check_states


@dataclass(frozen=True)
class Prediction:
    """``outputs`` by output name, (B, T, D) or (B, D); ``states`` by state key, (B, U)."""

    model: str
    version: int
    outputs: dict[str, np.ndarray]
    states: dict[str, np.ndarray]


class Predictor:
    """Runs whole batches of sequences with optional initial states.

    Args:
        registry: the served models.
        executor: thread pool for onnxruntime.
        max_timesteps: the per-request timesteps limit.
        metrics: collectors, or None.
        limits: work per request (default :class:`WorkLimits`' defaults).
    """

    def __init__(
        self,
        registry: ModelRegistry,
        executor: Executor,
        max_timesteps: int,
        metrics: Metrics | None = None,
        limits: WorkLimits | None = None,
    ) -> None:
        self._registry, self._executor = registry, executor
        self._max_timesteps, self._metrics = max_timesteps, metrics
        self.limits = limits if limits is not None else WorkLimits()

    async def predict(
        self,
        model_name: str,
        inputs: np.ndarray,
        mask: np.ndarray | None = None,
        initial_state: StateValue | None = None,
        *,
        outputs: Collection[str] | None = None,
        states: Collection[str] | None = None,
        version: int | None = None,
    ) -> Prediction:
        """Validate and run ``inputs`` (B, T, F) or (B, T) token ids.

        Args:
            outputs: the output names the caller replies with (None: all); only these
                are kept and counted against the reply limit.
            states: the state keys the caller replies with (None: all), likewise.
            version: a loaded version of the model (None: its default version).

        Raises:
            ModelNotFound, ModelUnavailable: no such served model.
            InvalidInput, PayloadTooLarge: the arrays do not fit the model or the limits.
        """
        model = (
            self._registry.get(model_name)
            if version is None
            else self._registry.loaded(model_name, version) or self._registry.get(model_name)
        )
        sig = model.signature
        kept_outputs = _chosen(sig.output_names, outputs, "outputs")
        kept_states = _chosen(sig.state_keys, states, "states")
        x, m = check_batch(sig, inputs, mask, self._max_timesteps)
        batch = x.shape[0]
        self.admit(model_name, batch, x.shape[1], outputs=kept_outputs, states=kept_states)
        if initial_state is None:
            initial = [np.zeros((batch, u), np.float32) for u in sig.state_units]
        else:
            initial = check_states(sig, initial_state, "initial_state", batch=batch)
        out, final = await self._run(model, x, m, initial, kept_outputs, kept_states)
        if self._metrics is not None:
            self._metrics.predictions.labels(model.name).inc()
        return Prediction(model.name, model.version, out, final)

    def admit(
        self,
        model_name: str,
        batch: int,
        timesteps: int,
        *,
        outputs: Collection[str] | None = None,
        states: Collection[str] | None = None,
    ) -> None:
        """Refuse (413) a batch of this shape before it is even decoded, if it costs too much.

        A transport that knows the shape before turning the payload into arrays (a JSON
        body's list lengths) calls this first; :meth:`predict` checks again in any case.

        Raises:
            ModelNotFound, ModelUnavailable, InvalidInput (an unknown name), PayloadTooLarge.
        """
        sig = self._registry.get(model_name).signature
        kept_states = _chosen(sig.state_keys, states, "states")
        units = dict(zip(sig.state_keys, sig.state_units, strict=True))
        self.limits.check(
            sig,
            batch,
            timesteps,
            len(_chosen(sig.output_names, outputs, "outputs")),
            sum(units[k] for k in kept_states),
        )

    async def _run(
        self,
        model: LoadedModel,
        x: np.ndarray,
        m: np.ndarray | None,
        initial: list[np.ndarray],
        kept_outputs: list[str],
        kept_states: list[str],
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Run the batch chunk by chunk, copying the kept arrays into place as they come."""
        sig, loop = model.signature, asyncio.get_running_loop()
        out: dict[str, np.ndarray] = {}
        final: dict[str, np.ndarray] = {}
        for part in self.limits.chunks(x.shape[0], x.shape[1]):
            result = await loop.run_in_executor(
                self._executor,
                model.run,
                x[part],
                None if m is None else m[part],
                [s[part] for s in initial],
            )
            named = dict(zip(sig.output_names, result.outputs, strict=True))
            for name in kept_outputs:
                _place(out, name, named[name], part, x.shape[0])
            named = dict(zip(sig.state_keys, result.states, strict=True))
            for key in kept_states:
                _place(final, key, named[key], part, x.shape[0])
        return out, final


def _chosen(names: list[str], wanted: Collection[str] | None, field: str) -> list[str]:
    if wanted is None:
        return list(names)
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise InvalidInput(field, f"unknown name {unknown[0]!r}; expected some of {names}")
    return [n for n in names if n in wanted]


def _place(
    into: dict[str, np.ndarray], name: str, part: np.ndarray, where: slice, batch: int
) -> None:
    """Copy one chunk's array into the whole batch's (allocated from the first chunk)."""
    whole = into.get(name)
    if whole is None:
        if where.start == 0 and where.stop == batch:
            into[name] = part
            return
        whole = into[name] = np.empty((batch, *part.shape[1:]), part.dtype)
    whole[where] = part
