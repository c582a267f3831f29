"""What every layer spec shares: argument reading and the spec base class.

A spec is the validated form of one Keras layer config. Specs are immutable,
built by ``from_config`` (exactly the dict Keras's ``get_config()`` returns)
and turned back into that dict by ``to_config``. Validation happens here,
once, so torch modules, the Keras importer and the exporter all reject the
same arguments with the same messages.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from gruserve.errors import ConfigError, InvalidArgument
from gruserve.layers.regularizers import Regularizer, get_regularizer

# Keys every Keras layer config may carry that change nothing we compute.
_BASE_KEYS = {"name", "trainable", "dtype", "activity_regularizer"}
# Keys only the first layer of a tf-keras Sequential carries; captured by the model.
INPUT_SHAPE_KEYS = {"batch_input_shape", "batch_shape", "input_shape", "input_dim"}


class ArgReader:
    """Reads and type-checks one Keras config dict, remembering what it used."""

    def __init__(self, where: str, config: dict[str, Any]) -> None:
        if not isinstance(config, dict):
            raise ConfigError(where, f"config must be a mapping, got {type(config).__name__}")
        self.where = where
        self.config = config
        self.used: set[str] = set()

    def raw(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        return self.config.get(key, default)

    # The methods ``bool`` and ``int`` shadow the builtins for the rest of the class
    # body, so annotations after them name ``builtins.bool`` and ``builtins.int``.
    def bool(self, key: str, default: bool) -> bool:
        """Keras stores any value given for a flag and only asks for its truth value."""
        return bool(self.raw(key, default))

    def int(
        self,
        key: str,
        default: int | None = None,
        *,
        minimum: int | None = None,
        integral_floats: builtins.bool = True,
        allow_bool: builtins.bool = False,
    ) -> int:
        """An integer; ``2.0`` counts unless ``integral_floats`` is off, ``True`` only if allowed.

        Keras's ``units`` takes ``True`` (an int) and refuses ``2.0``, so that
        argument reads with ``integral_floats=False, allow_bool=True``.
        """
        value = self.raw(key, default)
        if integral_floats and isinstance(value, float) and value.is_integer():
            value = int(value)
        if allow_bool and isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise InvalidArgument(self.where, key, value, "an integer")
        value = int(value)
        if minimum is not None and value < minimum:
            raise InvalidArgument(self.where, key, value, f"an integer >= {minimum}")
        return value

    def optional_int(self, key: str, *, minimum: builtins.int | None = None) -> builtins.int | None:
        if self.raw(key) is None:
            return None
        return self.int(key, minimum=minimum)

    def rate(self, key: str, default: float = 0.0) -> float:
        value = self.raw(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0.0 <= value <= 1.0
        ):
            raise InvalidArgument(self.where, key, value, "a number in [0, 1]")
        return float(value)

    def clipped_rate(self, key: str, default: float = 0.0) -> float:
        """A number clipped into [0, 1], as Keras's recurrent cells store their dropout rates."""
        value = self.raw(key, default)
        if not isinstance(value, (int, float, np.integer, np.floating)):
            raise InvalidArgument(self.where, key, value, "a number (Keras clips it into [0, 1])")
        return min(1.0, max(0.0, float(value)))

    def number(self, key: str, default: float) -> float:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(self.where, key, value, "a number")
        return float(value)

    def choice(self, key: str, default: Any, allowed: Iterable[Any]) -> Any:
        allowed = list(allowed)
        value = self.raw(key, default)
        if value not in allowed:
            raise InvalidArgument(self.where, key, value, allowed)
        return value

    def finish(self, extra_ignored: Iterable[str] = ()) -> None:
        """Reject keys nobody read: a silently ignored option is a wrong model."""
        unknown = sorted(
            set(self.config) - self.used - _BASE_KEYS - INPUT_SHAPE_KEYS - set(extra_ignored)
        )
        if unknown:
            known = sorted(self.used | _BASE_KEYS)
            raise ConfigError(
                self.where, f"unknown argument(s) {unknown}; this layer accepts {known}"
            )


def read_dtype(reader: ArgReader) -> None:
    """Only float32 layers are exact here; say so instead of computing in the wrong precision."""
    dtype = reader.raw("dtype", None)
    if isinstance(dtype, dict):  # Keras 3 DTypePolicy
        dtype = (dtype.get("config") or {}).get("name")
    if dtype not in (None, "float32"):
        raise InvalidArgument(
            reader.where, "dtype", dtype, "float32 (mixed precision is not supported)"
        )


@dataclass(frozen=True)
class LayerSpec:
    """Base of all layer specs."""

    class_name: ClassVar[str] = ""
    # Layers that compute a mask from their inputs (Masking, Embedding(mask_zero)).
    produces_mask: ClassVar[bool] = False

    name: str

    def to_config(self) -> dict[str, Any]:
        raise NotImplementedError

    def weight_shapes(self, input_features: int) -> dict[str, tuple[int, ...]]:
        """Weights in Keras layout, by path relative to the layer."""
        del input_features
        return {}

    def output_features(self, input_features: int) -> int:
        return input_features


def read_base(reader: ArgReader, default_name: str) -> tuple[str, Regularizer | None]:
    """The arguments every layer takes: name, dtype, activity_regularizer."""
    name = reader.raw("name", default_name) or default_name
    if not isinstance(name, str):
        raise InvalidArgument(reader.where, "name", name, "a string")
    read_dtype(reader)
    activity = get_regularizer(
        reader.raw("activity_regularizer"), where=reader.where, argument="activity_regularizer"
    )
    return name, activity


def base_config(name: str, activity: Regularizer | None) -> dict[str, Any]:
    return {
        "name": name,
        "trainable": True,
        "dtype": "float32",
        "activity_regularizer": activity.to_keras() if activity else None,
    }
