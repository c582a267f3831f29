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

A binary request's plain steps (a session id and timesteps, nothing else) of the most
common length are decoded as one :class:`~gruserve.sessions.bulk.PlainBlock`, a view of
the body's values, and answered from the run's output matrices: no object per step on
either side beyond its header entries.

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
from gruserve.sessions.bulk import BlockAnswer, BulkStep, Outcome, PlainBlock

MEDIA_TYPE = "application/x-gruserve-steps"
HEADER = struct.Struct("<I")
FIELDS = frozenset({"steps"})
STEP_FIELDS = frozenset({"session_id", "inputs", "mask", "step", "create", "end"})
BINARY_STEP_FIELDS = frozenset({"session_id", "timesteps", "step", "create", "end"})
SETTING = "GRUSERVE_MAX_BULK_STEPS"


@dataclass(frozen=True, slots=True)
class BulkRequest:
    """A decoded request: each step's session id as sent (None: not a string), and the
    step or the error that decoding it raised, or None where the step is a row of
    ``block`` (the plain steps of a binary request, as arrays; None: no such steps)."""

    ids: list[str | None]
    steps: list[BulkStep | BaseException | None]
    block: PlainBlock | None = None


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
    decoded: list[BulkStep | BaseException | None] = []
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
    if features is None:  # token ids: every step on its own
        return BulkRequest([_id_of(item) for item in steps], _each(steps, counts, rows, model))
    rows = rows.reshape(-1, features)
    length = _plain_length(steps, counts)
    decoded: list[BulkStep | BaseException | None] = []
    sent: list[str | None] = []  # every step's id as sent
    positions: list[int] = []
    ids: list[str] = []
    starts: list[int] = []
    row = 0
    for i, (item, count) in enumerate(zip(steps, counts, strict=True)):
        session_id = item.get("session_id")
        if count == length and len(item) == 2 and type(session_id) is str:  # a block row
            positions.append(i)
            ids.append(session_id)
            starts.append(row)
            decoded.append(None)
            sent.append(session_id)
        else:
            decoded.append(_step_or_error(item, rows[row : row + count], i, model))
            sent.append(_id_of(item))
        row += count
    block = None
    if positions:
        if len(positions) == len(steps):  # every step: the body's values are the block
            inputs = rows.reshape(len(steps), length, features)
        else:
            inputs = rows[np.asarray(starts)[:, None] + np.arange(length)]
        block = PlainBlock(positions, ids, inputs)
    return BulkRequest(sent, decoded, block)


def _plain_length(steps: list[Any], counts: list[int]) -> int:
    """The timesteps of the block's rows: the most common length among plain steps (the
    first step's in the usual request, where every step has the same)."""
    if counts and all(c == counts[0] for c in counts):
        return counts[0]
    seen: dict[int, int] = {}
    for item, count in zip(steps, counts, strict=True):
        if len(item) == 2 and type(item.get("session_id")) is str:
            seen[count] = seen.get(count, 0) + 1
    return max(seen, key=lambda c: seen[c]) if seen else 0


def _each(
    steps: list[Any], counts: list[int], rows: np.ndarray, model: str | None
) -> list[BulkStep | BaseException | None]:
    """Every step of a request decoded on its own (a token model's)."""
    decoded: list[BulkStep | BaseException | None] = []
    row = 0
    for i, (item, count) in enumerate(zip(steps, counts, strict=True)):
        decoded.append(_step_or_error(item, rows[row : row + count], i, model))
        row += count
    return decoded


def _step_or_error(
    item: dict[str, Any], inputs: np.ndarray, i: int, model: str | None
) -> BulkStep | InvalidInput:
    """Step ``i`` decoded, or the error that is its answer (never the whole request's)."""
    try:
        return _binary_step(item, inputs, i, model)
    except InvalidInput as exc:
        return exc


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


def binary_reply(
    ids: Sequence[str | None],
    outcomes: Sequence[Outcome | None],
    block: PlainBlock | None = None,
    answer: BlockAnswer | None = None,
) -> bytes:
    """The binary reply: u32 header length, JSON header, every answered step's float32 values.

    ``answer`` holds the outcomes of ``block``'s rows whose ``outcomes`` entry is None:
    their values are read from its output matrices."""
    if block is not None and answer is not None and answer.steps:
        return _block_reply(ids, outcomes, block, answer)
    values: list[bytes] = []
    results = [
        _entry(i, session_id, outcome, values)
        for i, (session_id, outcome) in enumerate(zip(ids, outcomes, strict=True))
    ]
    return _framed(results, values)


def _entry(
    i: int, session_id: str | None, outcome: Outcome | None, values: list[bytes]
) -> dict[str, Any]:
    """Step ``i``'s result entry of a binary reply; its values are appended to ``values``."""
    if outcome is None or isinstance(outcome, BaseException):
        exc = outcome if outcome is not None else RuntimeError("bulk step not run")
        return {"session_id": session_id, "error": _error(exc, f"steps[{i}]")}
    raw = encode.outputs_bytes(outcome)
    values.append(raw)
    return {"session_id": session_id, "step": outcome.step, "values": len(raw) // 4}


def _framed(results: list[dict[str, Any]], values: Sequence[bytes]) -> bytes:
    """A binary reply: the header's length, the JSON header, then the values."""
    header = encode.dumps({"results": results})
    return b"".join([HEADER.pack(len(header)), header, *values])


def _block_reply(
    ids: Sequence[str | None],
    outcomes: Sequence[Outcome | None],
    block: PlainBlock,
    answer: BlockAnswer,
) -> bytes:
    """:func:`binary_reply` with block rows answered: each one's values are a row of the
    outputs side by side (every output in order, as :func:`~gruserve.api.encode.outputs_bytes`
    lays out a step's)."""
    count = len(answer.steps)
    matrices = [m.reshape(count, -1) for m in answer.outputs]
    table = matrices[0] if len(matrices) == 1 else np.concatenate(matrices, axis=1)
    width = table.shape[1]
    blob = table.astype("<f4", copy=False).tobytes()
    steps = answer.steps
    if count == len(ids):  # every step answered here: the table is the values, in order
        results = [
            {"session_id": session_id, "step": step, "values": width}
            for session_id, step in zip(ids, steps, strict=True)
        ]
        return _framed(results, [blob])
    size = width * 4
    slot_at = dict(zip(block.positions, answer.slot, strict=True))
    results = []
    values: list[bytes] = []
    for i, (session_id, outcome) in enumerate(zip(ids, outcomes, strict=True)):
        slot = slot_at.get(i, -1)
        if slot >= 0:
            results.append({"session_id": session_id, "step": steps[slot], "values": width})
            values.append(blob[slot * size : (slot + 1) * size])
        else:
            results.append(_entry(i, session_id, outcome, values))
    return _framed(results, values)
