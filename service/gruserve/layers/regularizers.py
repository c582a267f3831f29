"""Keras weight and activity regularizers (l1, l2, l1_l2).

Each penalty is computed on the whole Keras-shaped variable and added to the
loss unscaled; activity penalties are divided by the batch size by the caller,
as Keras's ``Layer`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gruserve.errors import InvalidArgument
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


# Keras 3 resolves a string through its class names and their snake_case forms (L1L2 ->
# "l1l2"); tf-keras also knew the function name "l1_l2".
_KERAS3_NAMES = {"l1": "l1", "L1": "l1", "l2": "l2", "L2": "l2", "l1l2": "l1_l2", "L1L2": "l1_l2"}
_KERAS3_UNSUPPORTED = {"orthogonal_regularizer", "OrthogonalRegularizer"}


def get_regularizer(
    identifier: Any, *, where: str, argument: str, keras_version: int = 3
) -> Regularizer | None:
    """A regularizer from a name or a serialized dict, resolving names as that Keras does.

    Raises:
        InvalidArgument: a name that Keras refuses (Keras 3 refuses ``"l1_l2"``),
            or one that gruserve cannot compute (``orthogonal_regularizer``).
    """
    if isinstance(identifier, str) and keras_version == 3:
        if identifier in _KERAS3_UNSUPPORTED:
            raise InvalidArgument(
                where, argument, identifier, "a regularizer gruserve computes (l1, l2, l1l2)"
            )
        if identifier not in _KERAS3_NAMES:
            raise InvalidArgument(where, argument, identifier, sorted(_KERAS3_NAMES))
        identifier = _KERAS3_NAMES[identifier]
    parsed = parse_serialized(identifier, where=where, argument=argument, known=_KNOWN)
    return None if parsed is None else Regularizer(*parsed)
