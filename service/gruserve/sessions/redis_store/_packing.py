"""A session write as one Redis argument: packed here, unpacked by the write script.

A compare-and-set carries a session's id, the revision it expects, its lifetime
deadline, whether it ends the session, and the record's fields. Sent as one script
argument each (15 per write), redis-py encoded them one by one in Python: about half
of a Redis-backed server's event loop went to packing arguments (bench/README.md,
"Redis store I/O per batch"). Here they travel as one ``bytes`` value per write: the
text fields joined by newlines, then each binary field, whose lengths the text part
states. The script splits it again (:func:`lua_unpack`) and stores the same hash
fields as before, so the record layout in Redis does not change and every record
reads as it did.

Newlines cannot occur in the text fields (ids, model and key names are validated
to ``[A-Za-z0-9._:-]``, the rest are numbers); :func:`packed_write` checks it all
the same, at the cost of one count per write, so a field that ever broke the rule
fails loudly instead of shifting the others.
"""

from __future__ import annotations

import numpy as np

from gruserve.sessions.store import SessionRecord

TEXT_FIELDS = (
    "model",
    "version",
    "step",
    "timesteps",
    "revision",
    "created_at",
    "last_used_at",
    "owner",
)
"""The hash fields sent as text, in packing order."""
BINARY_FIELDS = ("state", "result")
"""The hash fields sent as bytes after the text part, in packing order."""
HISTORY_FIELD = "history"
"""The binary field a store with ``GRUSERVE_SESSION_HISTORY`` on sends last: the revision
it was written at (u64, little-endian) and the kept inputs
(:mod:`gruserve.sessions.history`); a write with history off leaves the field as it was, so
a reader takes one whose revision is not the record's as stale."""
HEAD = ("id", "expected", "deadline", "end", "base")
"""What a write carries before the record's fields (``expected``: -1 creates; ``base``: the
``writer`` the stored hash must also hold, or empty: see :func:`packed_write`)."""
_LINES = len(HEAD) + len(TEXT_FIELDS) + len(BINARY_FIELDS)  # each binary field's length too


def packed_write(
    record: SessionRecord,
    expected: int,
    deadline_ms: int,
    end: bool,
    history: bool = False,
    base: str = "",
) -> bytes:
    """One write as the write script's argument (:func:`lua_unpack` reads it back).

    Args:
        record: the record to store.
        expected: the revision the writer read (-1: create if the id is free).
        deadline_ms: the lifetime deadline in Unix ms (0: none).
        end: remove the session instead of storing it.
        history: also send the record's kept inputs (:data:`HISTORY_FIELD`), for a store
            with ``GRUSERVE_SESSION_HISTORY`` on.
        base: the ``writer`` token the stored hash must hold besides ``expected`` (a write
            based on the record this server wrote last, not on one it read: revision alone
            cannot tell that record from one a re-created session reached the same revision
            with); empty: not checked. Only this server's own script reads it, so the hash
            layout and older replicas are unaffected.

    Raises:
        ValueError: a text field holds a newline.
    """
    binary = [np.ascontiguousarray(record.state, "<f4").tobytes(), record.last_result or b""]
    if history:
        binary.append(history_value(record))
    head = (
        f"{record.session_id}\n{expected}\n{deadline_ms}\n{1 if end else 0}\n{base}\n"
        f"{record.model}\n{record.version}\n{record.step}\n{record.timesteps}\n"
        f"{record.revision}\n{record.created_at!r}\n{record.last_used_at!r}\n{record.owner}\n"
        + "".join(f"{len(value)}\n" for value in binary)
    )
    if head.count("\n") != _LINES + history:
        raise ValueError(f"a session write's text fields may not hold newlines. Received: {head!r}")
    return head.encode() + b"".join(binary)


def history_value(record: SessionRecord) -> bytes:
    """The :data:`HISTORY_FIELD` value of ``record`` (empty: nothing kept)."""
    kept = record.history
    return record.revision.to_bytes(8, "little") + kept if kept else b""


def binary_fields(history: bool = False) -> tuple[str, ...]:
    """The binary fields a write sends (:data:`BINARY_FIELDS`, then ``history`` with it)."""
    return (*BINARY_FIELDS, HISTORY_FIELD) if history else BINARY_FIELDS


def lua_unpack(history: bool = False) -> str:
    """Lua defining ``unpack_write(blob)``: the table of a packed write's values by name."""
    binary = binary_fields(history)
    names = (*HEAD, *TEXT_FIELDS, *(f"{name}_bytes" for name in binary))
    pattern = "^" + "([^\\n]*)\\n" * len(names) + "()"  # each line, then where the rest starts
    return (
        _LUA_UNPACK.replace("{NAMES}", "{" + ", ".join(f"'{n}'" for n in names) + "}")
        .replace("{BINARY}", "{" + ", ".join(f"'{n}'" for n in binary) + "}")
        .replace("{PATTERN}", pattern)
    )


def lua_hset_args(history: bool = False) -> str:
    """Lua ``HSET`` field/value arguments of an unpacked write ``w`` (``writer`` not
    included)."""
    return ", ".join(f"'{n}', w['{n}']" for n in (*TEXT_FIELDS, *binary_fields(history)))


_LUA_UNPACK = """
-- a packed write (gruserve.sessions.redis_store._packing) as a table of its named values. One
-- string.match takes every line (a loop of string.find cost twice as much Lua time per
-- write: bench/README.md, "Where a Redis step's time goes").
local names, binary = {NAMES}, {BINARY}
local function unpack_write(blob)
    local v = {string.match(blob, '{PATTERN}')}
    local w = {}
    for i, name in ipairs(names) do w[name] = v[i] end
    local pos = v[#names + 1]
    for _, name in ipairs(binary) do
        local size = tonumber(w[name .. '_bytes'])
        w[name] = string.sub(blob, pos, pos + size - 1)
        pos = pos + size
    end
    return w
end
"""
