"""v2 request parameters: the sequence ones, how a sequence id names a session, output format.

Triton's sequence extension marks a request as one step of a stateful
sequence with ``parameters.sequence_id`` (a uint64, or a string with the
``sequence(string_id)`` extension; 0 and "" mean "no sequence") and the flags
``sequence_start`` / ``sequence_end``. gruserve keeps a sequence as an ordinary
session, so v1 can inspect it (``GET /v1/sessions/{id}``). Sequence ids are
per model in Triton, so the session id names the model too:

========================  ==================================
v2 ``sequence_id``         session id
========================  ==================================
``42`` (uint64)            ``v2:{model}:42``
``"user-7"`` (string)      ``v2:{model}:s:user-7``
``"a b/c"`` (other)        ``v2:{model}:h:`` + 32 hex of SHA-256
========================  ==================================

A request of a sequence may also carry ``parameters.sequence_step``: the steps of the
sequence already applied (the previous reply's ``parameters.step``; 0 with
``sequence_start``). It makes the step exactly-once, as ``"step"`` does on v1: resending
a request with the same number returns the same outputs without applying it again.

With named API keys, these session ids are in the tenant's namespace, as v1 ids are
(:mod:`gruserve.sessions.owner`): tenant ``acme``'s sequence 42 of ``demo`` is acme's
session ``v2:demo:42``, and another tenant's sequence 42 is another session.

Numbers are bare digits and strings always carry ``s:`` or ``h:``, so ``42``
and ``"42"`` are different sequences. A string keeps its text when it uses only
``A-Z a-z 0-9 . _ : -`` and fits the 128-character session id; any other string
is hashed. Replies carry the session id in ``parameters.session_id``.

>>> session_id_for("demo", 42), session_id_for("demo", "42")
('v2:demo:42', 'v2:demo:s:42')
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gruserve.api.decode import shown, step_number
from gruserve.errors import InvalidInput

UINT64_MAX = 2**64 - 1
STEP = "sequence_step"
_READABLE = re.compile(r"[A-Za-z0-9._:-]+")  # fullmatch: "x\n" is not readable
_MAX_SESSION_ID = 128


@dataclass(frozen=True)
class SequenceControl:
    """One request's place in a sequence."""

    sequence_id: int | str
    session_id: str
    start: bool
    end: bool
    step_number: int | None = None


def session_id_for(model: str, sequence_id: int | str) -> str:
    """The session that holds ``model``'s sequence ``sequence_id`` (see the module table)."""
    prefix = f"v2:{model}:"
    if isinstance(sequence_id, int):
        return f"{prefix}{sequence_id}"
    readable = f"{prefix}s:{sequence_id}"
    if _READABLE.fullmatch(sequence_id) and len(readable) <= _MAX_SESSION_ID:
        return readable
    return f"{prefix}h:{hashlib.sha256(sequence_id.encode()).hexdigest()[:32]}"


def flag(parameters: Mapping[str, Any], key: str) -> bool:
    """A boolean request parameter (``binary_data_output``, ``sequence_start``), default false."""
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"parameters.{key}", f"expected true or false, got {shown(value)}")
    return value


def sequence_control(parameters: Mapping[str, Any], model: str) -> SequenceControl | None:
    """The request's sequence, or None for a stateless request (no id, 0 or "").

    Raises:
        InvalidInput: an id that is neither uint64 nor string, or flags without an id.
    """
    start, end = flag(parameters, "sequence_start"), flag(parameters, "sequence_end")
    number = step_number(parameters.get(STEP), f"parameters.{STEP}")
    sequence_id = parameters.get("sequence_id", 0)
    if isinstance(sequence_id, bool) or not isinstance(sequence_id, int | str):
        raise InvalidInput(
            "parameters.sequence_id", f"expected a uint64 or a string, got {shown(sequence_id)}"
        )
    if isinstance(sequence_id, int) and not 0 <= sequence_id <= UINT64_MAX:
        raise InvalidInput("parameters.sequence_id", f"a numeric id is a uint64, got {sequence_id}")
    if sequence_id in (0, ""):
        if start or end or number is not None:
            raise InvalidInput(
                "parameters.sequence_id",
                f'sequence_start / sequence_end / {STEP} need a non-zero sequence_id (0 and "" '
                "mean a stateless request)",
            )
        return None
    session_id = session_id_for(model, sequence_id)
    return SequenceControl(sequence_id, session_id, start, end, number)
