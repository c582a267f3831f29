"""Keras weight constraints, applied after every optimizer step.

Axes refer to the Keras layout: ``axis=0`` of a GRU kernel (features,
3*units) is the feature axis, whatever layout an optimizer stores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gruserve.layers._serialized import parse_serialized, to_keras
from gruserve.layers.backend import Array, Backend

EPSILON = 1e-7  # keras.backend.epsilon()
_KNOWN: dict[str, dict[str, Any]] = {
    "max_norm": {"max_value": 2.0, "axis": 0},
    "min_max_norm": {"min_value": 0.0, "max_value": 1.0, "rate": 1.0, "axis": 0},
    "non_neg": {},
    "unit_norm": {"axis": 0},
}


@dataclass(frozen=True)
class Constraint:
    name: str
    config: dict[str, Any] = field(default_factory=dict)

    def apply(self, w: Array, backend: Backend) -> Array:
        if self.name == "non_neg":
            return backend.maximum(w, 0.0)
        axis = self.config["axis"]
        norms = backend.sqrt(backend.sum(w * w, axis=axis, keepdims=True))
        if self.name == "unit_norm":
            return w / (norms + EPSILON)
        if self.name == "max_norm":
            desired = backend.clip(norms, 0.0, float(self.config["max_value"]))
        else:
            rate = float(self.config["rate"])
            clipped = backend.clip(
                norms, float(self.config["min_value"]), float(self.config["max_value"])
            )
            desired = clipped * rate + norms * (1.0 - rate)
        return w * (desired / (norms + EPSILON))

    def to_keras(self) -> dict[str, Any]:
        return to_keras(self.name, self.config)


def get_constraint(identifier: Any, *, where: str, argument: str) -> Constraint | None:
    parsed = parse_serialized(identifier, where=where, argument=argument, known=_KNOWN)
    return None if parsed is None else Constraint(*parsed)
