"""Packed records: one hash field per session, readable beside the field-by-field layout."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis
from redis.typing import EncodableT, FieldT

from gruserve.sessions.redis_store import RedisSessionStore
from gruserve.sessions.redis_store._keyspace import Keyspace
from gruserve.sessions.redis_store._record import pack_record, packed_record_write, unpack_record
from gruserve.sessions.redis_store._scripts import scripts as _scripts
from gruserve.sessions.store import CREATE, SessionRecord

PREFIX = "record:"
FIELDS = {
    b"model", b"version", b"state", b"step", b"timesteps", b"revision",
    b"created_at", b"last_used_at", b"result", b"owner", b"writer",
}  # fmt: skip
"""The field-by-field layout's hash (what servers before packed records write)."""


def _record(sid: str, state: np.ndarray, result: bytes | None = None) -> SessionRecord:
    now = time.time()
    return SessionRecord(sid, "m.1", 2, state, 3, 40, 5, now - 0.123456789, now, result, "acme")


def _same(a: SessionRecord, b: SessionRecord) -> bool:
    """Equal records, states compared by their bytes (arrays do not compare with ``==``)."""
    fields = ("session_id", "model", "version", "step", "timesteps", "revision")
    more = ("created_at", "last_used_at", "last_result", "owner", "history")
    return all(getattr(a, f) == getattr(b, f) for f in (*fields, *more)) and (
        a.state.astype("<f4").tobytes() == b.state.astype("<f4").tobytes()
    )


def test_a_record_packs_and_unpacks_exactly() -> None:
    """Every byte of a state and a result (newlines, NUL), empty ones, full-precision
    timestamps, a non-ASCII owner and huge counters come back as written."""
    awkward = np.frombuffer(bytes(range(256)) * 2 + b"\n\n\n\n", "<f4").copy()
    cases = [
        _record("a", awkward, b"\n\x00" + bytes(range(256))),
        _record("b", np.zeros(0, np.float32)),
        SessionRecord("c", "x", 2**40, np.ones(3, np.float32), 2**62, 7, 2**61, 1.5, 2.25),
        SessionRecord("d", "m", 1, np.ones(1, np.float32), owner="zürich"),
    ]
    for record in cases:
        assert _same(unpack_record(record.session_id, pack_record(record)), record)


def test_an_unknown_format_is_refused_by_name() -> None:
    packed = pack_record(_record("s", np.zeros(2, np.float32)))
    with pytest.raises(ValueError, match="'record' field"):
        unpack_record("s", b"\x02" + packed[1:])
    with pytest.raises(ValueError, match="format 1"):
        unpack_record("s", packed[:10])


async def test_packed_and_field_writers_read_and_step_on_each_others_records(
    redis_url: str,
) -> None:
    """Replicas writing packed records and replicas writing fields share sessions: each
    reads what the other wrote and steps on; every write leaves the hash in its own layout
    (a packed write removes the fields), and a listing shows both."""
    client = redis.Redis.from_url(redis_url)
    packed = RedisSessionStore(redis_url, 60.0, 100, prefix=PREFIX, packed=True)
    fields = RedisSessionStore(redis_url, 60.0, 100, prefix=PREFIX, packed=False)
    try:
        record = _record("s", np.arange(4, dtype=np.float32), b"r")
        assert await packed.compare_and_set(record, CREATE)
        assert set(client.hgetall(f"{PREFIX}session:s")) == {b"record", b"revision", b"writer"}
        assert _same(await fields.get("s"), record) and _same(await packed.get("s"), record)

        step = record.advanced(record.state + 1, 2, time.time(), b"r2")
        assert await fields.compare_and_set(step, 5)
        assert set(client.hgetall(f"{PREFIX}session:s")) >= FIELDS
        assert _same(await packed.get("s"), step) and _same(await fields.get("s"), step)

        again = step.advanced(step.state * 2, 1, time.time())
        assert not await packed.compare_and_set(again, 5)  # stale: the fields write won
        assert await packed.compare_and_set(again, 6)
        assert set(client.hgetall(f"{PREFIX}session:s")) == {b"record", b"revision", b"writer"}
        assert _same(await fields.get("s"), again)

        assert await fields.compare_and_set(_record("f", np.ones(2, np.float32)), CREATE)
        for store in (packed, fields):
            page = await store.page(None, 10, "m.1")
            listed = [(s.session_id, s.step, s.timesteps, s.last_used_at) for s in page.sessions]
            assert listed == [("f", 3, 40, listed[0][3]), ("s", 5, 43, again.last_used_at)]
            assert (await store.page(None, 10, "other")).sessions == []
            assert await store.count() == 2
    finally:
        client.close()
        await packed.close()
        await fields.close()


async def test_fields_an_older_server_wrote_over_a_packed_record_win(redis_url: str) -> None:
    """An older server (packed records turned on too early) writes its fields over a packed
    record and leaves the ``record`` field: readers take the fields, which are newer, and
    the next packed write makes the hash packed again."""
    client = redis.Redis.from_url(redis_url)
    packed = RedisSessionStore(redis_url, 60.0, 100, prefix=PREFIX, packed=True)
    fields = RedisSessionStore(redis_url, 60.0, 100, prefix=PREFIX, packed=False)
    try:
        record = _record("old", np.zeros(2, np.float32))
        assert await packed.compare_and_set(record, CREATE)
        older: dict[FieldT, EncodableT] = {
            "model": "m.1", "version": 2, "state": np.full(2, 7, "<f4").tobytes(), "step": 4,
            "timesteps": 41, "revision": 6, "created_at": repr(record.created_at),
            "last_used_at": "2.5", "result": b"", "owner": "acme", "writer": "0123456789abcdef",
        }  # fmt: skip
        client.hset(f"{PREFIX}session:old", mapping=older)  # as the previous code writes
        for store in (packed, fields):
            got = await store.get("old")
            assert (got.step, got.revision, got.last_used_at, got.state.tolist()) == (
                4, 6, 2.5, [7.0, 7.0],
            )  # fmt: skip
        got = await packed.get("old")
        assert await packed.compare_and_set(got.advanced(got.state + 1, 1, time.time()), 6)
        assert set(client.hgetall(f"{PREFIX}session:old")) == {b"record", b"revision", b"writer"}
        assert (await fields.get("old")).state.tolist() == [8.0, 8.0]
    finally:
        client.close()
        await packed.close()
        await fields.close()


async def test_a_resent_packed_call_finds_each_write_its_own(redis_url: str) -> None:
    """As with fields: the same call sent again finds every write made by itself (1), a call
    with another token that read the same revisions lost the race (0)."""
    client = redis.Redis.from_url(redis_url)
    bucket = Keyspace(PREFIX).buckets[0]
    script = _scripts(history=False, packed=True)[0]
    try:
        records = [_record(f"w{i}", np.zeros(2, np.float32)) for i in range(3)]
        create = [packed_record_write(r, CREATE, 0, False) for r in records]
        keys = [*bucket.sets, *(bucket.session_key(r.session_id) for r in records)]
        head: list[EncodableT] = [60_000, 100, 0, bucket.prefix]
        assert client.eval(script, len(keys), *keys, *head, "t1", *create)[0] == [1] * 3
        now = time.time()
        step = [packed_record_write(r.advanced(r.state + 1, 1, now), 5, 0, False) for r in records]
        assert client.eval(script, len(keys), *keys, *head, "t2", *step)[0] == [1] * 3
        assert client.eval(script, len(keys), *keys, *head, "t2", *step)[0] == [1] * 3
        assert client.eval(script, len(keys), *keys, *head, "t3", *step)[0] == [0] * 3
        assert [client.hget(k, "revision") for k in keys[3:]] == [b"6"] * 3
        assert client.zcard(bucket.sets[0]) == 3 and client.zcard(bucket.sets[2]) == 3
    finally:
        client.close()


async def test_packed_history_is_kept_and_a_stale_one_dropped(redis_url: str) -> None:
    """With history on, a packed write keeps the inputs beside the record; a later write
    by a replica with history off leaves them, and readers take them as stale."""
    with_history = RedisSessionStore(redis_url, 60.0, 100, prefix=PREFIX, packed=True, history=True)
    without = RedisSessionStore(redis_url, 60.0, 100, prefix=PREFIX, packed=True)
    try:
        record = _record("h", np.zeros(2, np.float32))
        kept = record.advanced(record.state, 1, time.time(), None, b"\x00kept\n")
        assert await with_history.compare_and_set(record, CREATE)
        assert await with_history.compare_and_set(kept, 5)
        assert (await with_history.get("h")).history == b"\x00kept\n"
        assert await without.compare_and_set(kept.advanced(kept.state, 1, time.time()), 6)
        assert (await with_history.get("h")).history is None
    finally:
        await with_history.close()
        await without.close()


@pytest.mark.parametrize(("value", "layout"), [(None, "packed"), ("false", "fields")])
async def test_a_server_writes_packed_records_unless_told_otherwise(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, value: str | None, layout: str
) -> None:
    """0.2.0's default: the store a server builds from its settings writes packed records;
    ``GRUSERVE_STORE_PACKED_RECORDS=false`` (a fleet upgrading from 0.1.0) writes fields."""
    from gruserve.server import build_store
    from gruserve.settings import Settings

    monkeypatch.delenv("GRUSERVE_STORE_PACKED_RECORDS", raising=False)
    if value is not None:
        monkeypatch.setenv("GRUSERVE_STORE_PACKED_RECORDS", value)
    store = build_store(Settings(session_store=redis_url))
    client = redis.Redis.from_url(redis_url)
    try:
        assert await store.compare_and_set(_record("d", np.zeros(2, np.float32)), CREATE)
        [key] = client.keys("*session:d")
        stored = set(client.hgetall(key))
        assert stored == ({b"record", b"revision", b"writer"} if layout == "packed" else FIELDS)
    finally:
        client.close()
        await store.close()
