"""A step's outputs as a session record keeps them for a retry: raw float32 and a small header.

Only steps that carry a step number store their result (``SessionRecord.last_result``),
written in the same atomic store write as the state they produced, so "applied" and
"result kept" can never disagree. The bytes are compact (a 10-byte header, 1 + 4 x ndim
bytes per output, then the values) rather than the JSON reply: every transport encodes
the same outputs its own way, so one stored form answers a retry on any of them.

Layout, little-endian::

    u8   format (1)
    u64  base: the step number the step carried (steps applied before it)
    u8   outputs
    per output: u8 ndim, ndim x u32 sizes
    every output's float32 values, row-major, in output order

>>> data = pack(4, [np.ones((2, 1), np.float32)])
>>> base_of(data), [a.tolist() for a in unpack(data)]
(4, [[[1.0], [1.0]]])
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

FORMAT = 1
_HEAD = struct.Struct("<BQB")


def pack(base: int, outputs: Sequence[np.ndarray]) -> bytes:
    """``outputs`` (each (T, D), (D,) or any shape) of the step that carried number ``base``."""
    parts = [_HEAD.pack(FORMAT, base, len(outputs))]
    parts.extend(struct.pack(f"<B{o.ndim}I", o.ndim, *o.shape) for o in outputs)
    parts.extend(o.astype("<f4", copy=False).tobytes() for o in outputs)
    return b"".join(parts)


def base_of(data: bytes | None) -> int | None:
    """The step number stored ``data`` answers, or None (nothing stored, unknown format)."""
    if not data or len(data) < _HEAD.size or data[0] != FORMAT:
        return None
    return int(_HEAD.unpack_from(data)[1])


def unpack(data: bytes) -> list[np.ndarray]:
    """The outputs :func:`pack` stored, as read-only float32 views of ``data``."""
    _, _, count = _HEAD.unpack_from(data)
    offset, shapes = _HEAD.size, []
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
