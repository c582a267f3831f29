"""A write travels as one packed value and lands as the same hash fields as before."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis
from redis.typing import EncodableT, FieldT

from gruserve.errors import SessionNotFound
from gruserve.sessions.redis_store import RedisSessionStore
from gruserve.sessions.redis_store._keyspace import Keyspace
from gruserve.sessions.redis_store._packing import packed_write
from gruserve.sessions.redis_store._scripts import scripts
from gruserve.sessions.store import CREATE, SessionRecord

PREFIX = "packing:"
FIELDS_WRITE = scripts(history=False, packed=False)[0]
"""The write script of the field-by-field layout, which these writes are packed for."""


def _record(sid: str, state: np.ndarray, result: bytes | None) -> SessionRecord:
    now = time.time()
    return SessionRecord(sid, "m.1", 2, state, 3, 40, 5, now - 0.123456789, now, result, "acme")


async def test_every_byte_and_number_comes_back_exactly(redis_url: str) -> None:
    """States and results holding the separator (``\\n``), NUL and every other byte, empty
    ones, and full-precision timestamps read back as written: the script splits by the
    stated lengths, never by searching the binary part."""
    awkward = np.frombuffer(bytes(range(256)) * 2 + b"\n\n\n\n", "<f4").copy()
    cases = {
        "bytes": (awkward, b"\n\x00" + bytes(range(256)) + b"\n"),
        "empty-result": (np.arange(3, dtype=np.float32), None),
        "no-state": (np.zeros(0, np.float32), b"{}"),
    }
    store = RedisSessionStore(redis_url, 60.0, 100, prefix=PREFIX)
    try:
        for sid, (state, result) in cases.items():
            record = _record(sid, state, result)
            assert await store.compare_and_set(record, CREATE)
            got = await store.get(sid)
            assert got.state.tobytes() == state.tobytes()
            assert got == _same_but_state(record, got.state)
            advanced = got.advanced(state[::-1].copy(), 2, time.time(), result)
            assert await store.compare_and_set(advanced, got.revision)
            again = await store.get(sid)
            assert again.state.tobytes() == state[::-1].tobytes()
            assert again == _same_but_state(advanced, again.state)
    finally:
        await store.close()


def _same_but_state(record: SessionRecord, state: np.ndarray) -> SessionRecord:
    """``record`` with ``state`` (arrays do not compare with ``==``)."""
    return SessionRecord(
        record.session_id,
        record.model,
        record.version,
        state,
        record.step,
        record.timesteps,
        record.revision,
        record.created_at,
        record.last_used_at,
        record.last_result,
        record.owner,
    )


async def test_the_hash_layout_is_unchanged_and_older_records_step_on(redis_url: str) -> None:
    """The script stores the fields the earlier layout had, as text numbers; a record
    written field by field as the previous code wrote it reads and advances."""
    client = redis.Redis.from_url(redis_url)
    store = RedisSessionStore(redis_url, 60.0, 100, prefix=PREFIX, packed=False)
    try:
        record = _record("new", np.arange(4, dtype=np.float32), b"r")
        assert await store.compare_and_set(record, CREATE)
        stored = client.hgetall(f"{PREFIX}session:new")
        assert set(stored) == {
            b"model", b"version", b"state", b"step", b"timesteps", b"revision",
            b"created_at", b"last_used_at", b"result", b"owner", b"writer",
        }  # fmt: skip
        assert stored[b"step"] == b"3" and stored[b"revision"] == b"5"
        assert stored[b"created_at"] == repr(record.created_at).encode()
        assert stored[b"state"] == record.state.astype("<f4").tobytes()

        old: dict[FieldT, EncodableT] = {k: v for k, v in stored.items()}  # typed as hset takes it
        old["writer"] = b"0123456789abcdef"  # the previous code's token
        client.hset(f"{PREFIX}session:old", mapping=old)
        got = await store.get("old")
        assert (got.step, got.revision, got.owner, got.last_result) == (3, 5, "acme", b"r")
        assert await store.compare_and_set(got.advanced(got.state + 1, 1, time.time()), 5)
        assert (await store.get("old")).revision == 6
    finally:
        client.close()
        await store.close()


async def test_a_resent_call_finds_each_write_its_own(redis_url: str) -> None:
    """The script makes one writer token per write of a call: the same call sent again (a
    retry after a lost reply) finds every write already made by itself (1), while a call
    with another token that read the same revisions lost the race (0)."""
    client = redis.Redis.from_url(redis_url)
    bucket = Keyspace(PREFIX).buckets[0]
    try:
        records = [_record(f"w{i}", np.zeros(2, np.float32), None) for i in range(3)]
        create = [packed_write(r, CREATE, 0, False) for r in records]
        keys = [*bucket.sets, *(bucket.session_key(r.session_id) for r in records)]
        head: list[EncodableT] = [60_000, 100, 0, bucket.prefix]
        assert client.eval(FIELDS_WRITE, len(keys), *keys, *head, "t1", *create)[0] == [1] * 3
        now = time.time()
        step = [packed_write(r.advanced(r.state + 1, 1, now), 5, 0, False) for r in records]
        assert client.eval(FIELDS_WRITE, len(keys), *keys, *head, "t2", *step)[0] == [1] * 3
        assert client.eval(FIELDS_WRITE, len(keys), *keys, *head, "t2", *step)[0] == [1] * 3
        assert client.eval(FIELDS_WRITE, len(keys), *keys, *head, "t3", *step)[0] == [0] * 3
        assert [client.hget(k, "revision") for k in keys[3:]] == [b"6"] * 3
    finally:
        client.close()


def test_a_newline_in_a_text_field_is_refused() -> None:
    record = _record("s", np.zeros(2, np.float32), None)
    bad = SessionRecord(record.session_id, "m\nx", 1, record.state)
    packed_write(record, 0, 0, False)  # fine
    with pytest.raises(ValueError, match="newlines"):
        packed_write(bad, 0, 0, False)


async def test_a_record_without_owner_or_result_reads_as_none(redis_url: str) -> None:
    """A hash written before tenants and before results (no ``owner``, no ``result``
    field) reads back with no owner and no result; a missing id
    is SessionNotFound, next to a found one in the same wave."""
    client = redis.Redis.from_url(redis_url)
    store = RedisSessionStore(redis_url, 60.0, 100, prefix=PREFIX)
    try:
        state = np.frombuffer(b"\n" * 8, "<f4")
        fields: dict[FieldT, EncodableT] = {
            "model": "m.1", "version": 2, "state": state.tobytes(), "step": 3,
            "timesteps": 40, "revision": 5, "created_at": "1.5", "last_used_at": "2.25",
        }  # fmt: skip
        client.hset(f"{PREFIX}session:bare", mapping=fields)
        got, missing = await store.get_many(["bare", "absent"])
        assert isinstance(got, SessionRecord) and isinstance(missing, SessionNotFound)
        assert (got.owner, got.last_result, got.history) == ("", None, None)
        assert (got.step, got.timesteps, got.revision) == (3, 40, 5)
        assert (got.created_at, got.last_used_at) == (1.5, 2.25)
        assert got.state.tobytes() == state.tobytes()
    finally:
        client.close()
        await store.close()
