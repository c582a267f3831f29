"""Writing the model repository: versions, manifest contents, atomicity, verification."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from gruserve.errors import ParityError, RepositoryError, WeightShapeError
from gruserve.export import exporter
from gruserve.export.exporter import export_model
from gruserve.layers import ModelSpec
from gruserve.manifest import Manifest
from gruserve.repository import ModelRepository, load_version


def _spec() -> ModelSpec:
    return ModelSpec.from_layer_configs(
        "demo",
        [
            {"class_name": "InputLayer", "config": {"batch_shape": [None, None, 3]}},
            {"class_name": "GRU", "config": {"name": "gru", "units": 4, "return_sequences": True}},
            {"class_name": "Dense", "config": {"name": "head", "units": 2}},
        ],
    )


def _weights(rng: np.random.Generator) -> dict:  # type: ignore[type-arg]
    return {
        layer: {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
        for layer, shapes in _spec().weight_shapes().items()
    }


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_export_writes_a_verified_version(tmp_path: Path, rng: np.random.Generator) -> None:
    result = export_model(
        _spec(), _weights(rng), models_dir=tmp_path, name="demo", source={"kind": "test"}
    )
    assert result.path == tmp_path / "demo" / "1"
    assert _tree(tmp_path) == ["demo", "demo/1", "demo/1/model.json", "demo/1/model.onnx"]
    manifest = Manifest.read(result.path / "model.json")
    assert manifest == result.manifest
    data = json.loads((result.path / "model.json").read_text())
    for key in (
        "format_version",
        "name",
        "version",
        "inputs",
        "outputs",
        "states",
        "layers",
        "opset",
        "ir_version",
        "onnx_sha256",
        "parity",
    ):
        assert key in data
    assert manifest.states[0].input == "initial_state/gru" and manifest.states[0].units == 4
    assert manifest.layers[0].export == {
        "strategy": "native",
        "cudnn_eligible": True,
        "notes": ["masks with holes or left padding run the Scan loop (If branch)"],
    }
    assert manifest.parity["passed"] and manifest.parity["max_abs_diff"] < 1e-5
    assert {c["case"] for c in manifest.parity["cases"]} == {
        "full",
        "right_padded",
        "holes",
        "large",
    }
    assert manifest.parity["reference"] == "numpy float64" and manifest.parity["verified"]
    ort.InferenceSession(str(result.path / "model.onnx"), providers=["CPUExecutionProvider"])

    second = export_model(_spec(), _weights(rng), models_dir=tmp_path, name="demo")
    assert second.manifest.version == 2
    assert ModelRepository(tmp_path).resolve("demo").version == 2
    assert ModelRepository(tmp_path).resolve("demo", 1).version == 1


def test_existing_version_is_never_overwritten(tmp_path: Path, rng: np.random.Generator) -> None:
    export_model(_spec(), _weights(rng), models_dir=tmp_path, name="demo", version=3)
    before = (tmp_path / "demo/3/model.onnx").read_bytes()
    with pytest.raises(RepositoryError, match="already exists"):
        export_model(_spec(), _weights(rng), models_dir=tmp_path, name="demo", version=3)
    assert (tmp_path / "demo/3/model.onnx").read_bytes() == before


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "", "x" * 65])
def test_bad_names_are_rejected(tmp_path: Path, name: str, rng: np.random.Generator) -> None:
    with pytest.raises(RepositoryError, match="invalid model name"):
        export_model(_spec(), _weights(rng), models_dir=tmp_path, name=name)
    assert _tree(tmp_path) == []


def test_failures_leave_the_repository_untouched(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    export_model(_spec(), _weights(rng), models_dir=tmp_path, name="kept")
    before = _tree(tmp_path)
    bad = _weights(rng)
    bad["gru"]["kernel"] = bad["gru"]["kernel"][:2]
    with pytest.raises(WeightShapeError, match=r"kernel.*expected"):
        export_model(_spec(), bad, models_dir=tmp_path, name="broken")
    real = exporter.parity_report

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        return {**real(*args, **kwargs), "passed": False}

    monkeypatch.setattr(exporter, "parity_report", failing)
    with pytest.raises(ParityError, match="nothing was written"):
        export_model(_spec(), _weights(rng), models_dir=tmp_path, name="kept")
    assert _tree(tmp_path) == before


def test_tampered_model_is_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    result = export_model(_spec(), _weights(rng), models_dir=tmp_path, name="demo")
    with open(result.path / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(RepositoryError, match="sha256"):
        load_version(result.path)


def test_newer_manifest_format_is_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    result = export_model(_spec(), _weights(rng), models_dir=tmp_path, name="demo")
    data = json.loads((result.path / "model.json").read_text())
    data["format_version"] = 99
    (result.path / "model.json").write_text(json.dumps(data))
    with pytest.raises(RepositoryError, match="newer than this gruserve"):
        load_version(result.path)
