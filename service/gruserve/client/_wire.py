"""What the sync and asyncio clients share: request bodies, replies, binary frames, backoff.

Nothing here does I/O, so :mod:`gruserve.client._sync` and :mod:`gruserve.client._async`
differ only in how they send and wait; the wire formats are written once (those of
``api/decode.py``, ``api/encode.py`` and ``api/v1/ws.py`` on the server).
"""

from __future__ import annotations

import random
import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union
from urllib.parse import quote

import numpy as np
import orjson

from gruserve.client.errors import ApiError, ConnectionLost, api_error

Outputs = Union[np.ndarray, dict[str, np.ndarray]]  # noqa: UP007 (a runtime alias)
"""A model's outputs: one array, or ``{name: array}`` for a model with several outputs."""

RETRYABLE_STATUS = frozenset({502, 503, 504})
"""A proxy that lost its replica (502, 504) or a replica that lost its store (503)."""

SUBPROTOCOL = "gruserve-step"
NUMBER = struct.Struct("<Q")  # a gruserve-step binary frame's step number (u64, little-endian)
JSON_HEADERS = {"content-type": "application/json"}
FIRST_DELAY_S = 0.05
MAX_DELAY_S = 2.0


class Backoff:
    """Exponential backoff over a bounded number of retries.

    The n-th retry waits ``FIRST_DELAY_S * 2**n`` seconds (at most ``MAX_DELAY_S``),
    scaled by a random factor in [0.5, 1] so that clients cut off together do not all
    come back at the same instant.

    Args:
        what: the request, for the error message.
        retries: resends after the first attempt (0: none).
    """

    def __init__(self, what: str, retries: int) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0. Received: retries={retries}")
        self.what, self.retries, self.attempts = what, retries, 0

    @property
    def spent(self) -> bool:
        """Every retry has been used."""
        return self.attempts >= self.retries

    def next_delay(self, failure: BaseException | str) -> float:
        """Seconds to wait before the next attempt, after ``failure``.

        Raises:
            ConnectionLost: the retries are spent (from ``failure`` when an exception).
        """
        self.attempts += 1
        if self.attempts > self.retries:
            last = failure if isinstance(failure, str) else f"{type(failure).__name__}: {failure}"
            lost = ConnectionLost(self.what, self.attempts, last)
            if isinstance(failure, BaseException):
                raise lost from failure
            raise lost
        delay = min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** (self.attempts - 1))
        return delay * random.uniform(0.5, 1.0)


def dumps(body: Mapping[str, Any]) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def values(x: Any) -> np.ndarray:
    """Inputs as the server reads them: int64 token ids, else float32 values."""
    array = np.asarray(x)
    if array.dtype.kind in "iu":
        return array.astype(np.int64, copy=False)
    return array.astype(np.float32, copy=False)


def states(value: Mapping[str, Any] | Sequence[Any] | None) -> Any:
    """``initial_state`` / ``states`` as JSON: ``{key: values}``, a list, or None."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {key: values(v) for key, v in value.items()}
    return [values(v) for v in value]


Create = Union[bool, str, Mapping[str, Any], None]  # noqa: UP007 (a runtime alias)
"""A step's ``create=``: True (the handle's model), a model name, or ``{"model"?,
"initial_state"?}``; False or None: no create."""
End = Union[bool, Mapping[str, Any], None]  # noqa: UP007 (a runtime alias)
"""A step's ``end=``: True, or ``{"return_state": True}``; False or None: no end."""


def step_body(
    x: Any, mask: Any, number: int, create: Create = None, end: End = None, model: str = ""
) -> bytes:
    """A v1 step (``api/decode.py``): its inputs, number and the in-band lifecycle fields.

    Raises:
        ValueError: ``create`` or ``end`` is not one of the forms above.
    """
    body: dict[str, Any] = {"inputs": values(x), "step": number}
    if mask is not None:
        body["mask"] = np.asarray(mask, dtype=bool)
    if create:
        body["create"] = _create(create, model)
    if end:
        body["end"] = _end(end)
    return dumps(body)


def upgrade_body(version: int | None, replay: int | None) -> bytes:
    """The body of ``POST /v1/sessions/{id}/upgrade``: only what was given."""
    given = {"version": version, "replay": replay}
    return dumps({name: value for name, value in given.items() if value is not None})


def _create(create: Create, model: str) -> dict[str, Any]:
    given: Mapping[str, Any] = {}
    if isinstance(create, str):
        given = {"model": create}
    elif isinstance(create, Mapping):
        given = create
    elif create is not True:
        raise ValueError(f"create= takes True, a model name or a dict. Received: {create!r}")
    unknown = set(given) - {"model", "initial_state"}
    if unknown:
        raise ValueError(f"create= takes model and initial_state. Received: {sorted(unknown)}")
    made: dict[str, Any] = {"model": given.get("model") or model}
    if not made["model"]:
        raise ValueError("create= needs a model: create='NAME' or a handle with model=")
    if given.get("initial_state") is not None:
        made["initial_state"] = states(given["initial_state"])
    return made


def _end(end: End) -> bool | dict[str, bool]:
    if end is True:
        return True
    if isinstance(end, Mapping) and set(end) <= {"return_state"}:
        return {"return_state": bool(end.get("return_state", False))}
    raise ValueError(f'end= takes True or {{"return_state": True}}. Received: {end!r}')


def ended_states(answer: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The ``states`` an ``end={"return_state": True}`` step answers with, as float32."""
    return {key: np.asarray(v, dtype=np.float32) for key, v in answer["states"].items()}


def outputs(value: Any) -> Outputs:
    """A reply's ``outputs`` as float32 arrays (a dict for a model with several)."""
    if isinstance(value, dict):
        return {name: np.asarray(v, dtype=np.float32) for name, v in value.items()}
    return np.asarray(value, dtype=np.float32)


def reply(status: int, content: bytes, ok: int = 200) -> Any:
    """The decoded JSON of a successful reply.

    Raises:
        ApiError: (its subclass for the server's error type) any other status.
    """
    if status != ok:
        raise api_error(status, content)
    return orjson.loads(content) if content else None


def session_path(session_id: str, tail: str = "") -> str:
    return f"/v1/sessions/{quote(session_id, safe='')}{tail}"


def ws_url(base: str, session_id: str) -> str:
    scheme, rest = base.split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}{session_path(session_id, '/ws')}"


def new_session_id() -> str:
    """A random session id made by the client, so that resending a create is safe."""
    return uuid.uuid4().hex


def info(body: dict[str, Any]) -> dict[str, Any]:
    """A session description, its ``states`` (when asked for) as float32 arrays."""
    if body.get("states") is not None:
        body["states"] = {k: np.asarray(v, dtype=np.float32) for k, v in body["states"].items()}
    return body


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {} if api_key is None else {"authorization": f"Bearer {api_key}"}


@dataclass(frozen=True)
class OutputLayout:
    """How a model's binary WebSocket reply splits into its outputs.

    Attributes:
        names: the output names, in the order the server writes them.
        widths: each output's values per timestep (per sequence for ``per_timestep=False``).
        per_timestep: the model answers every timestep (else once per sequence).
        features: values per timestep of the inputs; None for a token-id model.
    """

    names: tuple[str, ...]
    widths: tuple[int, ...]
    per_timestep: bool
    features: int | None

    @classmethod
    def of(cls, description: Mapping[str, Any]) -> OutputLayout:
        """From ``GET /v1/models/{model}``."""
        found = description["outputs"]
        return cls(
            tuple(o["name"] for o in found),
            tuple(int(o["shape"][-1]) for o in found),
            bool(description["output_per_timestep"]),
            description.get("features"),
        )

    def frame(self, number: int, x: Any) -> tuple[bytes, int | None]:
        """A ``gruserve-step`` binary message and its timesteps (None: one, time axis dropped)."""
        array = values(x)
        full = 1 if self.features is None else 2
        if array.ndim not in (full - 1, full):
            raise ValueError(
                f"a step is [timesteps, features] or [features] (token ids: [timesteps] or "
                f"one id). Received: shape {list(array.shape)}"
            )
        if self.features is not None and (array.ndim == 0 or array.shape[-1] != self.features):
            raise ValueError(
                f"the model takes {self.features} features per timestep. "
                f"Received: shape {list(array.shape)}"
            )
        timesteps = None if array.ndim < full else int(array.shape[0])
        wire = "<i8" if self.features is None else "<f4"
        return NUMBER.pack(number) + array.astype(wire, copy=False).tobytes(), timesteps

    def outputs(self, data: bytes, timesteps: int | None) -> tuple[int, Outputs]:
        """``(steps applied, outputs)`` from a ``gruserve-step`` binary reply."""
        (applied,) = NUMBER.unpack_from(data)
        flat = np.frombuffer(data, "<f4", offset=NUMBER.size)
        split: dict[str, np.ndarray] = {}
        start = 0
        for name, width in zip(self.names, self.widths, strict=True):
            if not self.per_timestep or timesteps is None:
                split[name], start = flat[start : start + width], start + width
            else:
                size = timesteps * width
                split[name] = flat[start : start + size].reshape(timesteps, width)
                start += size
        if start != flat.size:
            raise ApiError(
                200, "BadReply", f"{flat.size} float32 values for outputs of {start}", None, None
            )
        if len(split) == 1:
            return int(applied), next(iter(split.values()))
        return int(applied), split


def ws_error(text: str) -> ApiError:
    """A WebSocket error message (``{"error": {..., "status": n}}``) as its typed exception."""
    return api_error(0, text)
