"""Stateless prediction: a request is already a batch, so it runs on the model directly.

Sessions go through the batcher because their steps are small and many;
a predict call carries whole sequences, so batching it with others would
only add latency. It still runs in the shared thread pool, off the event loop.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from gruserve.metrics import Metrics
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
    """

    def __init__(
        self,
        registry: ModelRegistry,
        executor: Executor,
        max_timesteps: int,
        metrics: Metrics | None = None,
    ) -> None:
        self._registry, self._executor = registry, executor
        self._max_timesteps, self._metrics = max_timesteps, metrics

    async def predict(
        self,
        model_name: str,
        inputs: np.ndarray,
        mask: np.ndarray | None = None,
        initial_state: StateValue | None = None,
    ) -> Prediction:
        """Validate and run ``inputs`` (B, T, F) or (B, T) token ids.

        Raises:
            ModelNotFound, ModelUnavailable: no such served model.
            InvalidInput, PayloadTooLarge: the arrays do not fit the model or the limits.
        """
        model = self._registry.get(model_name)
        sig = model.signature
        x, m = check_batch(sig, inputs, mask, self._max_timesteps)
        batch = x.shape[0]
        if initial_state is None:
            states = [np.zeros((batch, u), np.float32) for u in sig.state_units]
        else:
            states = check_states(sig, initial_state, "initial_state", batch=batch)
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._executor, model.run, x, m, states)
        if self._metrics is not None:
            self._metrics.predictions.labels(model.name).inc()
        return Prediction(
            model.name,
            model.version,
            dict(zip(sig.output_names, result.outputs, strict=True)),
            dict(zip(sig.state_keys, result.states, strict=True)),
        )
