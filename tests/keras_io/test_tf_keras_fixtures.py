"""tf-keras (Keras 2) files: the committed fixtures against tf-keras's own outputs.

The ``.h5``/``.keras`` files and the reference outputs in ``tests/fixtures/keras2``
were written by real tf-keras (see ``make_fixtures.py`` there); nothing here
needs TensorFlow.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from gruserve.keras_io import load_keras_model
from gruserve.layers.backend import NUMPY
from gruserve.layers.forward import run_model
from gruserve.layers.model import ModelSpec
from gruserve.layers.recurrent import GRUSpec

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "keras2"
NAMES = [
    "gru_default",
    "gru_keras2_style",
    "gru_time_major",
    "bidirectional_dense",
    "embedding_mask_gru",
    "masking_gru_seq_dense",
    "stacked_rnn_cells",
]
FILES = [f"{name}.h5" for name in NAMES] + ["bidirectional_dense.keras"]


def reference(file_name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / (file_name.rsplit(".", 1)[0] + ".npz")) as data:
        return {key: data[key] for key in data.files}


@pytest.mark.parametrize("file_name", FILES)
def test_fixture_matches_tf_keras_output(file_name: str) -> None:
    model = load_keras_model(FIXTURES / file_name)
    ref = reference(file_name)
    outputs, _ = run_model(NUMPY, model.spec, model.weights, ref["x"])
    assert outputs[0].shape == ref["y"].shape
    np.testing.assert_allclose(outputs[0], ref["y"], rtol=0, atol=1e-5)
    assert model.spec.keras_version == 2
    tf_keras_version = str(ref["versions"][1]).split("=")[1]
    assert model.source["keras_version"] == tf_keras_version
    expected_format = "keras" if file_name.endswith(".keras") else "tf_keras_h5"
    assert model.source["format"] == expected_format
    assert model.source["path"] == str(FIXTURES / file_name)


@pytest.mark.parametrize("file_name", FILES)
def test_fixture_weights_are_complete_float32(file_name: str) -> None:
    model = load_keras_model(FIXTURES / file_name)
    shapes = model.spec.weight_shapes()
    assert set(model.weights) == set(shapes)
    for layer, paths in shapes.items():
        assert set(model.weights[layer]) == set(paths)
        for path, shape in paths.items():
            array = model.weights[layer][path]
            assert array.dtype == np.float32
            assert array.shape == shape


def test_keras2_hard_sigmoid_semantics_survive() -> None:
    """The Keras 2 GRU must use 0.2x + 0.5; Keras 3's x/6 + 0.5 gives other numbers."""
    model = load_keras_model(FIXTURES / "gru_keras2_style.h5")
    ref = reference("gru_keras2_style.h5")
    gru = model.spec.layers[0]
    assert isinstance(gru, GRUSpec)
    cell = gru.cell
    assert (cell.recurrent_activation, cell.reset_after, cell.implementation) == (
        "hard_sigmoid",
        False,
        1,
    )
    assert cell.keras_version == 2
    assert model.weights[gru.name]["bias"].shape == (3 * cell.units,)

    as_keras3 = dataclasses.replace(gru, cells=(dataclasses.replace(cell, keras_version=3),))
    spec3 = ModelSpec(model.spec.name, model.spec.input, (as_keras3,), keras_version=3)
    wrong, _ = run_model(NUMPY, spec3, model.weights, ref["x"])
    assert np.abs(wrong[0] - ref["y"]).max() > 1e-3, "fixture must tell the two hard_sigmoids apart"


def test_keras2_dense_hard_sigmoid() -> None:
    model = load_keras_model(FIXTURES / "bidirectional_dense.h5")
    dense = model.spec.layers[-1]
    assert dense.activation == "hard_sigmoid"  # type: ignore[attr-defined]
    assert dense.keras_version == 2  # type: ignore[attr-defined]


def test_time_major_fixture() -> None:
    model = load_keras_model(FIXTURES / "gru_time_major.h5")
    assert model.spec.time_major
    assert model.source["model_class"] == "Functional"
    assert [layer.name for layer in model.spec.layers] == ["tm_gru", "head"]
    ref = reference("gru_time_major.h5")
    timesteps, batch = ref["x"].shape[:2]
    assert ref["y"].shape[:2] == (timesteps, batch)


def test_masked_fixtures_really_mask() -> None:
    """The references include masked steps, so the comparisons above exercise masking."""
    for name in ("embedding_mask_gru.h5", "masking_gru_seq_dense.h5"):
        mask = reference(name)["mask"]
        assert mask.dtype == np.bool_
        assert 0 < mask.sum() < mask.size
    spec = load_keras_model(FIXTURES / "embedding_mask_gru.h5").spec
    assert spec.takes_token_ids
    assert spec.layers[0].mask_zero  # type: ignore[attr-defined]


def test_stacked_cells_fixture_layout() -> None:
    model = load_keras_model(FIXTURES / "stacked_rnn_cells.h5")
    rnn = model.spec.layers[0]
    assert [cell.reset_after for cell in rnn.cells] == [True, False]  # type: ignore[attr-defined]
    assert model.weights["stacked"]["cells/1/bias"].shape == (9,)


def test_version_from_config_when_not_recorded(tmp_path: Path) -> None:
    """A tf-keras file stripped of `keras_version` is still recognized by its config keys."""
    copy = tmp_path / "stripped.h5"
    shutil.copy(FIXTURES / "gru_keras2_style.h5", copy)
    with h5py.File(copy, "r+") as handle:
        for group in (handle, handle["model_weights"]):
            for key in ("keras_version", "backend"):
                if key in group.attrs:
                    del group.attrs[key]
    model = load_keras_model(copy)
    assert model.spec.keras_version == 2
    assert model.source["keras_version"] is None
    assert model.source["format"] == "tf_keras_h5"
    ref = reference("gru_keras2_style.h5")
    outputs, _ = run_model(NUMPY, model.spec, model.weights, ref["x"])
    np.testing.assert_allclose(outputs[0], ref["y"], rtol=0, atol=1e-5)
