"""Cutting a series of (input, target) pairs into training batches.

Pair ``i`` is input row ``i`` with target row ``i + horizon``; the splits are
contiguous ranges of pairs in time order (train, then validation, then test).

- Stateless windows: ``window`` consecutive pairs. A model that returns
  sequences learns every step of the window, so the window must lie inside
  one split; a model that returns one vector learns the last step only, so
  its window may reach back into earlier inputs (observed history).
- Stateful streams (Keras ``stateful=True``): the training pairs are cut into
  ``batch_size`` contiguous streams, and batch ``k`` holds chunk ``k`` of every
  stream, so row ``i`` of batch ``k + 1`` continues row ``i`` of batch ``k``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


def window_starts(
    begin: int, end: int, window: int, stride: int, sequence_output: bool
) -> np.ndarray:
    """Start pairs of the windows whose learnt steps lie in pairs [begin, end)."""
    if sequence_output:
        first, last = begin, end - window
    else:
        first, last = max(begin - window + 1, 0), end - window
    if last < first:
        return np.zeros(0, np.int64)
    return np.arange(first, last + 1, stride, dtype=np.int64)


def gather(
    x: np.ndarray, y: np.ndarray, starts: np.ndarray, window: int, sequence_output: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Windows of inputs (n, window, F) and their targets ((n, window, D) or (n, D))."""
    index = starts[:, None] + np.arange(window)[None, :]
    inputs = x[index]
    targets = y[index] if sequence_output else y[starts + window - 1]
    return inputs, targets


@dataclass(frozen=True)
class ArrayBatches:
    """Keras's ``fit(x, y, batch_size, shuffle)``: batches of arrays, reshuffled each epoch.

    The last batch may be smaller, as in Keras.
    """

    x: np.ndarray
    y: np.ndarray
    batch_size: int
    shuffle: bool = False
    seed: int | None = None

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def epoch(self, number: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = np.arange(len(self.x))
        if self.shuffle:
            np.random.default_rng(None if self.seed is None else [self.seed, number]).shuffle(order)
        for begin in range(0, len(order), self.batch_size):
            index = order[begin : begin + self.batch_size]
            yield self.x[index], self.y[index]


@dataclass(frozen=True)
class StatefulBatches:
    """Consecutive chunks of ``streams`` parallel streams; never shuffled.

    Attributes:
        x: (streams, length, F) inputs, one row per stream.
        y: (streams, length, D) targets.
        window: timesteps per batch (the last chunk may be shorter).
    """

    x: np.ndarray
    y: np.ndarray
    window: int

    def __len__(self) -> int:
        return -(-self.x.shape[1] // self.window)

    def epoch(self, number: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        del number
        for begin in range(0, self.x.shape[1], self.window):
            yield self.x[:, begin : begin + self.window], self.y[:, begin : begin + self.window]


def stateful_streams(
    x: np.ndarray, y: np.ndarray, end: int, streams: int, window: int
) -> StatefulBatches:
    """Cut pairs [0, end) into ``streams`` equal contiguous streams.

    Pairs that do not divide evenly are dropped from the start, so the most
    recent training data is always used.
    """
    length = end // streams
    offset = end - streams * length
    xs = x[offset:end].reshape(streams, length, x.shape[-1])
    ys = y[offset:end].reshape(streams, length, y.shape[-1])
    return StatefulBatches(xs, ys, window)
