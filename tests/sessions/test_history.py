"""Kept inputs (``GRUSERVE_SESSION_HISTORY``): bounded, exact, and persisted by every store,
including records written before history existed and histories left by a time it was off."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gruserve.sessions import history, snapshot
from gruserve.sessions.memory import MemorySessionStore
from gruserve.sessions.redis_store import RedisSessionStore
from gruserve.sessions.store import SessionRecord


def _rows(start: int, count: int, width: int = 3) -> np.ndarray:
    return np.arange(start * width, (start + count) * width, dtype=np.float32).reshape(-1, width)


def test_appended_keeps_the_last_rows_exactly() -> None:
    kept = None
    for i in range(6):
        kept = history.appended(kept, _rows(4 * i, 4), None, 10)
    assert kept is not None
    got = history.read(kept)
    np.testing.assert_array_equal(got.inputs, _rows(14, 10))
    assert got.mask is None and len(kept) == 4 + 10 * 3 * 4  # header + float32 rows
    # one step longer than the limit keeps only its own last rows
    np.testing.assert_array_equal(
        history.read(history.appended(kept, _rows(0, 12), None, 5)).inputs, _rows(7, 5)
    )


def test_a_mask_column_appears_with_the_first_masked_step() -> None:
    kept = history.appended(None, _rows(0, 2), None, 8)
    kept = history.appended(kept, _rows(2, 3), np.array([True, False, True]), 8)
    kept = history.appended(kept, _rows(5, 1), None, 4)
    got = history.read(kept)
    np.testing.assert_array_equal(got.inputs, _rows(2, 4))
    assert got.mask is not None and got.mask.tolist() == [True, False, True, True]
    assert got.last(2).mask.tolist() == [True, True]  # type: ignore[union-attr]


def test_token_ids_and_a_new_width() -> None:
    ids = history.appended(None, np.array([3, 70000, 5], np.int64), None, 8)
    np.testing.assert_array_equal(history.read(ids).inputs[:, 0], [3, 70000, 5])
    # rows of another width (a version with other inputs) replace, never mix
    wider = history.appended(ids, _rows(0, 2), None, 8)
    np.testing.assert_array_equal(history.read(wider).inputs, _rows(0, 2))
    assert len(history.read(None)) == 0


def _record(sid: str, kept: bytes | None) -> SessionRecord:
    now = time.time()
    return SessionRecord(
        sid, "m", 1, np.ones(4, np.float32), created_at=now, last_used_at=now, history=kept
    )


async def _round_trip(store: Any) -> None:
    kept = history.appended(None, _rows(0, 3), np.array([True, False, True]), 8)
    await store.create(_record("h", kept))
    got = await store.get("h")
    assert got.history == kept
    later = got.advanced(
        got.state, 1, time.time(), None, history.appended(kept, _rows(3, 1), None, 8)
    )
    assert await store.compare_and_set(later, got.revision)
    assert (await store.get("h")).history == later.history


async def test_the_memory_store_keeps_history() -> None:
    await _round_trip(MemorySessionStore(60, 10))


async def test_redis_keeps_history_and_reads_older_records(redis_url: str) -> None:
    store = RedisSessionStore(redis_url, 60, 10, history=True)
    plain = RedisSessionStore(redis_url, 60, 10)  # a server with history off (or older)
    try:
        await _round_trip(store)
        # a record written without the field loads, with no history
        await plain.create(_record("old", None))
        assert (await store.get("old")).history is None
        # history off writes leave the field alone: what is left there is stale, not read
        current = await plain.get("h")
        assert current.history is None  # history off: never read
        assert await plain.compare_and_set(
            current.advanced(current.state, 1, time.time()), current.revision
        )
        assert (await store.get("h")).history is None
    finally:
        await store.close()
        await plain.close()


def test_snapshots_keep_history(tmp_path: Path) -> None:
    kept = history.appended(None, _rows(0, 5), None, 8)
    records = [_record("with", kept), _record("without", None)]
    path = tmp_path / "s.snapshot"
    snapshot.write(path, records)
    back = snapshot.read(path)
    assert [r.history for r in back] == [kept, None]
    assert [dataclasses.replace(r, state=None) for r in back] == [  # type: ignore[arg-type]
        dataclasses.replace(r, state=None)  # type: ignore[arg-type]
        for r in records
    ]


def test_snapshots_from_before_history_load(tmp_path: Path) -> None:
    """A header without ``history_bytes`` (written before it existed) still loads."""
    import hashlib
    import struct

    import orjson

    record = _record("older", None)
    entry = {
        "session_id": "older", "model": "m", "version": 1, "step": 0, "timesteps": 0,
        "revision": 0, "created_at": record.created_at, "last_used_at": record.last_used_at,
        "units": 4, "result_bytes": 0,
    }  # fmt: skip
    header = orjson.dumps({"written_at": time.time(), "sessions": [entry]})
    body = snapshot.MAGIC + struct.pack("<Q", len(header)) + header + record.state.tobytes()
    path = tmp_path / "old.snapshot"
    path.write_bytes(body + hashlib.sha256(body).digest())
    (back,) = snapshot.read(path)
    assert back.history is None and back.session_id == "older"


@pytest.mark.parametrize("limit", [1, 7])
def test_history_never_exceeds_its_limit(limit: int) -> None:
    rng = np.random.default_rng(limit)
    kept = None
    for _ in range(20):
        rows = rng.normal(size=(int(rng.integers(1, 5)), 2)).astype(np.float32)
        kept = history.appended(kept, rows, None, limit)
        assert len(history.read(kept)) <= limit
    assert len(history.read(kept)) == limit


async def test_a_redis_cluster_keeps_history(cluster_url: str) -> None:
    store = RedisSessionStore(cluster_url, 60, 100, history=True)
    try:
        await _round_trip(store)
        await store.create(_record("elsewhere-7", history.appended(None, _rows(0, 2), None, 4)))
        found = await store.get_many(["h", "elsewhere-7"])
        assert all(isinstance(r, SessionRecord) and r.history for r in found)
    finally:
        await store.close()
