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
import reprlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import orjson

from gruserve.errors import InvalidInput
from gruserve.sessions.lifecycle import STEP_ONLY, Create, Lifecycle

STEP_FIELDS = frozenset({"inputs", "mask", "step", "create", "end"})
CREATE_FIELDS = frozenset({"model", "initial_state"})
END_FIELDS = frozenset({"return_state"})
MAX_DEPTH = 8
"""Deepest nesting of an array field (a step is at most 2-D, a predict batch 3-D)."""
STEP_NUMBER_LIMIT = 2**63
_NUMBER = (float, int)


class _NonFinite:
    """A ``NaN`` / ``Infinity`` literal the standard library's parser let through."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _integer(text: str) -> int | float:
    """An integer literal as orjson reads it: past 64 bits it is a float (``inf`` past the
    float range), so the fallback parser never builds a huge ``int`` (``int()`` refuses more
    than 4300 digits, numpy cannot convert one past 2**64: both were 500s)."""
    if len(text) <= 20:
        value = int(text)
        if -(2**63) <= value < 2**64:
            return value
    return float(text)


def loads(data: bytes | str) -> Any:
    """Parse JSON; non-finite literals become :class:`_NonFinite` so the walker can name them."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        try:
            return json.loads(data, parse_constant=_NonFinite, parse_int=_integer)
        except RecursionError:  # orjson stops at 1024 levels; the standard library overflows
            raise InvalidInput("body", f"nested too deeply: {exc}") from None
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


def shown(value: Any) -> str:
    """A received value as an error message quotes it (JSON); never raises.

    orjson parses up to 1024 levels of nesting, deeper than Python's recursion limit, so
    ``json.dumps`` or ``repr`` of a parsed value can raise ``RecursionError`` (and a NaN
    literal inside a list is no JSON): such a value is abbreviated by :mod:`reprlib`.
    """
    if isinstance(value, _NonFinite):
        return value.text
    try:
        return json.dumps(value) if _jsonable(value) else repr(value)
    except (TypeError, ValueError, RecursionError):
        return reprlib.repr(value)


def _leaf_error(field: str, index: tuple[int, ...], value: Any, kind: str) -> InvalidInput:
    if isinstance(value, _NonFinite):
        return InvalidInput(
            _where(field, index), f"{value.text} is not allowed: send finite numbers"
        )
    return InvalidInput(_where(field, index), f"expected {kind}, got {shown(value)}")


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
    if len(index) >= MAX_DEPTH:
        raise InvalidInput(_where(field, index), f"arrays nest at most {MAX_DEPTH} deep")
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


def leading_sizes(value: Any) -> tuple[int, int]:
    """The lengths of a nested list's first two levels (batch and timesteps of a predict
    batch), read without walking it; 0 where a level is missing. Only a cheap first look:
    :func:`numbers` checks the whole value."""
    if type(value) is not list:
        return 0, 0
    first = value[0] if value else None
    return len(value), len(first) if type(first) is list else 0


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


def step_number(value: Any, field: str = "step") -> int | None:
    """A client's step number (steps already applied): an integer >= 0, or None if absent."""
    if value is None:
        return None
    if type(value) is not int or not 0 <= value < STEP_NUMBER_LIMIT:
        raise InvalidInput(
            field,
            f"expected the number of steps already applied (an integer >= 0), got {shown(value)}",
        )
    return value


StepMessage = tuple[np.ndarray, np.ndarray | None, int | None, Lifecycle]
"""A decoded step: inputs, mask, step number (None: at-least-once), lifecycle."""


def step_body(body: dict[str, Any], model: str | None = None, where: str = "") -> StepMessage:
    """A step body ``{"inputs": TxF, F or token ids, "mask"?: T, "step"?: n, "create"?: {...},
    "end"?: ...}`` as unchecked arrays, the step number and what the step does to its
    session's life (:func:`lifecycle`; ``model``: the model a URL names, for ``create``)."""
    if "inputs" not in body:
        raise InvalidInput(f"{where}inputs", "required: the timesteps of this step")
    mask = body.get("mask")
    return (
        numbers(body["inputs"], f"{where}inputs"),
        None if mask is None else booleans(mask, f"{where}mask"),
        step_number(body.get("step"), f"{where}step"),
        lifecycle(body.get("create"), body.get("end"), model, where),
    )


def step_message(data: bytes | str) -> StepMessage:
    """A JSON step (REST body, NDJSON line, WebSocket text message)."""
    return step_body(json_object(data, STEP_FIELDS))


def lifecycle(create: Any, end: Any, model: str | None = None, where: str = "") -> Lifecycle:
    """A step's ``create`` and ``end`` fields.

    ``create``: ``{"model": name, "initial_state"?: states}`` creates the session if it does
    not exist; where the URL names the model (bulk steps: ``model``), ``true`` or
    ``{"initial_state"?: ...}``. ``end``: ``true`` deletes the session after the step,
    ``{"return_state": true}`` also returns the state it ended in.
    """
    if create is None and end is None:
        return STEP_ONLY
    made = None
    if create is not None and create is not False:
        made = _create(create, model, f"{where}create")
    if end is None or end is False:
        return Lifecycle(made)
    if end is True:
        return Lifecycle(made, end=True)
    if not isinstance(end, dict) or set(end) - END_FIELDS:
        raise InvalidInput(
            f"{where}end", f'expected true, false or {{"return_state": true}}, got {shown(end)}'
        )
    returned = end.get("return_state", False)
    if type(returned) is not bool:
        raise InvalidInput(
            f"{where}end.return_state", f"expected true or false, got {shown(returned)}"
        )
    return Lifecycle(made, end=True, final_state=returned)


def _create(value: Any, model: str | None, field: str) -> Create:
    if value is True and model is not None:
        return Create(model)
    if not isinstance(value, dict):
        expected = '{"model": name}' if model is None else 'true or {"initial_state": ...}'
        raise InvalidInput(field, f"expected {expected}, got {shown(value)}")
    unknown = sorted(set(value) - CREATE_FIELDS)
    if unknown:
        raise InvalidInput(
            f"{field}.{unknown[0]}", f"unknown field; expected some of {sorted(CREATE_FIELDS)}"
        )
    name = value.get("model", model)
    if type(name) is not str or not name:
        raise InvalidInput(f"{field}.model", f"expected a model name, got {shown(name)}")
    initial = value.get("initial_state")
    return Create(name, None if initial is None else states(initial, f"{field}.initial_state"))


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
