"""Broken, unsupported and non-linear model files fail with gruserve errors that explain.

Nothing may escape as ``KeyError``, ``OSError`` or ``zipfile.BadZipFile``;
every message names the file and says what is wrong or what is supported.
"""

from __future__ import annotations

import io
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
layers = keras.layers

from gruserve.errors import (  # noqa: E402
    ConfigError,
    GruServeError,
    ModelFileError,
    UnsupportedLayer,
    WeightShapeError,
)
from gruserve.keras_io import load_keras_model  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "keras2"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A valid Input -> GRU -> Dense model in both formats."""
    folder = tmp_path_factory.mktemp("good")
    model = keras.Sequential(
        [keras.Input((5, 3)), layers.GRU(4, name="gru"), layers.Dense(2, name="dense")]
    )
    paths = {"keras": folder / "good.keras", "h5": folder / "good.h5"}
    model.save(paths["keras"])
    model.save(paths["h5"])
    return paths


def _copy(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst)
    return dst


def _rewrite_archive(src: Path, dst: Path, edit: Any = None, drop: str | None = None) -> Path:
    """Copy a .keras archive, optionally dropping a member or editing its weights file."""
    with zipfile.ZipFile(src) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    if drop:
        del members[drop]
    if edit and "model.weights.h5" in members:
        buffer = io.BytesIO(members["model.weights.h5"])
        with h5py.File(buffer, "r+") as handle:
            edit(handle)
        members["model.weights.h5"] = buffer.getvalue()
    with zipfile.ZipFile(dst, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return dst


def _weight_names(group: h5py.Group) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs["weight_names"]]


def _raises(error: type[Exception], path: Path, *fragments: str) -> Exception:
    with pytest.raises(error) as info:
        load_keras_model(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return info.value


# ----------------------------------------------------------------------------- broken files
def test_random_bytes_named_keras(tmp_path: Path) -> None:
    path = tmp_path / "garbage.keras"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    _raises(ModelFileError, path, "not a valid .keras archive")


def test_random_bytes_named_h5(tmp_path: Path) -> None:
    path = tmp_path / "garbage.h5"
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    _raises(ModelFileError, path, "not a readable HDF5 file")


def test_unknown_kind_of_file(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"hello")
    _raises(ModelFileError, path, "neither a .keras archive")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    _raises(ModelFileError, tmp_path / "nope.keras", "no such file")
    message = str(_raises(ModelFileError, tmp_path, "neither a Keras 3 model directory"))
    assert "is a TensorFlow SavedModel" not in message


def test_saved_model_directory_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "saved_model.pb").write_bytes(b"\x08\x01")
    (tmp_path / "variables").mkdir()
    _raises(ModelFileError, tmp_path, "is a TensorFlow SavedModel")


@pytest.mark.parametrize("fraction", [0.5, 0.97])
def test_truncated_archive(good: dict[str, Path], tmp_path: Path, fraction: float) -> None:
    data = good["keras"].read_bytes()
    path = tmp_path / "truncated.keras"
    path.write_bytes(data[: int(len(data) * fraction)])
    _raises(ModelFileError, path, "truncated")


def test_truncated_h5(good: dict[str, Path], tmp_path: Path) -> None:
    data = good["h5"].read_bytes()
    path = tmp_path / "truncated.h5"
    path.write_bytes(data[: len(data) // 2])
    _raises(ModelFileError, path, "truncated")


def test_archive_without_weights(good: dict[str, Path], tmp_path: Path) -> None:
    path = _rewrite_archive(good["keras"], tmp_path / "no_weights.keras", drop="model.weights.h5")
    _raises(ModelFileError, path, "has no model.weights.h5")


def test_archive_without_config(good: dict[str, Path], tmp_path: Path) -> None:
    path = _rewrite_archive(good["keras"], tmp_path / "no_config.keras", drop="config.json")
    _raises(ModelFileError, path, "has no config.json")


def test_h5_without_model_config(good: dict[str, Path], tmp_path: Path) -> None:
    path = _copy(good["h5"], tmp_path / "weights_only.h5")
    with h5py.File(path, "r+") as handle:
        del handle.attrs["model_config"]
    _raises(ModelFileError, path, "no `model_config`", "save_weights")


def test_weights_file_from_save_weights(tmp_path: Path) -> None:
    model = keras.Sequential([keras.Input((5, 3)), layers.GRU(2)])
    path = tmp_path / "only.weights.h5"
    model.save_weights(path)
    _raises(ModelFileError, path, "no `model_config`")


def test_h5_gru_weight_missing(good: dict[str, Path], tmp_path: Path) -> None:
    path = _copy(good["h5"], tmp_path / "missing.h5")
    with h5py.File(path, "r+") as handle:
        group = handle["model_weights/gru"]
        name = _weight_names(group)[1]
        del group[name]
    _raises(ModelFileError, path, "layer 'gru' (GRU)", "'recurrent_kernel' is missing")


def test_h5_gru_group_missing(good: dict[str, Path], tmp_path: Path) -> None:
    path = _copy(good["h5"], tmp_path / "no_group.h5")
    with h5py.File(path, "r+") as handle:
        del handle["model_weights/gru"]
    _raises(ModelFileError, path, "layer 'gru' (GRU)", "weights are missing")


def test_archive_gru_weight_missing(good: dict[str, Path], tmp_path: Path) -> None:
    def drop(handle: h5py.File) -> None:
        del handle["layers/gru/cell/vars/2"]

    path = _rewrite_archive(good["keras"], tmp_path / "missing.keras", edit=drop)
    _raises(ModelFileError, path, "layer 'gru' (GRU)", "holds 2 variable(s), expected 3")


def test_archive_gru_group_missing(good: dict[str, Path], tmp_path: Path) -> None:
    def drop(handle: h5py.File) -> None:
        del handle["layers/gru"]

    path = _rewrite_archive(good["keras"], tmp_path / "no_group.keras", edit=drop)
    _raises(ModelFileError, path, "layer 'gru' (GRU)", "weights are missing")


def test_h5_wrong_shape(good: dict[str, Path], tmp_path: Path) -> None:
    path = _copy(good["h5"], tmp_path / "shape.h5")
    with h5py.File(path, "r+") as handle:
        group = handle["model_weights/gru"]
        name = _weight_names(group)[0]
        del group[name]
        group.create_dataset(name, data=np.zeros((7, 12), dtype=np.float32))
    _raises(WeightShapeError, path, "layer 'gru' (GRU)", "'kernel'", "(7, 12)", "(3, 12)")


def test_archive_wrong_shape(good: dict[str, Path], tmp_path: Path) -> None:
    def reshape(handle: h5py.File) -> None:
        del handle["layers/dense/vars/1"]
        handle["layers/dense/vars"].create_dataset("1", data=np.zeros((3,), dtype=np.float32))

    path = _rewrite_archive(good["keras"], tmp_path / "shape.keras", edit=reshape)
    _raises(WeightShapeError, path, "layer 'dense' (Dense)", "'bias'", "(3,)", "(2,)")


def test_tf_keras_fixture_with_swapped_weight_names(tmp_path: Path) -> None:
    """Stored names are checked against Keras's order, not trusted blindly."""
    path = _copy(FIXTURES / "gru_default.h5", tmp_path / "swapped.h5")
    with h5py.File(path, "r+") as handle:
        group = handle["model_weights/gru"]
        names = list(group.attrs["weight_names"])
        group.attrs["weight_names"] = [names[1], names[0], names[2]]
    _raises(ModelFileError, path, "out of Keras's order")


# ----------------------------------------------------------------------------- unsupported models
@pytest.mark.parametrize(
    ("layer", "class_name"),
    [
        (lambda: layers.LSTM(4, return_sequences=True), "LSTM"),
        (lambda: layers.Conv1D(4, 2), "Conv1D"),
    ],
)
def test_unsupported_layer(tmp_path: Path, layer: Any, class_name: str) -> None:
    model = keras.Sequential([keras.Input((5, 3)), layer(), layers.GRU(2)])
    for suffix in (".keras", ".h5"):
        path = tmp_path / f"model{suffix}"
        model.save(path)
        error = _raises(
            UnsupportedLayer, path, repr(class_name), "Supported layers", "GRU", "Dense"
        )
        assert error.class_name == class_name  # type: ignore[attr-defined]


def _functional(kind: str) -> Any:
    inputs = keras.Input((5, 3), name="x")
    if kind == "branch":
        left = layers.GRU(4, name="left")(inputs)
        right = layers.GRU(4, name="right")(inputs)
        return keras.Model(inputs, layers.Add(name="merge")([left, right]))
    if kind == "two_outputs":
        hidden = layers.GRU(4, name="enc")(inputs)
        return keras.Model(inputs, [layers.Dense(1)(hidden), layers.Dense(2)(hidden)])
    if kind == "shared":
        dense = layers.Dense(3, name="shared_dense")
        hidden = layers.GRU(3, return_sequences=True)(dense(inputs))
        return keras.Model(inputs, dense(hidden))
    if kind == "two_inputs":
        other = keras.Input((4,), name="state")
        return keras.Model([inputs, other], layers.GRU(4, name="enc")(inputs, initial_state=other))
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("branch", "'merge'"),
        ("two_outputs", "2 output(s)"),
        ("shared", "'shared_dense' is called 2 times"),
        ("two_inputs", "2 input(s)"),
    ],
)
def test_non_linear_functional(tmp_path: Path, kind: str, fragment: str) -> None:
    model = _functional(kind)
    for suffix in (".keras", ".h5"):
        path = tmp_path / f"{kind}{suffix}"
        model.save(path)
        _raises(ConfigError, path, fragment, "form one chain are supported")


def test_explicit_mask_is_refused(tmp_path: Path) -> None:
    """A mask computed by hand (not by Masking/Embedding) would be silently dropped: refuse it."""
    inputs = keras.Input((5, 3))
    mask = keras.ops.any(keras.ops.not_equal(inputs, 5.0), axis=-1)
    model = keras.Model(inputs, layers.GRU(2)(inputs, mask=mask))
    path = tmp_path / "explicit_mask.keras"
    model.save(path)
    _raises(ConfigError, path, "explicit masks are not supported")


def test_subclassed_model_config(good: dict[str, Path], tmp_path: Path) -> None:
    with zipfile.ZipFile(good["keras"]) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members["config.json"] = b'{"class_name": "MyModel", "config": {}}'
    path = tmp_path / "subclassed.keras"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    _raises(ConfigError, path, "'MyModel' is not supported", "Sequential")


@pytest.mark.parametrize("kind", ["keras", "h5"])
def test_damaged_files_raise_only_gruserve_errors(
    good: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    """Bytes flipped, overwritten or cut anywhere: a gruserve error or a load, never a raw one.

    h5py opens lazily, so damage often surfaces only while reading a dataset.
    """
    data = good[kind].read_bytes()
    rng = np.random.default_rng(42)
    path = tmp_path / f"damaged.{kind}"
    for trial in range(120):
        damaged = bytearray(data)
        if trial % 3 == 0:
            for offset in rng.integers(0, len(damaged), size=4):
                damaged[offset] = int(rng.integers(0, 256))
        elif trial % 3 == 1:
            damaged = damaged[: int(rng.integers(1, len(damaged)))]
        else:
            start = int(rng.integers(0, len(damaged) - 64))
            damaged[start : start + 64] = rng.bytes(64)
        path.write_bytes(bytes(damaged))
        try:
            load_keras_model(path)
        except GruServeError as error:
            assert str(path) in str(error)
