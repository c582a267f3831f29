"""The bundled demo: its data, its config, the shipped model, and a short end-to-end run.

The shipped ``models/demo/1`` must carry the scaling the server applies and a
held-out error that beats the naive last-value forecast; streaming the series
through its ONNX graph one year at a time (state carried, raw units in and
out, exactly the server's job) must reproduce that error. A short run of the
same config through ``gruserve train`` must write every artefact, and Ctrl-C
must leave the last complete epoch's checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from typer.testing import CliRunner

import gruserve
from gruserve.cli import app
from gruserve.errors import TrainingInterrupted
from gruserve.layers.recurrent import RNNSpec
from gruserve.manifest import Manifest
from gruserve.train.checkpoints import load_weights
from gruserve.train.command import run_training
from gruserve.train.config import load_config
from gruserve.train.loop import Trainer

REPO = Path(__file__).resolve().parents[2]
DEMO = Path(gruserve.__file__).parent / "train" / "demo"
CONFIG = DEMO / "sunspots.yaml"
SHIPPED = REPO / "models" / "demo" / "1"


def _series() -> np.ndarray:
    with open(DEMO / "sunspots.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return np.array([float(r["SUNACTIVITY"]) for r in rows])


def test_the_data_file_is_the_documented_extract() -> None:
    digest = hashlib.sha256((DEMO / "sunspots.csv").read_bytes()).hexdigest()
    assert digest in (DEMO / "README.md").read_text()
    series = _series()
    assert len(series) == 309 and series[0] == 5.0 and series[-1] == 2.9
    assert "public domain" in (DEMO / "README.md").read_text()


def test_the_demo_config_is_valid_and_small() -> None:
    config = load_config(CONFIG)
    assert config.data.file == DEMO / "sunspots.csv"
    assert config.training.stateful and config.export.name == "demo"
    units = [layer.units for layer in config.model.layers if isinstance(layer, RNNSpec)]
    assert len(units) == 2 and max(units) <= 64


def _stream(manifest: Manifest, onnx_path: Path, series: np.ndarray, chunk: int) -> np.ndarray:
    """What the server does: scale, step through the ONNX graph carrying state, unscale."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    pre = manifest.preprocessing
    assert pre is not None
    states = {s.input: np.zeros((1, s.units), np.float32) for s in manifest.states}
    forecasts = []
    for begin in range(0, len(series), chunk):
        raw = series[begin : begin + chunk, None]
        x = ((raw - pre["inputs"]["mean"]) / pre["inputs"]["scale"]).astype(np.float32)[None]
        names = ["outputs"] + [s.output for s in manifest.states]
        feeds = {"inputs": x, "mask": np.ones(x.shape[:2], bool), **states}
        outputs, *finals = session.run(names, feeds)
        states = {s.input: f for s, f in zip(manifest.states, finals, strict=True)}
        forecasts.append(outputs[0] * pre["outputs"]["scale"] + pre["outputs"]["mean"])
    return np.concatenate(forecasts)[:, 0]


def test_the_shipped_model_beats_the_naive_forecast_when_streamed() -> None:
    manifest = Manifest.read(SHIPPED / "model.json")
    assert manifest.source["kind"] == "gruserve train"
    pre = manifest.preprocessing
    assert pre is not None
    assert pre["inputs"]["names"] == ["SUNACTIVITY"] == pre["outputs"]["names"]
    assert len(pre["inputs"]["mean"]) == len(pre["inputs"]["scale"]) == 1
    assert pre["horizon"] == 1
    metrics = manifest.metrics
    assert metrics["heldout_split"] == "test" and metrics["heldout_steps"] == 46
    assert metrics["heldout_mae"] < 0.7 * metrics["naive_last_value_mae"]
    assert metrics["heldout_rmse"] < metrics["naive_last_value_rmse"]

    series = _series()
    forecasts = _stream(manifest, SHIPPED / "model.onnx", series, chunk=1)  # one year per step
    in_chunks = _stream(manifest, SHIPPED / "model.onnx", series, chunk=50)
    np.testing.assert_allclose(forecasts, in_chunks, atol=1e-3)
    test = slice(len(series) - 1 - 46, len(series) - 1)  # forecasts of the last 46 years
    actual = series[test.start + 1 : test.stop + 1]
    mae = float(np.mean(np.abs(forecasts[test] - actual)))
    naive = float(np.mean(np.abs(series[test] - actual)))
    assert mae == pytest.approx(metrics["heldout_mae"], rel=1e-3)
    assert naive == pytest.approx(metrics["naive_last_value_mae"], rel=1e-5)


def test_the_readme_reports_the_shipped_error() -> None:
    metrics = Manifest.read(SHIPPED / "model.json").metrics
    docs = (REPO / "README.md").read_text()
    for key in ("heldout_mae", "heldout_rmse", "naive_last_value_mae", "naive_last_value_rmse"):
        assert f"{metrics[key]:.2f}" in docs, key


def _short_demo(tmp_path: Path, epochs: int = 3) -> Path:
    config = yaml.safe_load(CONFIG.read_text())
    config["data"]["file"] = str(DEMO / "sunspots.csv")
    config["training"].update(epochs=epochs, output_dir=str(tmp_path / "run"), progress=False)
    path = tmp_path / "demo.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_short_demo_run_writes_every_artefact(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["train", str(_short_demo(tmp_path)), "--models-dir", str(tmp_path / "models")]
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    history = json.loads((run / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2, 3]
    assert {"loss", "mae", "val_loss", "val_mae", "learning_rate"} <= set(history["epochs"][0])
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    best, meta = load_weights(run / "checkpoints" / "best.safetensors")
    assert set(best) == {"gru", "gru_1", "dense"} and meta["monitor"] == "val_loss"
    manifest = Manifest.read(tmp_path / "models" / "demo" / "1" / "model.json")
    assert manifest.parity["passed"]
    assert manifest.preprocessing is not None
    assert set(manifest.preprocessing) >= {"inputs", "outputs", "window", "horizon"}
    assert {"heldout_mae", "naive_last_value_mae"} <= set(manifest.metrics)
    assert not any(layer.config.get("stateful") for layer in manifest.layers)
    assert "exported" in result.output


def test_the_same_seed_gives_the_same_weights(tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        path = _short_demo(tmp_path / name, epochs=2)
        runs.append(run_training(path, models_dir=tmp_path / name / "models").weights)
    for layer, weights in runs[0].items():
        for key, value in weights.items():
            np.testing.assert_array_equal(value, runs[1][layer][key])


def test_ctrl_c_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls = {"n": 0}
    original = Trainer.train_step

    def interrupted(self, x, y):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2 * 3 + 2:  # three batches per epoch: inside epoch 3
            raise KeyboardInterrupt
        return original(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(TrainingInterrupted, match="interrupted during epoch 3 of 5; kept"):
        run_training(_short_demo(tmp_path, epochs=5), models_dir=tmp_path / "models")
    _, meta = load_weights(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert meta["epoch"] == "2"
    best, _ = load_weights(tmp_path / "run" / "checkpoints" / "best.safetensors")
    assert best["dense"]["kernel"].shape == (16, 1)
    assert json.loads((tmp_path / "run" / "history.json").read_text())["interrupted"] is True
    assert not (tmp_path / "models").exists()
