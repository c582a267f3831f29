"""LoadedModel and ModelSignature: layouts, unrolled models, preprocessing, padding alignment."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gruserve.errors import RepositoryError
from gruserve.export.exporter import export_model
from gruserve.layers import ModelSpec
from gruserve.manifest import Manifest
from gruserve.nn import GRU, Dense, InputLayer, Sequential
from gruserve.repository import ModelRepository
from gruserve.runtime.model import LoadedModel
from gruserve.runtime.signature import ModelSignature, pad_alignment

CPU = ["CPUExecutionProvider"]
ATOL = 1e-5


def _load(root: Path, name: str) -> LoadedModel:
    return LoadedModel(ModelRepository(root).resolve(name), CPU, 1)


def _gru_spec(name: str, **gru: Any) -> ModelSpec:
    return ModelSpec.from_layer_configs(
        name,
        [
            {
                "class_name": "InputLayer",
                "config": {"batch_shape": [None, gru.pop("timesteps", None), 3]},
            },
            {
                "class_name": "GRU",
                "config": {"name": "gru", "units": 4, "return_sequences": True, **gru},
            },
        ],
        keras_version=2 if "time_major" in gru else 3,
    )


def _weights(spec: ModelSpec) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return {
        layer: {k: rng.normal(size=s).astype(np.float32) * 0.5 for k, s in shapes.items()}
        for layer, shapes in spec.weight_shapes().items()
    }


def test_time_major_model_takes_batch_major_arrays(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    weights = _weights(_gru_spec("plain"))
    export_model(_gru_spec("plain"), weights, models_dir=tmp_path, name="plain", version=1)
    export_model(
        _gru_spec("tm", time_major=True), weights, models_dir=tmp_path, name="tm", version=1
    )
    plain, tm = _load(tmp_path, "plain"), _load(tmp_path, "tm")
    assert tm.signature.time_major and not plain.signature.time_major
    x = rng.normal(size=(2, 5, 3)).astype(np.float32)
    h = [rng.normal(size=(2, 4)).astype(np.float32)]
    a, b = plain.run(x, None, h), tm.run(x, None, h)
    np.testing.assert_allclose(a.outputs[0], b.outputs[0], atol=ATOL)
    np.testing.assert_allclose(a.states[0], b.states[0], atol=ATOL)


def test_unrolled_model_pads_short_chunks(tmp_path: Path, rng: np.random.Generator) -> None:
    torch.manual_seed(0)
    model = Sequential(
        [
            InputLayer((6, 3)),
            GRU(4, return_sequences=True, unroll=True, name="gru"),
            Dense(2, name="head"),
        ],
        name="unrolled",
    )
    export_model(
        model.to_spec(), model.get_weights(), models_dir=tmp_path, name="unrolled", version=1
    )
    loaded = _load(tmp_path, "unrolled")
    assert loaded.signature.static_timesteps == 6
    x = rng.normal(size=(2, 4, 3)).astype(np.float32)
    result = loaded.run(x, None, [np.zeros((2, 4), np.float32)])
    with torch.no_grad():
        expected, states = model.forward_with_states(
            torch.from_numpy(x), None, None, training=False
        )
    assert result.outputs[0].shape == (2, 4, 2)
    np.testing.assert_allclose(result.outputs[0], expected[0].numpy(), atol=ATOL)
    np.testing.assert_allclose(result.states[0], states["gru"][0].numpy(), atol=ATOL)


def test_preprocessing_is_validated(models_dir: Path, tiny_models: dict[str, Any]) -> None:
    manifest = ModelRepository(models_dir).resolve("scaled").manifest
    sig = ModelSignature(manifest)
    assert sig.input_scaling is not None and sig.output_scaling is not None
    bad = dict(manifest.preprocessing or {})
    bad["inputs"] = {"mean": [0.0, 0.0], "scale": [1.0, 1.0]}
    with pytest.raises(RepositoryError, match="need 3 values"):
        ModelSignature(dataclasses.replace(manifest, preprocessing=bad))
    bad["inputs"] = {"mean": [0.0] * 3, "scale": [1.0, 0.0, 1.0]}
    with pytest.raises(RepositoryError, match="non-zero"):
        ModelSignature(dataclasses.replace(manifest, preprocessing=bad))


def test_pad_alignment(models_dir: Path, tiny_models: dict[str, Any]) -> None:
    repo = ModelRepository(models_dir)
    assert pad_alignment(repo.resolve("stacked").manifest) == "start"
    assert pad_alignment(repo.resolve("bidi").manifest) == "start"
    backwards = repo.resolve("backwards").manifest
    assert pad_alignment(backwards) == "end"
    # a recurrent layer after a go_backwards sequence would see a shifted mask: no padding at all
    layers = [
        backwards.layers[0],
        dataclasses.replace(
            backwards.layers[0],
            name="next",
            config={**backwards.layers[0].config, "go_backwards": False},
        ),
    ]
    assert pad_alignment(dataclasses.replace(backwards, layers=layers)) is None


def test_manifest_round_trip_keeps_batching(models_dir: Path, tiny_models: dict[str, Any]) -> None:
    manifest = Manifest.read(models_dir / "simple" / "1" / "model.json")
    assert manifest.batching == {"max_batch_size": 64, "max_delay_ms": 2.0}
