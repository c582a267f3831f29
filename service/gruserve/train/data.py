"""From a CSV file to scaled training batches, validated before the first step.

The table is read, the feature and target columns are taken (``data.missing``
decides about gaps), and row ``t`` is paired with target row ``t + horizon``
(``horizon: 0`` means the targets are labels of the same row). Pairs are split
in time order into training, validation and test ranges; the scaling is fitted
on the training pairs only and travels to the server in the manifest's
``preprocessing``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gruserve.errors import ConfigError
from gruserve.train.config import DataConfig
from gruserve.train.scaling import Scaling, fit_scaling
from gruserve.train.table import handle_missing, read_table
from gruserve.train.windows import (
    ArrayBatches,
    StatefulBatches,
    gather,
    stateful_streams,
    window_starts,
)

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class PreparedData:
    """Every (input, target) pair of the series, scaled, with its split boundaries.

    Attributes:
        x: (pairs, features) scaled inputs; pair ``i`` is data row ``i``.
        y: (pairs, targets) scaled targets; pair ``i`` is data row ``i + horizon``.
        raw_targets: the same targets in the data's own units.
        naive: the last target value known when pair ``i`` is forecast (raw units;
            NaN when none is), the baseline a forecaster must beat.
        bounds: end of the training pairs, end of the validation pairs, pair count.
    """

    config: DataConfig
    inputs: Scaling
    outputs: Scaling
    x: np.ndarray
    y: np.ndarray
    raw_targets: np.ndarray
    naive: np.ndarray
    bounds: tuple[int, int, int]
    sequence_output: bool

    def split(self, name: str) -> tuple[int, int]:
        train_end, validation_end, total = self.bounds
        return {
            "train": (0, train_end),
            "validation": (train_end, validation_end),
            "test": (validation_end, total),
        }[name]

    def size(self, name: str) -> int:
        begin, end = self.split(name)
        return end - begin

    def windows(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Stateless windows of one split: inputs (n, window, F) and targets."""
        begin, end = self.split(name)
        c = self.config
        starts = window_starts(begin, end, c.window, c.stride, self.sequence_output)
        return gather(self.x, self.y, starts, c.window, self.sequence_output)

    def training_batches(
        self, batch_size: int, shuffle: bool, seed: int | None, stateful: bool
    ) -> ArrayBatches | StatefulBatches:
        if stateful:
            end = self.split("train")[1]
            return stateful_streams(self.x, self.y, end, batch_size, self.config.window)
        x, y = self.windows("train")
        return ArrayBatches(x, y, batch_size, shuffle, seed)

    def preprocessing(self) -> dict[str, Any]:
        """The manifest's ``preprocessing``: the server's contract, plus how it was made."""
        c = self.config
        return {
            "inputs": self.inputs.to_manifest(),
            "outputs": self.outputs.to_manifest(),
            "scaling": {"inputs": self.inputs.method, "outputs": self.outputs.method},
            "window": c.window,
            "horizon": c.horizon,
        }


def prepare_data(
    config: DataConfig, *, sequence_output: bool, batch_size: int, stateful: bool
) -> PreparedData:
    """Load, check and scale the data of ``config``.

    Raises:
        ConfigError: a missing column, a non-numeric cell, a gap (with
            ``missing: error``), or a window that does not fit the data,
            each naming the ``data.*`` field to change.
    """
    table = read_table(config.file, config.delimiter)
    if len(table) == 0:
        raise ConfigError("data.file", f"{config.file.name} has a header but no rows")
    count = len(config.features)
    values = np.concatenate(
        [
            table.numeric(config.features, "data.features"),
            table.numeric(config.targets, "data.targets"),
        ],
        axis=1,
    )
    values = handle_missing(
        values, config.features + config.targets, config.missing, "data.missing"
    )
    features, targets = values[:, :count], values[:, count:]
    rows, h = len(values), config.horizon
    pairs = rows - h
    if pairs < 2:
        raise ConfigError(
            "data.horizon",
            f"horizon {h} leaves {max(pairs, 0)} usable rows of {rows} in {config.file.name}",
        )
    n_validation = _count(pairs, config.validation_split)
    n_test = _count(pairs, config.test_split)
    train_end = pairs - n_validation - n_test
    bounds = (train_end, train_end + n_validation, pairs)
    if train_end < 1:
        raise ConfigError("data.validation_split", f"leaves no training rows of {pairs}")
    target_rows = targets[h:]
    inputs = fit_scaling(features[:train_end], config.features, config.scaling)
    outputs = fit_scaling(target_rows[:train_end], config.targets, config.target_scaling)
    naive = np.full(target_rows.shape, np.nan)
    if h >= 1:
        naive[:] = targets[:pairs]
    else:
        naive[1:] = targets[: pairs - 1]
    data = PreparedData(
        config=config,
        inputs=inputs,
        outputs=outputs,
        x=inputs.apply(features[:pairs]),
        y=outputs.apply(target_rows),
        raw_targets=target_rows,
        naive=naive,
        bounds=bounds,
        sequence_output=sequence_output,
    )
    _check_windows(data, batch_size, stateful)
    return data


def _count(pairs: int, fraction: float) -> int:
    return max(1, round(pairs * fraction)) if fraction > 0 else 0


def _check_windows(data: PreparedData, batch_size: int, stateful: bool) -> None:
    """Fail before training when a split cannot hold one window."""
    c = data.config
    total = f"{c.file.name} has {len(data.x) + c.horizon} rows"
    if stateful:
        length = data.size("train") // batch_size
        if length < c.window:
            raise ConfigError(
                "data.window",
                f"window {c.window} is longer than each stateful stream: the {data.size('train')} "
                f"training steps cut into training.batch_size={batch_size} streams give {length} "
                f"steps each ({total}); lower data.window or training.batch_size",
            )
        return
    for name in ("train", "validation", "test"):
        if data.size(name) == 0 or (name == "test" and data.sequence_output):
            continue
        begin, end = data.split(name)
        if len(window_starts(begin, end, c.window, c.stride, data.sequence_output)) == 0:
            raise ConfigError(
                "data.window",
                f"window {c.window} is longer than the {name} split ({data.size(name)} steps; "
                f"{total}); lower data.window or change the splits",
            )
