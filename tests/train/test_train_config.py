"""Training configs: Keras's names and defaults, and bad configs rejected before training.

Every rejection happens before the first step (no output folder is created)
and its message starts with the dotted field to change.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from gruserve.cli import app
from gruserve.errors import ConfigError
from gruserve.layers.recurrent import RNNSpec
from gruserve.train.command import run_training
from gruserve.train.config import available_cpus, load_config, parse_config
from gruserve.train.model_config import inference_spec
from gruserve.train.optimizers import Adam
from keras_helpers import keras

CSV = "t,a,b\n" + "".join(f"{i},{i % 7},{(i * 3) % 5}\n" for i in range(60))


def _config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    (tmp_path / "series.csv").write_text(CSV)
    config: dict[str, Any] = {
        "data": {
            "file": "series.csv",
            "features": ["a", "b"],
            "targets": ["a"],
            "window": 8,
            "validation_split": 0.2,
        },
        "model": {
            "name": "tiny",
            "layers": [
                {"class_name": "GRU", "config": {"units": 4, "return_sequences": True}},
                {"class_name": "Dense", "config": {"units": 1}},
            ],
        },
        "training": {
            "loss": "mse",
            "epochs": 1,
            "progress": False,
            "output_dir": str(tmp_path / "run"),
        },
        "export": {"name": "tiny"},
    }
    for path, value in overrides.items():
        node = config
        *parents, last = path.split(".")
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return config


_DELETE = "<delete>"


def _write(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_keras_names_and_defaults(tmp_path: Path) -> None:
    config = load_config(
        _write(
            tmp_path,
            _config(
                tmp_path, **{"training.optimizer": "adam", "training.metrics": ["mae", "rmse"]}
            ),
        )
    )
    assert config.training.optimizer.cls is Adam
    assert config.training.optimizer.arguments["learning_rate"] == 1e-3
    assert config.training.optimizer.arguments["epsilon"] == 1e-7
    assert config.training.batch_size == 32 and config.training.shuffle is True
    assert config.data.horizon == 1 and config.data.scaling == "standard"
    assert config.data.file == tmp_path / "series.csv"  # relative to the config file
    assert config.training.callbacks is not None
    assert config.training.callbacks.checkpoint.monitor == "val_loss"
    rms = parse_config(
        _config(
            tmp_path,
            **{"training.optimizer": {"class_name": "RMSprop", "config": {"learning_rate": 0.01}}},
        ),
        tmp_path,
    )
    assert rms.training.optimizer.arguments["rho"] == 0.9
    sgd = parse_config(_config(tmp_path, **{"training.optimizer": "sgd"}), tmp_path)
    assert sgd.training.optimizer.arguments == {
        **sgd.training.optimizer.arguments,
        "learning_rate": 0.01,
        "momentum": 0.0,
        "nesterov": False,
    }


def test_a_pasted_keras_config_is_the_model(tmp_path: Path) -> None:
    model = keras.Sequential(
        [
            keras.Input((None, 2)),
            keras.layers.GRU(3, return_sequences=True, kernel_regularizer="l2"),
            keras.layers.Dense(1),
        ],
        name="pasted",
    )
    pasted = yaml.safe_load(yaml.safe_dump(model.get_config()))  # what a user would paste
    config = parse_config(_config(tmp_path, model=pasted), tmp_path)
    assert config.model.name == "pasted"
    ours = {layer.name: layer.to_config() for layer in config.model.layers}
    for entry in model.get_config()["layers"][1:]:
        theirs = entry["config"]
        mine = ours[theirs["name"]]
        for key in ("units", "return_sequences"):
            if key in theirs:
                assert mine[key] == theirs[key], key
        if theirs.get("kernel_regularizer"):
            assert mine["kernel_regularizer"]["config"] == theirs["kernel_regularizer"]["config"]


def test_stateful_training_spec_and_the_exported_spec(tmp_path: Path) -> None:
    config = parse_config(
        _config(tmp_path, **{"training.stateful": True, "training.batch_size": 2}), tmp_path
    )
    assert config.training.shuffle is False
    trained = config.model.layers[0]
    assert isinstance(trained, RNNSpec)
    assert trained.stateful and config.model.input.batch_size == 2
    exported = inference_spec(config.model)
    served = exported.layers[0]
    assert isinstance(served, RNNSpec)
    assert not served.stateful and exported.input.batch_size is None


BAD: dict[str, tuple[dict[str, Any], str]] = {
    "unknown optimizer": (
        {"training.optimizer": "adamw2"},
        "training.optimizer: unknown optimizer 'adamw2'; known: adagrad",
    ),
    "optimizer argument": (
        {"training.optimizer": {"class_name": "SGD", "config": {"momentum": 1.5}}},
        "training.optimizer.momentum: must be a float between [0, 1]",
    ),
    "schedule": (
        {
            "training.optimizer": {
                "class_name": "Adam",
                "config": {"learning_rate": {"class_name": "ExponentialDecay"}},
            }
        },
        "training.optimizer.learning_rate: learning-rate schedules are not supported",
    ),
    "unknown loss": ({"training.loss": "msee"}, "training.loss: unknown loss 'msee'"),
    "no loss": ({"training.loss": _DELETE}, "training.loss: is required"),
    "unknown metric": (
        {"training.metrics": ["mae", "r2"]},
        "training.metrics[1]: unknown metric 'r2'",
    ),
    "unknown layer": (
        {"model.layers": [{"class_name": "LSTM", "config": {"units": 2}}]},
        "model.layers[0].class_name: unknown layer 'LSTM'; supported:",
    ),
    "bad layer argument": (
        {
            "model.layers": [
                {
                    "class_name": "GRU",
                    "config": {"units": 1, "return_sequences": True, "dropout": "3"},
                }
            ]
        },
        "model.layers: GRU 'gru': invalid value for argument `dropout`",
    ),
    "output width": (
        {"data.targets": ["a", "b"]},
        "model.layers: the model outputs 1 value(s) per step but data.targets lists 2",
    ),
    "unknown key": ({"training.epoch": 3}, "training: unknown key(s) epoch; known:"),
    "bad monitor": (
        {"training.early_stopping": {"monitor": "val_mae"}},
        "training.early_stopping.monitor: unknown quantity 'val_mae'; available: loss, val_loss",
    ),
    "monitor without validation": (
        {"data.validation_split": 0, "training.checkpoint": {"monitor": "val_loss"}},
        "training.checkpoint.monitor: unknown quantity 'val_loss'",
    ),
    "stateful shuffle": (
        {"training.stateful": True, "training.shuffle": True},
        "training.shuffle: must be false with stateful: true",
    ),
    "stateful vector": (
        {
            "training.stateful": True,
            "model.layers": [{"class_name": "GRU", "config": {"units": 1}}],
        },
        "training.stateful: needs a model whose output is a sequence",
    ),
    "splits": (
        {"data.validation_split": 0.6, "data.test_split": 0.5},
        "data.test_split: validation_split + test_split must be < 1",
    ),
    "scaling": ({"data.scaling": "robust"}, "data.scaling: unknown value 'robust'"),
    "export name": ({"export.name": "../x"}, "export.name: invalid model name '../x'"),
    "threads": ({"training.threads": 0}, "training.threads: must be >= 1, got 0"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_configs_name_the_field(case: str, tmp_path: Path) -> None:
    overrides, message = BAD[case]
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, _config(tmp_path, **copy.deepcopy(overrides))))
    assert str(info.value).startswith(message), str(info.value)


DATA_ERRORS: dict[str, tuple[dict[str, Any], str]] = {
    "missing column": (
        {"data.features": ["a", "wind"]},
        "data.features: column(s) 'wind' not in series.csv; columns: t, a, b",
    ),
    "missing target": ({"data.targets": ["c"]}, "data.targets: column(s) 'c' not in"),
    "window longer than the data": (
        {"data.window": 100},
        "data.window: window 100 is longer than the train split",
    ),
    "window longer than a stream": (
        {"data.window": 30, "training.stateful": True, "training.batch_size": 4},
        "data.window: window 30 is longer than each stateful stream",
    ),
    "missing file": ({"data.file": "nope.csv"}, "data.file: cannot read"),
}


@pytest.mark.parametrize("case", sorted(DATA_ERRORS))
def test_data_problems_fail_before_training(case: str, tmp_path: Path) -> None:
    overrides, message = DATA_ERRORS[case]
    path = _write(tmp_path, _config(tmp_path, **copy.deepcopy(overrides)))
    with pytest.raises(ConfigError) as info:
        run_training(path, models_dir=tmp_path / "models")
    assert str(info.value).startswith(message), str(info.value)
    assert not (tmp_path / "run").exists() and not (tmp_path / "models").exists()


def test_gaps_are_an_error_unless_a_policy_is_chosen(tmp_path: Path) -> None:
    path = _write(tmp_path, _config(tmp_path))
    (tmp_path / "series.csv").write_text(CSV.replace("\n5,5,0\n", "\n5,,0\n"))
    with pytest.raises(ConfigError, match=r"^data.missing: column 'a' has 1 missing value"):
        run_training(path, models_dir=tmp_path / "models")


def test_an_existing_version_is_refused_before_training(tmp_path: Path) -> None:
    (tmp_path / "models" / "tiny" / "3").mkdir(parents=True)
    path = _write(tmp_path, _config(tmp_path, **{"export.version": 3}))
    with pytest.raises(ConfigError, match=r"^export.version: .*tiny/3 already exists"):
        run_training(path, models_dir=tmp_path / "models")
    assert not (tmp_path / "run").exists()


def test_the_cli_prints_the_field_and_exits_1(tmp_path: Path) -> None:
    path = _write(tmp_path, _config(tmp_path, **{"training.optimizer": "adamw2"}))
    result = CliRunner().invoke(app, ["train", str(path), "--models-dir", str(tmp_path / "m")])
    assert result.exit_code == 1
    assert "training.optimizer: unknown optimizer 'adamw2'" in result.output


def test_threads_default_to_half_the_cpus_this_process_may_use(tmp_path: Path) -> None:
    assert available_cpus() == len(os.sched_getaffinity(0))
    config = parse_config(_config(tmp_path), tmp_path)
    assert config.training.threads == max(1, available_cpus() // 2)
    pinned = parse_config(_config(tmp_path, **{"training.threads": 3}), tmp_path)
    assert pinned.training.threads == 3
    # a process confined to one CPU (taskset, a container's cpuset) counts one
    one_cpu = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from gruserve.train.config import available_cpus, default_threads; "
            "print(available_cpus(), default_threads())",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert one_cpu.stdout.split() == ["1", "1"]


def test_training_runs_on_the_configured_threads(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    wanted = 2 if before != 2 else 3
    try:
        path = _write(
            tmp_path, _config(tmp_path, **{"training.threads": wanted, "export.enabled": False})
        )
        run_training(path, models_dir=tmp_path / "models")
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)
