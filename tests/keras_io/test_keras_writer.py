"""The way back to Keras: ``model_config`` and ``gruserve export-keras``.

A version in the repository must load in the real ``keras`` package, both
as a config (``keras.Sequential.from_config``) and as a ``.keras`` file
whose predictions match the ONNX graph the server runs to 1e-6.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from gruserve.cli import app
from gruserve.export.exporter import export_model
from gruserve.layers import ModelSpec
from gruserve.manifest import Manifest
from keras_helpers import keras, to_numpy

REPO = Path(__file__).resolve().parents[2]
F = 4
runner = CliRunner()


def _gru(name: str, units: int, **config: Any) -> dict[str, Any]:
    return {"class_name": "GRU", "config": {"name": name, "units": units, **config}}


MODELS: dict[str, list[dict[str, Any]]] = {
    "gru_dense": [
        _gru("g", 5, return_sequences=True),
        {"class_name": "Dense", "config": {"name": "d", "units": 2}},
    ],
    "bidirectional": [
        {"class_name": "Masking", "config": {"name": "m", "mask_value": 0.0}},
        {
            "class_name": "Bidirectional",
            "config": {
                "name": "b",
                "merge_mode": "ave",
                "layer": _gru("f", 3, return_sequences=True, activation="softplus"),
            },
        },
        _gru("g2", 2, go_backwards=True, reset_after=False, recurrent_activation="hard_sigmoid"),
    ],
    "stacked_cells": [
        {
            "class_name": "RNN",
            "config": {
                "name": "r",
                "return_sequences": True,
                "cell": [
                    {"class_name": "GRUCell", "config": {"name": "c0", "units": 3}},
                    {
                        "class_name": "GRUCell",
                        "config": {"name": "c1", "units": 2, "use_bias": False},
                    },
                ],
            },
        },
        {"class_name": "Dropout", "config": {"name": "drop", "rate": 0.3}},
        {"class_name": "Dense", "config": {"name": "d", "units": 1, "activation": "tanh"}},
    ],
}


def _export(tmp_path: Path, name: str, rng: np.random.Generator) -> Path:
    configs = [{"class_name": "InputLayer", "config": {"batch_shape": [None, None, F]}}]
    spec = ModelSpec.from_layer_configs(name, configs + MODELS[name])
    weights = {
        layer: {k: (rng.normal(size=s) * 0.6).astype(np.float32) for k, s in shapes.items()}
        for layer, shapes in spec.weight_shapes().items()
    }
    return export_model(spec, weights, models_dir=tmp_path / "models", name=name).path


def _onnx_predict(version: Path, x: np.ndarray) -> np.ndarray:
    manifest = Manifest.read(version / "model.json")
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"inputs": x, "mask": np.ones(x.shape[:2], bool)}
    for state in manifest.states:
        feeds[state.input] = np.zeros((x.shape[0], state.units), np.float32)
    return session.run([manifest.outputs[0].name], feeds)[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_model_config_loads_with_keras_from_config(tmp_path: Path, name: str) -> None:
    version = _export(tmp_path, name, np.random.default_rng(1))
    manifest = Manifest.read(version / "model.json")
    spec = ModelSpec.from_layer_configs(name, manifest.model_config["layers"])
    model = keras.Sequential.from_config(copy.deepcopy(manifest.model_config))
    model.build((None, None, F))
    assert [layer.name for layer in model.layers] == [e["config"]["name"] for e in MODELS[name]]
    assert len(model.get_weights()) == sum(len(s) for s in spec.weight_shapes().values())


@pytest.mark.parametrize("name", list(MODELS))
def test_export_keras_predicts_like_the_onnx_graph(tmp_path: Path, name: str) -> None:
    rng = np.random.default_rng(2)
    version = _export(tmp_path, name, rng)
    out = tmp_path / "back" / f"{name}.keras"
    result = runner.invoke(app, ["export-keras", str(version), str(out)])
    assert result.exit_code == 0, result.output
    model = keras.saving.load_model(out)
    x = rng.normal(size=(3, 6, F)).astype(np.float32)
    x[1, 4:] = 0.0  # padding, for the Masking model
    want = _onnx_predict(version, x)
    got = to_numpy(model(x))
    assert got.shape == want.shape
    assert float(np.max(np.abs(got - want))) <= 1e-6


def test_a_trained_model_goes_back_to_keras(tmp_path: Path) -> None:
    """The shipped demo was written by ``gruserve train``; the latest version is taken."""
    out = tmp_path / "demo.keras"
    result = runner.invoke(app, ["export-keras", str(REPO / "models" / "demo"), str(out)])
    assert result.exit_code == 0, result.output
    model = keras.saving.load_model(out)
    manifest = Manifest.read(REPO / "models" / "demo" / "1" / "model.json")
    steps = manifest.static_timesteps or 12
    x = np.random.default_rng(3).normal(size=(4, steps, manifest.features or 1)).astype(np.float32)
    got = to_numpy(model(x))
    want = _onnx_predict(REPO / "models" / "demo" / "1", x)
    assert float(np.max(np.abs(got - want))) <= 1e-6


def test_what_keras_3_cannot_express_is_refused(tmp_path: Path) -> None:
    configs = [
        {"class_name": "InputLayer", "config": {"batch_shape": [None, None, F]}},
        _gru("g", 3, recurrent_activation="hard_sigmoid"),
    ]
    spec = ModelSpec.from_layer_configs("old", configs, keras_version=2)
    weights = {
        layer: {k: np.full(s, 0.1, np.float32) for k, s in shapes.items()}
        for layer, shapes in spec.weight_shapes().items()
    }
    version = export_model(spec, weights, models_dir=tmp_path / "models", name="old").path
    out = tmp_path / "old.keras"
    result = runner.invoke(app, ["export-keras", str(version), str(out)])
    assert result.exit_code == 1
    assert "hard_sigmoid" in result.output and not out.exists()
    assert list(tmp_path.glob(".old.keras*")) == []
