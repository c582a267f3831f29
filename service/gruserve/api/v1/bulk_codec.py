"""Bulk steps on the wire: a request's steps to :class:`BulkStep` values, outcomes to a reply.

Two forms carry the same thing, on REST (``POST /v1/models/{model}/steps``) and on
the bulk WebSocket (``/v1/models/{model}/ws``):

- JSON: ``{"steps": [{"session_id", "inputs", "mask"?, "step"?}, ...]}``, answered
  ``{"results": [{"session_id", "outputs", "step"} | {"session_id", "error"}, ...]}``;
- binary (:data:`MEDIA_TYPE`): a little-endian u32 ``n``, then ``n`` bytes of JSON header
  ``{"steps": [{"session_id", "timesteps", "step"?}, ...]}``, then every step's values
  back to back in request order, each (timesteps, features) float32 row-major (int64
  token ids for a token model). The reply has the same framing: a header
  ``{"results": [{"session_id", "step", "values"} | {"session_id", "error"}, ...]}``,
  then each answered step's outputs, ``values`` float32 numbers each (every output in
  order, as a binary WebSocket step reply), errors taking none.

A fault in one step is that step's error, named from the request (``steps[3].inputs``);
only a fault in the request as a whole (not JSON, no ``steps`` list, too many steps, a
binary header whose sizes do not add up to the body) fails the request.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gruserve.api import decode, encode
from gruserve.api.errors import error_payload
from gruserve.errors import InvalidInput, PayloadTooLarge, StepOutOfOrder
from gruserve.sessions.bulk import BulkStep, Outcome

MEDIA_TYPE = "application/x-gruserve-steps"
HEADER = struct.Struct("<I")
FIELDS = frozenset({"steps"})
STEP_FIELDS = frozenset({"session_id", "inputs", "mask", "step", "create", "end"})
BINARY_STEP_FIELDS = frozenset({"session_id", "timesteps", "step", "create", "end"})
SETTING = "GRUSERVE_MAX_BULK_STEPS"


@dataclass(frozen=True, slots=True)
class BulkRequest:
    """A decoded request: each step's session id as sent (None: not a string), and the
    step or the error that decoding it raised."""

    ids: list[str | None]
    steps: list[BulkStep | BaseException]


def _steps(header: dict[str, Any], limit: int) -> list[Any]:
    if "steps" not in header:
        raise InvalidInput("steps", "required: a list of steps")
    steps = header["steps"]
    if type(steps) is not list:
        raise InvalidInput("steps", f"expected a list of steps, got {decode.shown(steps)}")
    if len(steps) > limit:
        raise PayloadTooLarge("the number of steps", len(steps), limit, SETTING)
    return steps


def _fields(item: Any, where: str, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise InvalidInput(where, f"expected a step object, got {decode.shown(item)}")
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise InvalidInput(
            f"{where}.{unknown[0]}", f"unknown field; expected some of {sorted(allowed)}"
        )
    return item


def _session_id(item: dict[str, Any], where: str) -> str:
    value = item.get("session_id")
    if type(value) is not str:
        raise InvalidInput(
            f"{where}.session_id", f"required: a session id, got {decode.shown(value)}"
        )
    return value


def _id_of(item: Any) -> str | None:
    value = item.get("session_id") if isinstance(item, dict) else None
    return value if type(value) is str else None


def _json_step(item: Any, where: str, model: str | None = None) -> BulkStep:
    fields = _fields(item, where, STEP_FIELDS)
    session_id = _session_id(fields, where)
    if "inputs" not in fields:
        raise InvalidInput(f"{where}.inputs", "required: the timesteps of this step")
    mask = fields.get("mask")
    return BulkStep(
        session_id,
        decode.numbers(fields["inputs"], f"{where}.inputs"),
        None if mask is None else decode.booleans(mask, f"{where}.mask"),
        decode.step_number(fields.get("step"), f"{where}.step"),
        decode.lifecycle(fields.get("create"), fields.get("end"), model, f"{where}."),
    )


def json_request(data: bytes | str, limit: int, model: str | None = None) -> BulkRequest:
    """A JSON bulk request (REST body or WebSocket text message) of at most ``limit`` steps."""
    steps = _steps(decode.json_object(data, FIELDS), limit)
    decoded: list[BulkStep | BaseException] = []
    for i, item in enumerate(steps):
        try:
            decoded.append(_json_step(item, f"steps[{i}]", model))
        except InvalidInput as exc:
            decoded.append(exc)
    return BulkRequest([_id_of(item) for item in steps], decoded)


def _timesteps(item: Any, i: int) -> int:
    """A binary step's timestep count: it places every later step's values, so a bad one
    fails the request."""
    value = item.get("timesteps") if type(item) is dict else None
    if type(value) is not int or value < 1:
        raise InvalidInput(
            f"steps[{i}].timesteps", f"expected an integer >= 1, got {decode.shown(value)}"
        )
    return value


def _binary_step(
    item: dict[str, Any], inputs: np.ndarray, i: int, model: str | None = None
) -> BulkStep:
    session_id, number = item.get("session_id"), item.get("step")
    if type(session_id) is str and number is None and len(item) <= 2:  # the usual entry
        return BulkStep(session_id, inputs)
    where = f"steps[{i}]"
    fields = _fields(item, where, BINARY_STEP_FIELDS)
    return BulkStep(
        _session_id(fields, where),
        inputs,
        None,
        decode.step_number(fields.get("step"), f"{where}.step"),
        decode.lifecycle(fields.get("create"), fields.get("end"), model, f"{where}."),
    )


def binary_request(
    data: bytes, features: int | None, limit: int, model: str | None = None
) -> BulkRequest:
    """A binary bulk request for a model of ``features`` inputs (None: token ids); ``model``
    (the URL's) is what ``"create": true`` creates sessions of."""
    if len(data) < HEADER.size:
        raise InvalidInput(
            "body", f"{len(data)} bytes: a binary bulk request starts with a u32 header length"
        )
    (size,) = HEADER.unpack_from(data)
    start = HEADER.size + size
    if start > len(data):
        raise InvalidInput(
            "body", f"header length {size} runs past the end of the {len(data)}-byte body"
        )
    steps = _steps(decode.json_object(bytes(data[HEADER.size : start]), FIELDS), limit)
    counts = [_timesteps(item, i) for i, item in enumerate(steps)]
    dtype = np.dtype("<i8") if features is None else np.dtype("<f4")
    width = dtype.itemsize * (features or 1)
    expected = sum(counts) * width
    if len(data) - start != expected:
        raise InvalidInput(
            "body",
            f"{len(data) - start} bytes of values after the header, but its timesteps need "
            f"{expected} ({width} bytes per timestep)",
        )
    rows = np.frombuffer(data, dtype, offset=start)  # one view; each step a slice of it
    if features is not None:
        rows = rows.reshape(-1, features)
    decoded: list[BulkStep | BaseException] = []
    row = 0
    for i, (item, count) in enumerate(zip(steps, counts, strict=True)):
        try:
            decoded.append(_binary_step(item, rows[row : row + count], i, model))
        except InvalidInput as exc:
            decoded.append(exc)
        row += count
    return BulkRequest([_id_of(item) for item in steps], decoded)


def _error(exc: BaseException, where: str) -> dict[str, Any]:
    """A step's error object, its field named from the request (``steps[3].inputs``)."""
    if isinstance(exc, InvalidInput) and not exc.field.startswith("steps["):
        exc = InvalidInput(f"{where}.{exc.field}", exc.detail)
    status, body = error_payload(exc)
    error: dict[str, Any] = body["error"]
    if isinstance(exc, StepOutOfOrder):
        error["field"] = f"{where}.step"
    error["status"] = status
    return error


def json_reply(ids: Sequence[str | None], outcomes: Sequence[Outcome]) -> bytes:
    """``{"results": [...]}`` in request order."""
    results: list[dict[str, Any]] = []
    for i, (session_id, outcome) in enumerate(zip(ids, outcomes, strict=True)):
        if isinstance(outcome, BaseException):
            results.append({"session_id": session_id, "error": _error(outcome, f"steps[{i}]")})
        else:
            results.append({"session_id": session_id, **encode.step(outcome)})
    return encode.dumps({"results": results})


def binary_reply(ids: Sequence[str | None], outcomes: Sequence[Outcome]) -> bytes:
    """The binary reply: u32 header length, JSON header, every answered step's float32 values."""
    results: list[dict[str, Any]] = []
    values: list[bytes] = []
    for i, (session_id, outcome) in enumerate(zip(ids, outcomes, strict=True)):
        if isinstance(outcome, BaseException):
            results.append({"session_id": session_id, "error": _error(outcome, f"steps[{i}]")})
        else:
            raw = encode.outputs_bytes(outcome)
            values.append(raw)
            results.append(
                {"session_id": session_id, "step": outcome.step, "values": len(raw) // 4}
            )
    header = encode.dumps({"results": results})
    return b"".join([HEADER.pack(len(header)), header, *values])
