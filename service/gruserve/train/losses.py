"""Keras's losses: the same names, defaults, epsilon clipping and reduction.

A loss is a per-element function reduced over the last axis (Keras's
``mean_squared_error(y_true, y_pred)`` returns (batch,) or (batch, time)),
then reduced to a scalar with ``"sum_over_batch_size"``: the sum divided by
the number of values. A Keras mask on the predictions (a masked sequence)
weights valid steps by ``total / valid`` and masked ones by 0, so the loss is
the mean over valid steps, exactly as ``keras.losses.Loss.__call__`` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from gruserve.errors import ConfigError

EPSILON = 1e-7  # keras.backend.epsilon()
LossFn = Callable[..., torch.Tensor]


def same_rank(y_true: torch.Tensor, y_pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keras's ``squeeze_or_expand_to_same_rank``: fix a trailing axis of 1 on one side."""
    if y_true.ndim == y_pred.ndim + 1 and y_true.shape[-1] == 1:
        if y_pred.ndim == 1:
            return y_true, y_pred.unsqueeze(-1)
        return y_true.squeeze(-1), y_pred
    if y_pred.ndim == y_true.ndim + 1 and y_pred.shape[-1] == 1:
        if y_true.ndim == 1:
            return y_true.unsqueeze(-1), y_pred
        return y_true, y_pred.squeeze(-1)
    return y_true, y_pred


def mean_squared_error(y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
    return torch.mean(torch.square(y_true - y_pred), dim=-1)


def mean_absolute_error(y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
    return torch.mean(torch.abs(y_true - y_pred), dim=-1)


def mean_absolute_percentage_error(y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
    diff = torch.abs((y_true - y_pred) / torch.clamp(torch.abs(y_true), min=EPSILON))
    return 100.0 * torch.mean(diff, dim=-1)


def mean_squared_logarithmic_error(y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
    first = torch.log(torch.clamp(y_pred, min=EPSILON) + 1.0)
    second = torch.log(torch.clamp(y_true, min=EPSILON) + 1.0)
    return torch.mean(torch.square(first - second), dim=-1)


def huber(y_true: torch.Tensor, y_pred: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    error = y_pred - y_true
    absolute = torch.abs(error)
    quadratic = 0.5 * torch.square(error)
    linear = delta * absolute - 0.5 * delta * delta
    return torch.mean(torch.where(absolute <= delta, quadratic, linear), dim=-1)


def log_cosh(y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
    x = y_pred - y_true
    return torch.mean(x + F.softplus(x * -2.0) - math.log(2.0), dim=-1)


def binary_crossentropy(
    y_true: torch.Tensor,
    y_pred: torch.Tensor,
    from_logits: bool = False,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    y_true = y_true.to(y_pred.dtype)
    if label_smoothing:
        y_true = y_true * (1.0 - label_smoothing) + 0.5 * label_smoothing
    if from_logits:
        values = F.binary_cross_entropy_with_logits(y_pred, y_true, reduction="none")
    else:
        clipped = torch.clamp(y_pred, EPSILON, 1.0 - EPSILON)
        values = F.binary_cross_entropy(clipped, y_true, reduction="none")
    return torch.mean(values, dim=-1)


def categorical_crossentropy(
    y_true: torch.Tensor,
    y_pred: torch.Tensor,
    from_logits: bool = False,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    y_true = y_true.to(y_pred.dtype)
    if label_smoothing:
        y_true = y_true * (1.0 - label_smoothing) + label_smoothing / y_true.shape[-1]
    if from_logits:
        log_prob = F.log_softmax(y_pred, dim=-1)
    else:
        probs = y_pred / torch.sum(y_pred, dim=-1, keepdim=True)
        log_prob = torch.log(torch.clamp(probs, EPSILON, 1.0 - EPSILON))
    return -torch.sum(y_true * log_prob, dim=-1)


def sparse_categorical_crossentropy(
    y_true: torch.Tensor, y_pred: torch.Tensor, from_logits: bool = False
) -> torch.Tensor:
    if y_true.ndim == y_pred.ndim and y_true.shape[-1] == 1:
        y_true = y_true.squeeze(-1)
    labels = y_true.long()
    if from_logits:
        log_prob = F.log_softmax(y_pred, dim=-1)
    else:
        probs = y_pred / torch.sum(y_pred, dim=-1, keepdim=True)
        log_prob = torch.log(torch.clamp(probs, EPSILON, 1.0 - EPSILON))
    return -torch.gather(log_prob, -1, labels.unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class LossKind:
    """A Keras loss: function, its keyword arguments and the task it implies."""

    fn: LossFn
    task: str  # "regression", "binary", "categorical" or "sparse"
    options: dict[str, Any] = field(default_factory=dict)


# Keras's names (function names, aliases and class names, lowercased) -> (function, task).
_FUNCTIONS: dict[str, tuple[LossFn, str]] = {
    "mean_squared_error": (mean_squared_error, "regression"),
    "mean_absolute_error": (mean_absolute_error, "regression"),
    "mean_absolute_percentage_error": (mean_absolute_percentage_error, "regression"),
    "mean_squared_logarithmic_error": (mean_squared_logarithmic_error, "regression"),
    "huber": (huber, "regression"),
    "log_cosh": (log_cosh, "regression"),
    "binary_crossentropy": (binary_crossentropy, "binary"),
    "categorical_crossentropy": (categorical_crossentropy, "categorical"),
    "sparse_categorical_crossentropy": (sparse_categorical_crossentropy, "sparse"),
}
_ALIASES = {
    "mse": "mean_squared_error",
    "mae": "mean_absolute_error",
    "mape": "mean_absolute_percentage_error",
    "msle": "mean_squared_logarithmic_error",
    "bce": "binary_crossentropy",
    "meansquarederror": "mean_squared_error",
    "meanabsoluteerror": "mean_absolute_error",
    "meanabsolutepercentageerror": "mean_absolute_percentage_error",
    "meansquaredlogarithmicerror": "mean_squared_logarithmic_error",
    "logcosh": "log_cosh",
    "binarycrossentropy": "binary_crossentropy",
    "categoricalcrossentropy": "categorical_crossentropy",
    "sparsecategoricalcrossentropy": "sparse_categorical_crossentropy",
}
_OPTIONS: dict[str, dict[str, Any]] = {
    "huber": {"delta": 1.0},
    "binary_crossentropy": {"from_logits": False, "label_smoothing": 0.0},
    "categorical_crossentropy": {"from_logits": False, "label_smoothing": 0.0},
    "sparse_categorical_crossentropy": {"from_logits": False},
}
REDUCTIONS = ("sum_over_batch_size", "mean", "sum")


def canonical_name(name: str) -> str | None:
    key = name.lower()
    key = _ALIASES.get(key, key)
    return key if key in _FUNCTIONS else None


def known_losses() -> list[str]:
    """Canonical names and Keras's short aliases (class names are accepted too)."""
    return sorted({*_FUNCTIONS, "mse", "mae", "mape", "msle", "bce"})


@dataclass(frozen=True)
class Loss:
    """A configured Keras loss, called as ``loss(y_true, y_pred, mask)`` -> scalar."""

    name: str
    kind: LossKind
    reduction: str = "sum_over_batch_size"

    @property
    def task(self) -> str:
        return self.kind.task

    def values(self, y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
        """Per-sample (or per-step) values, before reduction."""
        if self.kind.task != "sparse":
            y_true, y_pred = same_rank(y_true.to(y_pred.dtype), y_pred)
        return self.kind.fn(y_true, y_pred, **self.kind.options)

    def __call__(
        self, y_true: torch.Tensor, y_pred: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        values = self.values(y_true, y_pred)
        if mask is not None and mask.shape == values.shape:
            weights = mask.to(values.dtype)
            if self.reduction != "sum":
                valid = torch.sum(weights)
                scale = values.numel() / valid if valid > 0 else torch.zeros(())
                weights = weights * scale
            values = values * weights
        total = torch.sum(values)
        if self.reduction == "sum":
            return total
        return total / max(values.numel(), 1)

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, "reduction": self.reduction, **self.kind.options}


def get_loss(identifier: Any, where: str = "training.loss") -> Loss:
    """``"mse"`` or Keras's ``{"class_name": "Huber", "config": {"delta": 2.0}}``.

    Raises:
        ConfigError: unknown loss name or argument, naming ``where``.
    """
    if isinstance(identifier, str):
        name, config = identifier, {}
    elif isinstance(identifier, dict) and "class_name" in identifier:
        name, config = str(identifier["class_name"]), dict(identifier.get("config") or {})
    else:
        raise ConfigError(where, f"expected a loss name such as 'mse', got {identifier!r}")
    canonical = canonical_name(name)
    if canonical is None:
        raise ConfigError(where, f"unknown loss {name!r}; known: {', '.join(known_losses())}")
    fn, task = _FUNCTIONS[canonical]
    options = dict(_OPTIONS.get(canonical, {}))
    reduction = config.pop("reduction", "sum_over_batch_size")
    config.pop("name", None)
    config.pop("dtype", None)
    if config.get("axis", -1) != -1:
        raise ConfigError(
            f"{where}.axis", f"only the last axis (-1) is supported, got {config['axis']!r}"
        )
    config.pop("axis", None)
    for key, value in config.items():
        if key not in options:
            raise ConfigError(
                where,
                f"unknown argument {key!r} for loss {name!r}; "
                f"known: {', '.join(options) or 'none'}",
            )
        if isinstance(options[key], bool) != isinstance(value, bool):
            raise ConfigError(
                f"{where}.{key}", f"expected {type(options[key]).__name__}, got {value!r}"
            )
        options[key] = value
    if reduction not in REDUCTIONS:
        raise ConfigError(
            f"{where}.reduction", f"unknown value {reduction!r}; known: {', '.join(REDUCTIONS)}"
        )
    return Loss(
        name if isinstance(identifier, str) else canonical, LossKind(fn, task, options), reduction
    )
