"""Keras weight and activity regularizers (l1, l2, l1_l2).

Each penalty is computed on the whole Keras-shaped variable and added to the
loss unscaled; activity penalties are divided by the batch size by the caller,
as Keras's ``Layer`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gruserve.layers._serialized import parse_serialized, to_keras
from gruserve.layers.backend import Array, Backend

_KNOWN: dict[str, dict[str, Any]] = {
    "l1": {"l1": 0.01},
    "l2": {"l2": 0.01},
    "l1_l2": {"l1": 0.0, "l2": 0.0},
}


@dataclass(frozen=True)
class Regularizer:
    name: str
    config: dict[str, Any] = field(default_factory=dict)

    def penalty(self, w: Array, backend: Backend) -> Array | float:
        """The loss term for ``w``; 0.0 when every factor is zero."""
        l1 = float(self.config.get("l1", 0.0))
        l2 = float(self.config.get("l2", 0.0))
        total: Array | float = 0.0
        if l1:
            total = total + backend.sum(backend.abs(w), axis=None, keepdims=False) * l1
        if l2:
            total = total + backend.sum(w * w, axis=None, keepdims=False) * l2
        return total

    def to_keras(self) -> dict[str, Any]:
        return to_keras(self.name, self.config)


def get_regularizer(identifier: Any, *, where: str, argument: str) -> Regularizer | None:
    parsed = parse_serialized(identifier, where=where, argument=argument, known=_KNOWN)
    return None if parsed is None else Regularizer(*parsed)
