"""A session's recent inputs, kept so that it can be moved to another model version warm.

With ``GRUSERVE_SESSION_HISTORY`` = N > 0 every step appends its timesteps to the
record's ``history`` and drops all but the last N; an upgrade with ``replay: W`` then
runs the new version over the last W of them (:mod:`gruserve.sessions.upgrade`). With
N = 0 nothing here runs and records carry no history.

The form is compact bytes, so that both stores keep it as one value::

    u16 width, u8 masked, u8 0   (a 4-byte header, so the rows are 4-byte aligned)
    rows x width float32, little-endian

A row is one timestep: its features (a token-id model's id, which float32 holds exactly
below 2**24), then, when ``masked``, 1.0 or 0.0 for the timestep's mask value. The mask
column appears with the first masked step; earlier rows get 1.0 (they were applied).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

_HEADER = struct.Struct("<HBx")


@dataclass(frozen=True, slots=True)
class Kept:
    """The timesteps a history holds, oldest first.

    Attributes:
        inputs: (timesteps, features) float32 (token ids as float32, (timesteps, 1)).
        mask: (timesteps,) bool, or None when no kept step had a mask.
    """

    inputs: np.ndarray
    mask: np.ndarray | None

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def last(self, count: int) -> Kept:
        """The last ``count`` timesteps (0: none)."""
        start = len(self) - count
        return Kept(self.inputs[start:], None if self.mask is None else self.mask[start:])


EMPTY = Kept(np.zeros((0, 0), np.float32), None)


def read(history: bytes | None) -> Kept:
    """The timesteps a record's ``history`` holds (:data:`EMPTY` for None)."""
    if not history:
        return EMPTY
    width, masked = _HEADER.unpack_from(history)
    rows = np.frombuffer(history, "<f4", offset=_HEADER.size).reshape(-1, width + masked)
    if not masked:
        return Kept(rows, None)
    return Kept(rows[:, :-1], rows[:, -1] != 0.0)


def appended(
    history: bytes | None, inputs: np.ndarray, mask: np.ndarray | None, limit: int
) -> bytes:
    """``history`` with a step's timesteps added at the end, keeping the last ``limit``.

    Args:
        history: the record's history, or None.
        inputs: the step's checked inputs, (T, F) float32 or (T,) token ids.
        mask: (T,) bool, or None.
        limit: most timesteps kept (>= 1).

    A history of another width (the session moved to a version with other inputs) is
    dropped rather than mixed with the new rows.
    """
    rows = np.asarray(inputs, "<f4").reshape(inputs.shape[0], -1)
    width = rows.shape[1]
    kept = read(history)
    if len(kept) and kept.inputs.shape[1] != width:
        kept = EMPTY
    if mask is None and kept.mask is None:
        block = np.concatenate([kept.inputs, rows]) if len(kept) else rows
        return _HEADER.pack(width, 0) + np.ascontiguousarray(block[-limit:]).tobytes()
    old_mask = kept.mask if kept.mask is not None else np.ones(len(kept), bool)
    new_mask = mask if mask is not None else np.ones(rows.shape[0], bool)
    block = np.empty((len(kept) + rows.shape[0], width + 1), "<f4")
    if len(kept):
        block[: len(kept), :width] = kept.inputs
    block[len(kept) :, :width] = rows
    block[:, width] = np.concatenate([old_mask, new_mask])
    return _HEADER.pack(width, 1) + block[-limit:].tobytes()
