"""``gruserve import-keras`` and ``gruserve inspect`` end to end.

Models are saved by the real keras package as ``.keras`` and ``.h5``, imported
through the command line, and the written ONNX model must give Keras's
predictions. Bad files must fail with exit code 1, a readable message, and an
untouched models folder.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import onnxruntime as ort
import pytest
from rich.console import Console
from typer.testing import CliRunner

from gruserve import cli
from gruserve.cli import app
from gruserve.repository import ModelRepository
from keras_helpers import assert_close, keras, randomize, to_numpy

runner = CliRunner()
T, F = 6, 3


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _keras_model(rng: np.random.Generator) -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((T, F)),
            keras.layers.Masking(0.0),
            keras.layers.Bidirectional(
                keras.layers.GRU(4, return_sequences=True), merge_mode="ave"
            ),
            keras.layers.GRU(5, activation="gelu", reset_after=False),
            keras.layers.Dense(2),
        ]
    )
    randomize(model, rng)
    return model


def _predict(model_dir: Path, x: np.ndarray) -> np.ndarray:
    manifest = ModelRepository(model_dir.parent.parent).resolve(model_dir.parent.name).manifest
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    feeds = {"inputs": x, "mask": np.ones(x.shape[:2], bool)}
    for state in manifest.states:
        feeds[state.input] = np.zeros((x.shape[0], state.units), np.float32)
    return session.run(["outputs"], feeds)[0]


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_import_keras_file_through_the_cli(
    suffix: str, tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "console", Console(width=200))  # no wrapping of long tensor names
    model = _keras_model(rng)
    source = tmp_path / f"model{suffix}"
    model.save(source)
    models = tmp_path / "models"
    result = runner.invoke(
        app, ["import-keras", str(source), "--name", "imported", "--models-dir", str(models)]
    )
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "parity" in result.output

    x = rng.normal(size=(4, T, F)).astype(np.float32)
    x[1, 4:] = 0.0  # Masking turns these into right padding
    assert_close([_predict(models / "imported" / "1", x)], [to_numpy(model(x))])
    manifest = ModelRepository(models).resolve("imported").manifest
    assert manifest.source["format"] == ("keras" if suffix == ".keras" else "keras_h5")
    assert [layer.export["strategy"] for layer in manifest.layers if layer.export] == [
        "native",
        "loop",
    ]

    again = runner.invoke(
        app, ["import-keras", str(source), "--name", "imported", "--models-dir", str(models)]
    )
    assert again.exit_code == 0 and (models / "imported" / "2").is_dir()

    shown = runner.invoke(app, ["inspect", str(models / "imported")])
    assert shown.exit_code == 0, shown.output
    for state in manifest.states:
        assert state.input in shown.output and state.output in shown.output
    for text in ("imported v2", "native", "loop", "passed"):
        assert text in shown.output


def _corrupt_zip(path: Path, model: keras.Model) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def _missing_weights(path: Path, model: keras.Model) -> None:
    good = path.with_name("good.keras")
    model.save(good)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.namelist():
            if item != "model.weights.h5":
                dst.writestr(item, src.read(item))


def _unsupported_layer(path: Path, model: keras.Model) -> None:
    keras.Sequential([keras.Input((T, F)), keras.layers.LSTM(3)]).save(path)


def _wrong_shape(path: Path, model: keras.Model) -> None:
    model.save(path)
    with h5py.File(path, "r+") as handle:
        names: list[str] = []
        handle.visit(names.append)
        kernel = next(n for n in names if n.endswith("kernel:0") or n.endswith("/kernel"))
        del handle[kernel]
        handle[kernel] = np.zeros((7, 7), np.float32)


@pytest.mark.parametrize(
    "make_bad, suffix, message",
    [
        (_corrupt_zip, ".keras", "not a"),
        (_missing_weights, ".keras", "model.weights.h5"),
        (_unsupported_layer, ".keras", "'LSTM'"),
        (_wrong_shape, ".h5", "shape"),
    ],
)
def test_bad_files_fail_cleanly(
    make_bad,
    suffix: str,
    message: str,
    tmp_path: Path,  # type: ignore[no-untyped-def]
    rng: np.random.Generator,
) -> None:
    models = tmp_path / "models"
    good = tmp_path / "good_first.keras"
    _keras_model(rng).save(good)
    assert (
        runner.invoke(
            app, ["import-keras", str(good), "--name", "kept", "--models-dir", str(models)]
        ).exit_code
        == 0
    )
    before = _tree(models)

    bad = tmp_path / f"bad{suffix}"
    make_bad(bad, _keras_model(rng))
    result = runner.invoke(
        app, ["import-keras", str(bad), "--name", "broken", "--models-dir", str(models)]
    )
    assert result.exit_code == 1
    assert (
        "error:" in result.output and message in result.output and "Traceback" not in result.output
    )
    assert _tree(models) == before


def test_console_script_runs_in_a_subprocess(tmp_path: Path, rng: np.random.Generator) -> None:
    """The installed ``gruserve`` entry point, as a user runs it."""
    source = tmp_path / "m.keras"
    _keras_model(rng).save(source)
    exe = Path(sys.executable).with_name("gruserve")
    done = subprocess.run(
        [
            str(exe),
            "import-keras",
            str(source),
            "--name",
            "cli",
            "--models-dir",
            str(tmp_path / "models"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    missing = subprocess.run(
        [
            str(exe),
            "import-keras",
            str(tmp_path / "nope.keras"),
            "--name",
            "x",
            "--models-dir",
            str(tmp_path / "models"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 1 and "nope.keras" in missing.stderr


def test_strategy_tolerances_and_no_verify_flags(tmp_path: Path, rng: np.random.Generator) -> None:
    """An unzipped Keras 3 folder, imported with each flag; the manifest records them."""
    model = _keras_model(rng)
    source = tmp_path / "unzipped"
    model.save(source, zipped=False)
    models = tmp_path / "models"
    base = ["import-keras", str(source), "--models-dir", str(models)]

    forced = runner.invoke(
        app, [*base, "--name", "looped", "--strategy", "loop", "--atol", "2e-5", "--rtol", "1e-3"]
    )
    assert forced.exit_code == 0, forced.output
    manifest = ModelRepository(models).resolve("looped").manifest
    assert manifest.source["format"] == "keras_dir"
    assert {layer.export["strategy"] for layer in manifest.layers if layer.export} == {"loop"}
    assert (manifest.parity["atol"], manifest.parity["rtol"]) == (2e-5, 1e-3)
    x = rng.normal(size=(3, T, F)).astype(np.float32)
    assert_close([_predict(models / "looped" / "1", x)], [to_numpy(model(x))])

    unverified = runner.invoke(app, [*base, "--name", "raw", "--no-verify"])
    assert unverified.exit_code == 0 and "unverified" in unverified.output
    assert ModelRepository(models).resolve("raw").manifest.parity["verified"] is False
    shown = runner.invoke(app, ["inspect", str(models / "raw")])
    assert shown.exit_code == 0 and "unverified" in shown.output

    wrong = runner.invoke(app, [*base, "--name", "bad", "--strategy", "fast"])
    assert wrong.exit_code == 1 and "unknown export strategy 'fast'" in wrong.output
    assert not (models / "bad").exists()
