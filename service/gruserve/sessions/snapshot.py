"""A file holding every session of a memory store, so a restart can pick them up again.

Opt-in (``GRUSERVE_SNAPSHOT_PATH``, memory store only): ``gruserve serve`` writes one on
a graceful shutdown and restores it on the next start. The format is plain data that
no loader can execute: a JSON header describing each session, then the states
(float32, little-endian) and stored step results as raw bytes, then a SHA-256 of
everything before it, so a truncated or altered file is refused as a whole::

    b"gruserve-snapshot 1\\n"
    u64  header length
    header (JSON): {"written_at": unix seconds, "sessions": [{"session_id", "model",
                   "version", "step", "timesteps", "revision", "created_at",
                   "last_used_at", "units", "result_bytes", "owner"?,
                   "history_bytes"?}, ...]}
    per session, in header order: units x float32, result_bytes bytes, then
                   history_bytes bytes (its kept inputs; 0 when absent)
    32 bytes: SHA-256 of all of the above

Writing is atomic: a temporary file in the same folder (mode 0600: states may be
sensitive), flushed to disk, then renamed over the target.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from gruserve.errors import SnapshotError
from gruserve.sessions.store import SessionRecord

MAGIC = b"gruserve-snapshot 1\n"
_LENGTH = struct.Struct("<Q")
_DIGEST = 32
_FIELDS = {
    "session_id": str,
    "model": str,
    "version": int,
    "step": int,
    "timesteps": int,
    "revision": int,
    "created_at": float,
    "last_used_at": float,
    "units": int,
    "result_bytes": int,
}
_OPTIONAL = {"owner": str, "history_bytes": int}
"""Fields a snapshot written before them lacks (read as their default)."""


def write(path: Path, records: Sequence[SessionRecord]) -> None:
    """Write ``records`` to ``path`` atomically (replacing any older snapshot).

    Raises:
        SnapshotError: the folder is missing or not writable, or the disk is full.
    """
    path = Path(path)
    header = {
        "written_at": time.time(),
        "sessions": [
            {
                "session_id": r.session_id,
                "model": r.model,
                "version": r.version,
                "step": r.step,
                "timesteps": r.timesteps,
                "revision": r.revision,
                "created_at": r.created_at,
                "last_used_at": r.last_used_at,
                "units": int(r.state.size),
                "result_bytes": len(r.last_result or b""),
                "owner": r.owner,
                "history_bytes": len(r.history or b""),
            }
            for r in records
        ],
    }
    text = orjson.dumps(header)
    digest = hashlib.sha256()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            for part in _parts(text, records):
                digest.update(part)
                out.write(part)
            out.write(digest.digest())
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise SnapshotError(path, f"cannot write it: {exc}") from exc


def _parts(text: bytes, records: Sequence[SessionRecord]) -> Any:
    yield MAGIC
    yield _LENGTH.pack(len(text))
    yield text
    for record in records:
        yield np.ascontiguousarray(record.state, "<f4").tobytes()
        if record.last_result:
            yield record.last_result
        if record.history:
            yield record.history


def read(path: Path) -> list[SessionRecord]:
    """The sessions a snapshot holds, exactly as written.

    Raises:
        SnapshotError: unreadable, not a snapshot, truncated or altered (the checksum).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SnapshotError(path, f"cannot read it: {exc}") from exc
    if not data.startswith(MAGIC):
        raise SnapshotError(path, "not a gruserve session snapshot (or a newer format)")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if len(data) < len(MAGIC) + _LENGTH.size + _DIGEST or (hashlib.sha256(body).digest() != digest):
        raise SnapshotError(path, "the checksum does not match: the file is truncated or altered")
    offset = len(MAGIC)
    (length,) = _LENGTH.unpack_from(body, offset)
    offset += _LENGTH.size
    try:
        header = orjson.loads(body[offset : offset + length])
        entries = header["sessions"]
    except (orjson.JSONDecodeError, TypeError, KeyError) as exc:
        raise SnapshotError(path, f"malformed header: {exc}") from None
    offset += length
    records = []
    for i, entry in enumerate(entries):
        _check(path, i, entry)
        state_end = offset + 4 * entry["units"]
        result_end = state_end + entry["result_bytes"]
        history_end = result_end + entry.get("history_bytes", 0)
        if history_end > len(body):
            raise SnapshotError(path, f"session {i} runs past the end of the data")
        records.append(
            SessionRecord(
                entry["session_id"],
                entry["model"],
                entry["version"],
                np.frombuffer(body, "<f4", entry["units"], offset).copy(),
                entry["step"],
                entry["timesteps"],
                entry["revision"],
                float(entry["created_at"]),
                float(entry["last_used_at"]),
                body[state_end:result_end] or None,
                str(entry.get("owner", "")),  # snapshots from before tenants have none
                body[result_end:history_end] or None,  # from before history: none
            )
        )
        offset = history_end
    if offset != len(body):
        raise SnapshotError(path, f"{len(body) - offset} bytes follow the last session")
    return records


def _check(path: Path, index: int, entry: Any) -> None:
    if not isinstance(entry, dict) or not set(_FIELDS) <= set(entry) <= {*_FIELDS, *_OPTIONAL}:
        raise SnapshotError(path, f"session {index}: expected the fields {sorted(_FIELDS)}")
    for name, kind in [*_FIELDS.items(), *_OPTIONAL.items()]:
        if name not in entry:
            continue
        value = entry[name]
        ok = type(value) in (int, float) if kind is float else type(value) is kind
        if not ok or (kind is int and value < 0):
            raise SnapshotError(path, f"session {index}: {name}={value!r} is not a valid {name}")
