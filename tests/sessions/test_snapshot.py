"""Session snapshots: exact round trip, atomic writes, and any damage refused as a whole."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest

from gruserve.errors import SnapshotError
from gruserve.sessions import _result, snapshot
from gruserve.sessions.store import SessionRecord


def _records() -> list[SessionRecord]:
    now = time.time()
    rng = np.random.default_rng(5)
    return [
        SessionRecord(
            f"s-{i}",
            "demo" if i % 2 else "other",
            i + 1,
            rng.normal(size=16 + i).astype(np.float32),
            step=3 * i,
            timesteps=7 * i,
            revision=4 * i,
            created_at=now - 100 + i,
            last_used_at=now - i / 3,
            last_result=_result.pack(3 * i - 1, [np.full((2, 1), i, np.float32)], bytes(16))
            if i
            else None,
            owner="acme" if i % 3 else "",
        )
        for i in range(5)
    ]


def test_round_trip_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "sessions.snapshot"
    records = _records()
    snapshot.write(path, records)
    back = snapshot.read(path)
    assert len(back) == len(records)
    for got, want in zip(back, records, strict=True):
        assert got.state.dtype == np.float32 and got.state.tobytes() == want.state.tobytes()
        assert got.last_result == want.last_result
        for field in ("session_id", "model", "version", "step", "timesteps", "revision",
                      "created_at", "last_used_at", "owner"):  # fmt: skip
            assert getattr(got, field) == getattr(want, field), field
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # states may be sensitive
    assert [p.name for p in tmp_path.iterdir()] == ["sessions.snapshot"]  # no temporary left
    snapshot.write(path, [])
    assert snapshot.read(path) == []


def test_a_new_snapshot_replaces_the_old_one_whole(tmp_path: Path) -> None:
    path = tmp_path / "sessions.snapshot"
    snapshot.write(path, _records())
    snapshot.write(path, _records()[:1])
    assert [r.session_id for r in snapshot.read(path)] == ["s-0"]


@pytest.mark.parametrize(
    "damage",
    ["flip a state byte", "truncate", "append", "not a snapshot", "empty"],
)
def test_damage_is_refused(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "sessions.snapshot"
    snapshot.write(path, _records())
    data = bytearray(path.read_bytes())
    if damage == "flip a state byte":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        del data[-40:]
    elif damage == "append":
        data += b"\0"
    elif damage == "not a snapshot":
        data = bytearray(b'{"sessions": []}')
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=str(path)):
        snapshot.read(path)


def test_a_header_that_lies_is_refused_even_with_a_valid_checksum(tmp_path: Path) -> None:
    """The checksum guards against accidents; the reader trusts no field either way."""
    import hashlib
    import struct

    header = (
        b'{"written_at": 0, "sessions": [{"session_id": "x", "model": "m", "version": 1, '
        b'"step": 0, "timesteps": 0, "revision": 0, "created_at": 0, "last_used_at": 0, '
        b'"units": 1000000, "result_bytes": 0}]}'
    )
    body = snapshot.MAGIC + struct.pack("<Q", len(header)) + header + b"\0" * 16
    path = tmp_path / "lying.snapshot"
    path.write_bytes(body + hashlib.sha256(body).digest())
    with pytest.raises(SnapshotError, match="past the end"):
        snapshot.read(path)
    header = header.replace(b'"units": 1000000', b'"units": -4')
    body = snapshot.MAGIC + struct.pack("<Q", len(header)) + header
    path.write_bytes(body + hashlib.sha256(body).digest())
    with pytest.raises(SnapshotError, match="units=-4"):
        snapshot.read(path)
    # a snapshot written before tenants has no owner: read as "" (the unnamed tenant's)
    header = header.replace(b'"units": -4', b'"units": 1')
    body = snapshot.MAGIC + struct.pack("<Q", len(header)) + header + b"\0" * 4
    path.write_bytes(body + hashlib.sha256(body).digest())
    assert [r.owner for r in snapshot.read(path)] == [""]
    header = header.replace(b'"units": 1', b'"units": 1, "owner": 7')
    body = snapshot.MAGIC + struct.pack("<Q", len(header)) + header + b"\0" * 4
    path.write_bytes(body + hashlib.sha256(body).digest())
    with pytest.raises(SnapshotError, match="owner=7"):
        snapshot.read(path)


def test_an_unwritable_place_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="cannot write"):
        snapshot.write(tmp_path / "missing-folder" / "sessions.snapshot", _records())
    if os.geteuid() != 0:  # root writes anywhere
        tmp_path.chmod(0o500)
        try:
            with pytest.raises(SnapshotError):
                snapshot.write(tmp_path / "sessions.snapshot", _records())
        finally:
            tmp_path.chmod(0o700)
    assert list(tmp_path.iterdir()) == []
