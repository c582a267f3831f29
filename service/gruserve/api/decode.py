"""Turning request payloads (JSON text or raw bytes) into numpy arrays.

One decoder serves every transport (REST bodies, NDJSON lines, WebSocket
messages), so a step means the same thing everywhere. JSON is parsed with
orjson; a payload orjson rejects is re-read with the standard library only to
find *where* it went wrong, so ``NaN`` or ``Infinity`` literals are reported
with the path of the offending value (``inputs[2][1]``). Every error is an
:class:`~gruserve.errors.InvalidInput` naming its field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import orjson

from gruserve.errors import InvalidInput

STEP_FIELDS = frozenset({"inputs", "mask"})
_NUMBER = (float, int)


class _NonFinite:
    """A ``NaN`` / ``Infinity`` literal the standard library's parser let through."""

    def __init__(self, text: str) -> None:
        self.text = text


def loads(data: bytes | str) -> Any:
    """Parse JSON; non-finite literals become :class:`_NonFinite` so the walker can name them."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        try:
            return json.loads(data, parse_constant=_NonFinite)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InvalidInput("body", f"not valid JSON: {exc}") from None


def json_object(data: bytes | str, allowed: Iterable[str]) -> dict[str, Any]:
    """A JSON object whose keys are all in ``allowed``."""
    value = loads(data) if data else {}
    if not isinstance(value, dict):
        raise InvalidInput("body", f"expected a JSON object, got {type(value).__name__}")
    allowed = frozenset(allowed)
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise InvalidInput(unknown[0], f"unknown field; expected some of {sorted(allowed)}")
    return value


def _where(field: str, index: tuple[int, ...]) -> str:
    return field + "".join(f"[{i}]" for i in index)


def _leaf_error(field: str, index: tuple[int, ...], value: Any, kind: str) -> InvalidInput:
    if isinstance(value, _NonFinite):
        return InvalidInput(
            _where(field, index), f"{value.text} is not allowed: send finite numbers"
        )
    shown = json.dumps(value) if _jsonable(value) else repr(value)
    return InvalidInput(_where(field, index), f"expected {kind}, got {shown}")


def _jsonable(value: Any) -> bool:
    return isinstance(value, str | bool | dict | list) or value is None


def _shape(
    value: Any, field: str, index: tuple[int, ...], leaf: tuple[type, ...], kind: str
) -> tuple[int, ...]:
    """The shape of a rectangular nested list whose leaves have exactly the types ``leaf``."""
    if type(value) is not list:
        if type(value) in leaf:
            return ()
        raise _leaf_error(field, index, value, kind)
    if not value:
        return (0,)
    if type(value[0]) is not list:
        if not set(map(type, value)).issubset(leaf):
            for i, v in enumerate(value):
                if type(v) not in leaf:
                    raise _leaf_error(field, (*index, i), v, kind)
        return (len(value),)
    inner = _shape(value[0], field, (*index, 0), leaf, kind)
    for i in range(1, len(value)):
        other = _shape(value[i], field, (*index, i), leaf, kind)
        if other != inner:
            raise InvalidInput(
                _where(field, (*index, i)),
                f"has shape {list(other)} but {_where(field, (*index, 0))} has {list(inner)}: "
                "arrays must be rectangular",
            )
    return (len(value), *inner)


def numbers(value: Any, field: str) -> np.ndarray:
    """A (nested) list of JSON numbers as float64; booleans and strings are rejected."""
    _shape(value, field, (), _NUMBER, "a number")
    return np.array(value, np.float64)


def booleans(value: Any, field: str) -> np.ndarray:
    """A (nested) list of JSON booleans."""
    _shape(value, field, (), (bool,), "true or false")
    return np.array(value, np.bool_)


def states(value: Any, field: str) -> dict[str, np.ndarray] | np.ndarray | list[np.ndarray]:
    """States as ``{key: values}``, one array (same-shaped entries), or a list of arrays."""
    if isinstance(value, dict):
        return {str(k): numbers(v, f"{field}.{k}") for k, v in value.items()}
    if isinstance(value, list) and value and all(type(v) is list for v in value):
        parts = [numbers(v, f"{field}[{i}]") for i, v in enumerate(value)]
        if len({p.shape for p in parts}) == 1:
            return np.stack(parts)
        return parts
    return numbers(value, field)


def step_body(body: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """A step body ``{"inputs": TxF, F or token ids, "mask"?: T}`` as unchecked arrays."""
    if "inputs" not in body:
        raise InvalidInput("inputs", "required: the timesteps of this step")
    mask = body.get("mask")
    return numbers(body["inputs"], "inputs"), None if mask is None else booleans(mask, "mask")


def step_message(data: bytes | str) -> tuple[np.ndarray, np.ndarray | None]:
    """A JSON step (REST body, NDJSON line, WebSocket text message)."""
    return step_body(json_object(data, STEP_FIELDS))


def float32_bytes(data: bytes, features: int | None) -> np.ndarray:
    """A binary step: raw little-endian values, (T, F) float32, or (T,) int64 token ids."""
    if features is None:
        if len(data) % 8:
            raise InvalidInput(
                "message", f"{len(data)} bytes is not a whole number of int64 token ids"
            )
        return np.frombuffer(data, "<i8")
    width = 4 * features
    if not data or len(data) % width:
        raise InvalidInput(
            "message",
            f"{len(data)} bytes is not a whole number of timesteps of {features} float32 "
            f"values ({width} bytes each)",
        )
    return np.frombuffer(data, "<f4").reshape(-1, features)
