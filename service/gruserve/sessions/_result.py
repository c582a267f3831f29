"""A step's outputs as a session record keeps them for a retry: raw float32, a small header,
and a digest of the step's inputs.

Only steps that carry a step number store their result (``SessionRecord.last_result``),
written in the same atomic store write as the state they produced, so "applied" and
"result kept" can never disagree. The bytes are compact (a 26-byte header, 1 + 4 x ndim
bytes per output, then the values) rather than the JSON reply: every transport encodes
the same outputs its own way, so one stored form answers a retry on any of them.

The digest (:func:`digest`, of the step's checked inputs and mask) lets a resend be told
from a different step that carries the same number: only the same payload gets the kept
result back. It lives inside these bytes, so the stores keep one field as before.

Layout, little-endian::

    u8   format (2; format 1, written before the digest, has no digest field)
    u64  base: the step number the step carried (steps applied before it)
    u8   outputs
    16 bytes  the digest of the step's inputs (format 2 only)
    per output: u8 ndim, ndim x u32 sizes
    every output's float32 values, row-major, in output order

>>> data = pack(4, [np.ones((2, 1), np.float32)], bytes(16))
>>> base_of(data), [a.tolist() for a in unpack(data)], digest_of(data) == bytes(16)
(4, [[[1.0], [1.0]]], True)
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np

FORMAT = 2
_HEADS = {1: struct.Struct("<BQB"), 2: struct.Struct("<BQB16s")}
DIGEST_BYTES = 16


def digest(inputs: np.ndarray, mask: np.ndarray | None, single: bool) -> bytes:
    """What a step applied, in 16 bytes: its checked inputs (dtype, shape, values), whether
    it dropped the time axis, and its mask (all true counts as no mask: the same step)."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    h.update(f"{inputs.dtype.str}{inputs.shape}{int(single)}".encode())
    h.update(np.ascontiguousarray(inputs).tobytes())
    if mask is not None and not mask.all():
        h.update(b"mask")
        h.update(np.ascontiguousarray(mask, np.bool_).tobytes())
    return h.digest()


def pack(base: int, outputs: Sequence[np.ndarray], applied: bytes) -> bytes:
    """``outputs`` (each (T, D), (D,) or any shape) of the step that carried number ``base``
    and whose inputs had :func:`digest` ``applied``."""
    if len(applied) != DIGEST_BYTES:
        raise ValueError(f"pack needs a {DIGEST_BYTES}-byte digest. Received: {applied!r}")
    parts = [_HEADS[FORMAT].pack(FORMAT, base, len(outputs), applied)]
    parts.extend(struct.pack(f"<B{o.ndim}I", o.ndim, *o.shape) for o in outputs)
    parts.extend(o.astype("<f4", copy=False).tobytes() for o in outputs)
    return b"".join(parts)


def _head(data: bytes | None) -> struct.Struct | None:
    head = _HEADS.get(data[0]) if data else None
    return head if head is not None and data is not None and len(data) >= head.size else None


def base_of(data: bytes | None) -> int | None:
    """The step number stored ``data`` answers, or None (nothing stored, unknown format)."""
    head = _head(data)
    return None if head is None or data is None else int(head.unpack_from(data)[1])


def digest_of(data: bytes | None) -> bytes | None:
    """The digest of the inputs stored ``data`` answers, or None (format 1 kept none)."""
    head = _head(data)
    if head is None or data is None or data[0] < 2:
        return None
    return bytes(head.unpack_from(data)[3])


def unpack(data: bytes) -> list[np.ndarray]:
    """The outputs :func:`pack` stored, as read-only float32 views of ``data``."""
    head = _HEADS[data[0]]
    count = head.unpack_from(data)[2]
    offset, shapes = head.size, []
    for _ in range(count):
        ndim = data[offset]
        shapes.append(struct.unpack_from(f"<{ndim}I", data, offset + 1))
        offset += 1 + 4 * ndim
    arrays = []
    for shape in shapes:
        size = int(np.prod(shape, dtype=np.int64))
        arrays.append(np.frombuffer(data, "<f4", size, offset).reshape(shape))
        offset += 4 * size
    return arrays
