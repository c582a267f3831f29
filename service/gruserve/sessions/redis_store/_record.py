"""A session record as one Redis hash field (``GRUSERVE_STORE_PACKED_RECORDS``, the default
from 0.2.0).

The older layout stores a record as ten hash fields, which costs Redis per write a Lua
split of the packed write (:mod:`._packing`) and a ``HSET`` of eleven fields, and
per read an ``HMGET`` of ten that the client turns into ten objects, then numbers
(bench/README.md, "Where a Redis step's time goes"). Packed, a record is one binary
``record`` field beside the two the compare-and-set needs as text (``revision`` and
``writer``): a write is a ``HSET`` of three fields whose value the script never looks into,
a read is an ``HMGET`` of two, and the client parses the record with one
:class:`struct.Struct` (no text numbers).

``record``: a fixed little-endian head, then the variable parts::

    u8 format (1) | i64 version, step, timesteps, revision | f64 created_at, last_used_at
    | u16 model bytes, owner bytes | u32 state bytes, result bytes
    | model | owner | state (float32 LE) | result

Mixed layouts, and why this is opt-in. Code before this module reads only the ten
fields: a packed record looks missing to it (404), so a server writing packed records
must not share a Redis with older replicas. Every server from this version on reads both
layouts, and its writes keep each hash in one layout (a packed write removes the ten
fields of a record written field by field; a field-by-field write leaves ``record``,
which a reader ignores while ``model`` is present). So: upgrade every replica, then turn
packed records on (a rolling restart is fine: the replicas still off read what the ones
already on write); turning it off again is just as safe. An older replica that writes
fields over a packed record (packed turned on too early) leaves both; readers then take
the fields, which that write made current.
"""

from __future__ import annotations

import struct

import numpy as np

from gruserve.sessions.store import SessionRecord

FORMAT = 1
"""The packed record's layout number (its first byte): a reader refuses others."""
_HEAD = struct.Struct("<BqqqqddHHII")
FIELD = "record"
"""The hash field holding a packed record."""
LEGACY_FIELDS = (
    "model",
    "version",
    "state",
    "step",
    "timesteps",
    "created_at",
    "last_used_at",
    "result",
    "owner",
)
"""The field-by-field layout's fields other than ``revision`` (which both layouts keep as
text for the compare-and-set): a packed write removes them."""
MODEL_AT = 1 + 4 * 8 + 2 * 8
"""Offset of the model name's length in the head (the listing script reads it)."""


def pack_record(record: SessionRecord) -> bytes:
    """``record`` (but its id and history, stored apart) as a ``record`` field's value."""
    model, owner = record.model.encode(), record.owner.encode()
    state = np.ascontiguousarray(record.state, "<f4").tobytes()
    result = record.last_result or b""
    head = _HEAD.pack(
        FORMAT,
        record.version,
        record.step,
        record.timesteps,
        record.revision,
        record.created_at,
        record.last_used_at,
        len(model),
        len(owner),
        len(state),
        len(result),
    )
    return b"".join((head, model, owner, state, result))


def unpack_record(session_id: str, blob: bytes) -> SessionRecord:
    """The record a ``record`` field holds (no history: the caller adds it).

    Raises:
        ValueError: the value is not a packed record of a known format.
    """
    if len(blob) < _HEAD.size or blob[0] != FORMAT:
        raise ValueError(
            f"session {session_id!r}: its Redis 'record' field is not a packed record of "
            f"format {FORMAT}. Received: {blob[:16]!r}"
        )
    (
        _,
        version,
        step,
        timesteps,
        revision,
        created_at,
        last_used_at,
        model_bytes,
        owner_bytes,
        state_bytes,
        result_bytes,
    ) = _HEAD.unpack_from(blob)
    at = _HEAD.size
    model = blob[at : at + model_bytes].decode()
    at += model_bytes
    owner = blob[at : at + owner_bytes].decode()
    at += owner_bytes
    state = np.frombuffer(blob, "<f4", state_bytes // 4, at)
    at += state_bytes
    return SessionRecord(
        session_id,
        model,
        version,
        state,
        step,
        timesteps,
        revision,
        created_at,
        last_used_at,
        blob[at : at + result_bytes] or None,
        owner,
    )


def packed_record_write(
    record: SessionRecord,
    expected: int,
    deadline_ms: int,
    end: bool,
    history: bytes | None = None,
    base: str = "",
) -> bytes:
    """One write of the packed layout's compare-and-set script: five text lines (expected
    revision, lifetime deadline in ms, end flag, new revision, base writer), with
    ``history`` a sixth (its length), then the packed record, then the history value.

    Args:
        record: the record to store.
        expected: the revision the writer read (-1: create if the id is free).
        deadline_ms: the lifetime deadline in Unix ms (0: none).
        end: remove the session instead of storing it.
        history: None (history off: the field is left as it is), or the ``history``
            field's value (:data:`._packing.HISTORY_FIELD`; empty: nothing kept).
        base: the ``writer`` the stored hash must also hold (empty: not checked), as in
            :func:`._packing.packed_write`.
    """
    packed = pack_record(record)
    fixed = (expected, deadline_ms, end, record.revision, base.encode())
    if history is None:
        return b"%d\n%d\n%d\n%d\n%s\n" % fixed + packed
    head = b"%d\n%d\n%d\n%d\n%s\n%d\n" % (*fixed, len(history))
    return head + packed + history


def lua_cas(history: bool = False) -> str:
    """The packed layout's compare-and-set loop (the store puts its index helpers and
    ``now`` before it); with ``history``, each write carries the ``history`` field too."""
    lines = 6 if history else 5
    pattern = "^" + "([^\\n]*)\\n" * lines + "()"
    if history:
        values = (
            "local n = #a - tonumber(hlen)\n"
            "    redis.call('HSET', key, 'record', string.sub(a, at, n), 'revision', revision,\n"
            "        'writer', writer, 'history', string.sub(a, n + 1))"
        )
    else:
        values = (
            "redis.call('HSET', key, 'record', string.sub(a, at), 'revision', revision,\n"
            "        'writer', writer)"
        )
    legacy = ", ".join(f"'{name}'" for name in LEGACY_FIELDS)
    return (
        _LUA_CAS.replace("{PATTERN}", pattern)
        .replace("{HLEN}", ", hlen" if history else "")
        .replace("{HSET}", values)
        .replace("{LEGACY}", legacy)
    )


_LUA_CAS = """
-- KEYS[4..] the sessions' hashes; ARGV[1] ttl_ms, ARGV[2] max_sessions, ARGV[3] lru,
-- ARGV[4] hash key prefix, ARGV[5] a random token of this call, then one write per key
-- (gruserve.sessions.redis_store._record.packed_record_write). Answers as the field-by-field
-- layout's script does.
local ttl, out = tonumber(ARGV[1]), {}
local ended, evicted = {{}, {}}, {}
local skip = #ARGV[4] + 1
local function store(key, a, at{HLEN}, revision, writer, legacy)
    if legacy then redis.call('HDEL', key, {LEGACY}) end  -- one layout per hash
    {HSET}
end
for i = 4, #KEYS do
    local key, a = KEYS[i], ARGV[i + 2]
    local expected, deadline, stop, revision, base{HLEN}, at = string.match(a, '{PATTERN}')
    local id = string.sub(key, skip)
    local writer = ARGV[5] .. ':' .. i  -- unique per write, and the same when it is retried
    local cur = redis.call('HMGET', key, 'revision', 'writer', 'model')
    if not cur[1] then
        if expected ~= '-1' then
            out[#out + 1] = -1
        elseif stop == '1' then  -- created and ended at once: nothing to keep
            out[#out + 1] = 1
        elseif make_room(tonumber(ARGV[2]), ARGV[3], now, ARGV[4], evicted, ended) then
            store(key, a, at{HLEN}, revision, writer, false)
            expire(key, id, now, ttl, tonumber(deadline))
            fresh[#fresh + 1] = 0
            fresh[#fresh + 1] = id
            out[#out + 1] = 1
        else
            out[#out + 1] = -2
        end
    elseif cur[1] ~= expected or (base ~= '' and cur[2] ~= base) then
        if cur[1] == revision and cur[2] == writer then
            out[#out + 1] = 1
        else
            out[#out + 1] = 0
        end
    elseif stop == '1' then
        forget({id}, ARGV[4])
        out[#out + 1] = 1
    else
        store(key, a, at{HLEN}, revision, writer, cur[3])
        expire(key, id, now, ttl, tonumber(deadline))
        out[#out + 1] = 1
    end
end
flush()
return {out, evicted, ended[1], ended[2]}
"""


def lua_read(fields: tuple[str, ...], history: bool = False) -> str:
    """The packed layout's read script: per key ``{record, nil[, history]}`` for a packed
    record, else the ``HMGET`` of ``fields`` (a record written field by field, or none)."""
    packed = "'record', 'model'" + (", 'history'" if history else "")
    return _LUA_READ.replace("{PACKED}", packed).replace(
        "{FIELDS}", ", ".join(f"'{name}'" for name in fields)
    )


_LUA_READ = """
local out = {}
for i, key in ipairs(KEYS) do
    local v = redis.call('HMGET', key, {PACKED})
    if v[1] and not v[2] then
        out[i] = v
    else
        out[i] = redis.call('HMGET', key, {FIELDS})
    end
end
return out
"""

LUA_MODEL = f"""
-- the model name in a packed record (gruserve.sessions.redis_store._record)
local function packed_model(rec)
    local n = string.byte(rec, {MODEL_AT + 1}) + 256 * string.byte(rec, {MODEL_AT + 2})
    return string.sub(rec, {_HEAD.size + 1}, {_HEAD.size} + n)
end
"""
"""Lua defining ``packed_model(rec)``, for the listing's model filter."""
