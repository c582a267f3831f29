"""Encoding replies: numpy arrays straight to JSON bytes with orjson, shared by every transport."""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
from starlette.responses import Response

from gruserve.runtime.registry import ModelStatus
from gruserve.sessions.service import StepResult
from gruserve.sessions.store import SessionPage, SessionRecord, SessionSummary

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
_STEP = struct.Struct("<Q")


def _fallback(value: Any) -> Any:
    if isinstance(value, np.ndarray):  # not C-contiguous, so orjson hands it back
        return value.tolist()
    raise TypeError(f"cannot encode {type(value).__name__}")


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_fallback, option=_OPTIONS)


def json_response(value: Any, status: int = 200) -> Response:
    return Response(dumps(value), status_code=status, media_type="application/json")


def outputs(named: dict[str, np.ndarray]) -> Any:
    """The output array for a one-output model, else ``{name: array}``."""
    if len(named) == 1:
        return next(iter(named.values()))
    return named


def step(result: StepResult) -> dict[str, Any]:
    reply = {
        "outputs": outputs(result.outputs),
        "step": result.step,
        "version": result.record.version,
    }
    if result.states is not None:  # the state a session ended in, asked for with "end"
        reply["states"] = result.states
    return reply


def outputs_bytes(result: StepResult) -> bytes:
    """A binary WebSocket reply: every output's float32 values, little-endian, in output order."""
    arrays = list(result.outputs.values())
    if len(arrays) == 1:
        return arrays[0].astype("<f4", copy=False).tobytes()
    return b"".join(a.astype("<f4", copy=False).tobytes() for a in arrays)


def numbered_outputs_bytes(result: StepResult) -> bytes:
    """A binary reply of the ``gruserve-step`` WebSocket subprotocol: the steps applied
    (u64, little-endian) then :func:`outputs_bytes`."""
    return _STEP.pack(result.step) + outputs_bytes(result)


def model_status(status: ModelStatus) -> dict[str, Any]:
    """A model folder's outcome as ``/v1/models`` and ``/readyz`` list it."""
    return {
        "name": status.name,
        "version": status.version,
        "provider": status.provider,
        "ready": status.ready,
        "error": status.error,
    }


def _iso(seconds: float) -> str:
    return (
        datetime.fromtimestamp(seconds, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def session(
    record: SessionRecord | SessionSummary,
    ttl_s: float,
    states: dict[str, np.ndarray] | None = None,
    lifetime_s: float = 0.0,
    session_id: str | None = None,
) -> dict[str, Any]:
    """A session's metadata; it expires at its idle deadline or, if sooner, its lifetime's.

    ``session_id``: the id the client names it by (``record.session_id``, its store key,
    when None: a summary of :meth:`SessionService.page` already carries the client's)."""
    expires = record.last_used_at + ttl_s
    if lifetime_s:
        expires = min(expires, record.created_at + lifetime_s)
    info: dict[str, Any] = {
        "session_id": record.session_id if session_id is None else session_id,
        "tenant": record.owner,
        "model": record.model,
        "version": record.version,
        "step": record.step,
        "timesteps": record.timesteps,
        "created_at": _iso(record.created_at),
        "last_used_at": _iso(record.last_used_at),
        "expires_at": _iso(expires),
    }
    if states is not None:
        info["states"] = states
    return info


def page(found: SessionPage, ttl_s: float, lifetime_s: float = 0.0) -> dict[str, Any]:
    return {
        "sessions": [session(s, ttl_s, lifetime_s=lifetime_s) for s in found.sessions],
        "next_cursor": found.next_cursor,
    }
