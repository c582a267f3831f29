"""Keras's compile metrics as epoch accumulators (mae, mse, rmse, accuracy, ...).

Keras averages a metric per sample first (the mean over the time axis, with
a mask as weights) and then over the samples seen in the epoch; a batch that
is shorter in time (the last chunk of a stateful epoch) therefore counts per
sample, not per step. :class:`Metric` does the same. The history key is the
name the user wrote, as in Keras (``metrics=["mae"]`` logs ``mae``). Keras's
``RootMeanSquaredError`` ignores the mask of a masked sequence (it averages
padded steps too); so does ``rmse`` here, to log what Keras logs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gruserve.errors import ConfigError
from gruserve.train import losses as L

ValueFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _accuracy(y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
    y_true, y_pred = L.same_rank(y_true.to(y_pred.dtype), y_pred)
    return (y_true == y_pred).to(torch.float32)


def _binary_accuracy(y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
    y_true, y_pred = L.same_rank(y_true.to(y_pred.dtype), y_pred)
    return torch.mean((y_true == (y_pred > 0.5).to(y_pred.dtype)).to(torch.float32), dim=-1)


def _categorical_accuracy(y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
    return (torch.argmax(y_true, dim=-1) == torch.argmax(y_pred, dim=-1)).to(torch.float32)


def _sparse_categorical_accuracy(y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
    if y_true.ndim == y_pred.ndim and y_true.shape[-1] == 1:
        y_true = y_true.squeeze(-1)
    return (y_true.long() == torch.argmax(y_pred, dim=-1)).to(torch.float32)


def _loss_values(fn: L.LossFn) -> ValueFn:
    def values(y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
        y_true, y_pred = L.same_rank(y_true.to(y_pred.dtype), y_pred)
        return fn(y_true, y_pred)

    return values


# name -> (per-sample function, whether the result is the root of the mean)
_METRICS: dict[str, tuple[ValueFn, bool]] = {
    "mean_absolute_error": (_loss_values(L.mean_absolute_error), False),
    "mean_squared_error": (_loss_values(L.mean_squared_error), False),
    "root_mean_squared_error": (_loss_values(L.mean_squared_error), True),
    "mean_absolute_percentage_error": (_loss_values(L.mean_absolute_percentage_error), False),
    "mean_squared_logarithmic_error": (_loss_values(L.mean_squared_logarithmic_error), False),
    "log_cosh": (_loss_values(L.log_cosh), False),
    "binary_accuracy": (_binary_accuracy, False),
    "categorical_accuracy": (_categorical_accuracy, False),
    "sparse_categorical_accuracy": (_sparse_categorical_accuracy, False),
    "exact_accuracy": (_accuracy, False),
}
_ALIASES = {
    "mae": "mean_absolute_error",
    "mse": "mean_squared_error",
    "rmse": "root_mean_squared_error",
    "mape": "mean_absolute_percentage_error",
    "msle": "mean_squared_logarithmic_error",
}
# Keras picks the accuracy that fits the loss when the user writes "accuracy"/"acc".
_ACCURACY_FOR_TASK = {
    "binary": "binary_accuracy",
    "categorical": "categorical_accuracy",
    "sparse": "sparse_categorical_accuracy",
    "regression": "exact_accuracy",
}
# Metrics where bigger is better (for early stopping / checkpoints in mode "auto").
_UP = {"binary_accuracy", "categorical_accuracy", "sparse_categorical_accuracy", "exact_accuracy"}


def known_metrics() -> list[str]:
    public = [m for m in _METRICS if m != "exact_accuracy"]
    return sorted({*public, *_ALIASES, "accuracy"})


@dataclass
class Metric:
    """One metric accumulated over an epoch: ``update`` per batch, ``result`` at the end."""

    name: str
    fn: ValueFn
    root: bool = False
    higher_is_better: bool = False
    uses_mask: bool = True
    total: float = field(default=0.0, init=False)
    count: float = field(default=0.0, init=False)

    def reset(self) -> None:
        self.total, self.count = 0.0, 0.0

    @torch.no_grad()
    def update(
        self, y_true: torch.Tensor, y_pred: torch.Tensor, mask: torch.Tensor | None = None
    ) -> None:
        values = self.fn(y_true, y_pred).to(torch.float32)
        weights = torch.ones_like(values)
        if self.uses_mask and mask is not None and mask.shape == values.shape:
            weights = mask.to(values.dtype)
        values = values * weights
        if values.ndim > 1:
            axes = list(range(1, values.ndim))
            values, weights = values.mean(dim=axes), weights.mean(dim=axes)
        self.total += float(values.sum())
        self.count += float(weights.sum())

    def result(self) -> float:
        mean = self.total / self.count if self.count else 0.0
        return math.sqrt(mean) if self.root else mean


def get_metric(identifier: Any, task: str, where: str = "training.metrics") -> Metric:
    """A metric by Keras name (``"mae"``, ``"root_mean_squared_error"``, ``"accuracy"`` ...).

    ``task`` comes from the loss and chooses the accuracy flavour, as Keras's
    ``compile`` does for ``"accuracy"``.
    """
    if not isinstance(identifier, str) or not identifier:
        raise ConfigError(where, f"expected a metric name such as 'mae', got {identifier!r}")
    key = identifier.lower()
    if key in ("accuracy", "acc"):
        key = _ACCURACY_FOR_TASK[task]
    key = _ALIASES.get(key, key)
    if key not in _METRICS:
        raise ConfigError(
            where, f"unknown metric {identifier!r}; known: {', '.join(known_metrics())}"
        )
    fn, root = _METRICS[key]
    return Metric(identifier, fn, root, key in _UP, uses_mask=not root)


def get_metrics(identifiers: Any, task: str, where: str = "training.metrics") -> list[Metric]:
    if identifiers is None:
        return []
    if isinstance(identifiers, str):
        identifiers = [identifiers]
    if not isinstance(identifiers, list):
        raise ConfigError(where, f"expected a list of metric names, got {identifiers!r}")
    metrics = [get_metric(m, task, f"{where}[{i}]") for i, m in enumerate(identifiers)]
    names = [m.name for m in metrics]
    if len(set(names)) != len(names) or "loss" in names:
        raise ConfigError(where, f"metric names must be unique and not 'loss', got {names}")
    return metrics
