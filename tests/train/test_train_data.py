"""CSV -> pairs -> splits -> scaling -> windows and stateful streams."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gruserve.errors import ConfigError
from gruserve.train.config import DataConfig
from gruserve.train.data import prepare_data
from gruserve.train.table import handle_missing, read_table
from gruserve.train.windows import gather, stateful_streams, window_starts

ROWS = 50


def _data(tmp_path: Path, **overrides) -> DataConfig:  # type: ignore[no-untyped-def]
    path = tmp_path / "s.csv"
    path.write_text("day,x,y\n" + "".join(f"d{i},{i},{10 * i + 1}\n" for i in range(ROWS)))
    settings = {
        "file": path,
        "features": ["x"],
        "targets": ["y"],
        "window": 4,
        "validation_split": 0.2,
        "test_split": 0.1,
        **overrides,
    }
    return DataConfig(**settings)


def test_pairs_splits_and_training_only_scaling(tmp_path: Path) -> None:
    data = prepare_data(
        _data(tmp_path, horizon=2), sequence_output=True, batch_size=4, stateful=False
    )
    pairs = ROWS - 2
    assert data.bounds == (pairs - 10 - 5, pairs - 5, pairs)
    train_end = data.bounds[0]
    assert data.inputs.mean[0] == pytest.approx(np.arange(train_end).mean())
    assert data.outputs.mean[0] == pytest.approx((10 * np.arange(2, train_end + 2) + 1).mean())
    raw_x = data.inputs.invert(data.x)[:, 0]
    np.testing.assert_allclose(raw_x, np.arange(pairs), atol=1e-4)
    np.testing.assert_allclose(data.raw_targets[:, 0], 10 * np.arange(2, ROWS) + 1)
    np.testing.assert_allclose(data.naive[:, 0], 10 * np.arange(pairs) + 1)  # last known value
    pre = data.preprocessing()
    assert pre["inputs"] == {
        "names": ["x"],
        "mean": [data.inputs.mean[0]],
        "scale": [data.inputs.scale[0]],
    }
    assert pre["outputs"]["names"] == ["y"] and pre["horizon"] == 2 and pre["window"] == 4


def test_labels_of_the_same_row_and_other_scalings(tmp_path: Path) -> None:
    data = prepare_data(
        _data(tmp_path, horizon=0, scaling="minmax", target_scaling="none"),
        sequence_output=False,
        batch_size=4,
        stateful=False,
    )
    assert data.x.min() == 0.0 and data.x[: data.bounds[0]].max() == 1.0
    np.testing.assert_array_equal(data.y[:, 0], 10 * np.arange(ROWS) + 1)
    assert np.isnan(data.naive[0, 0]) and data.naive[1, 0] == 1.0  # the previous label


def test_windows_stay_in_their_split_or_reach_back_for_one_output() -> None:
    starts = window_starts(10, 20, 4, 1, sequence_output=True)
    assert starts[0] == 10 and starts[-1] + 4 == 20
    starts = window_starts(10, 20, 4, 3, sequence_output=False)
    assert starts[0] == 7 and starts[-1] + 3 < 20  # the last learnt step is inside the split
    assert len(window_starts(0, 3, 4, 1, sequence_output=True)) == 0
    x = np.arange(20, dtype=np.float32)[:, None]
    inputs, targets = gather(x, x * 10, np.array([2, 5]), 3, sequence_output=False)
    np.testing.assert_array_equal(inputs[:, :, 0], [[2, 3, 4], [5, 6, 7]])
    np.testing.assert_array_equal(targets[:, 0], [40, 70])


def test_stateful_streams_drop_the_oldest_remainder() -> None:
    x = np.arange(23, dtype=np.float32)[:, None]
    batches = stateful_streams(x, x, 23, streams=4, window=2)
    assert batches.x.shape == (4, 5, 1)
    np.testing.assert_array_equal(batches.x[:, 0, 0], [3, 8, 13, 18])  # rows 0-2 dropped
    assert [c[0].shape[1] for c in batches.epoch(0)] == [2, 2, 1]


def test_shuffled_batches_are_reproducible_and_cover_every_window(tmp_path: Path) -> None:
    data = prepare_data(
        _data(tmp_path, validation_split=0.0, test_split=0.0),
        sequence_output=True,
        batch_size=8,
        stateful=False,
    )
    first = data.training_batches(8, True, 3, False)
    second = data.training_batches(8, True, 3, False)
    epoch = [x[:, 0, 0] for x, _ in first.epoch(1)]
    np.testing.assert_array_equal(
        np.concatenate(epoch), np.concatenate([x[:, 0, 0] for x, _ in second.epoch(1)])
    )
    assert sorted(np.concatenate(epoch)) == sorted(data.x[: ROWS - 1 - 3, 0])
    assert not np.array_equal(
        np.concatenate(epoch), np.concatenate([x[:, 0, 0] for x, _ in first.epoch(2)])
    )


def test_missing_value_policies(tmp_path: Path) -> None:
    values = np.array([[np.nan, 1.0], [2.0, np.nan], [4.0, 3.0], [np.nan, 5.0]])
    names = ["a", "b"]
    np.testing.assert_array_equal(handle_missing(values, names, "drop", "w"), [[4.0, 3.0]])
    np.testing.assert_array_equal(
        handle_missing(values, names, "ffill", "w"),
        [[2.0, 1.0], [2.0, 1.0], [4.0, 3.0], [4.0, 5.0]],
    )
    np.testing.assert_array_equal(
        handle_missing(values, names, "interpolate", "w"),
        [[2.0, 1.0], [2.0, 2.0], [4.0, 3.0], [4.0, 5.0]],
    )
    with pytest.raises(ConfigError, match=r"^w: column 'a' has 2 missing value"):
        handle_missing(values, names, "error", "w")


def test_a_text_cell_in_a_used_column_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("when,v\nmonday,1\ntuesday,two\n")
    table = read_table(path)
    with pytest.raises(
        ConfigError,
        match=r"^data.features: column 'v' of t.csv is not numeric: "
        r"row 3 holds 'two'",
    ):
        table.numeric(["v"], "data.features")
