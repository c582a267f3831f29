"""The training configuration (YAML), validated completely before any training.

Four sections (see the README, "Training", for every key and default):

- ``data``: CSV file, feature and target columns, window, horizon, splits,
  scaling, missing values;
- ``model``: Keras's ``Sequential.get_config()`` (or just its ``layers``
  list): the same layer dicts Keras writes, so a Keras user can paste theirs;
- ``training``: optimizer, loss and metrics by their Keras names, epochs,
  batch size, shuffle, seed, ``stateful`` truncated back-propagation,
  early stopping, checkpoints, learning-rate reduction, torch's threads;
- ``export``: model name and version in the repository.

Every error is a :class:`~gruserve.errors.ConfigError` whose message starts
with the dotted field, e.g. ``training.optimizer: unknown optimizer 'adamw2'``.
Checks that need the data file (columns, window length) are in
:mod:`gruserve.train.data` and also run before the first step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gruserve.errors import ConfigError, GruServeError
from gruserve.layers.model import ModelSpec
from gruserve.repository import validate_model_name
from gruserve.train._reader import Section
from gruserve.train.callbacks import CallbackConfig, read_callbacks
from gruserve.train.losses import Loss, get_loss
from gruserve.train.metrics import get_metrics
from gruserve.train.model_config import model_spec
from gruserve.train.optimizer_config import OptimizerSpec, optimizer_spec
from gruserve.train.scaling import METHODS
from gruserve.train.table import MISSING_POLICIES


@dataclass(frozen=True)
class DataConfig:
    file: Path
    features: list[str]
    targets: list[str]
    window: int
    horizon: int = 1
    stride: int = 1
    validation_split: float = 0.2
    test_split: float = 0.0
    scaling: str = "standard"
    target_scaling: str = "standard"
    missing: str = "error"
    delimiter: str = ","


@dataclass(frozen=True)
class TrainingConfig:
    optimizer: OptimizerSpec
    loss: Loss
    metrics: list[str]
    epochs: int = 1
    batch_size: int = 32
    shuffle: bool = True
    seed: int | None = None
    stateful: bool = False
    callbacks: CallbackConfig | None = None
    output_dir: Path = Path("runs")
    progress: bool = True
    threads: int = 1
    """torch's intra-op threads (``torch.set_num_threads``); see :func:`default_threads`."""


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: what ``taskset`` or a container's
    cpuset leave it), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this OS
        return os.cpu_count() or 1


def default_threads() -> int:
    """Half the CPUs available to the process, at least one.

    torch's own default, every core, made the demo take 50 s instead of 17 s for 15 epochs
    on a 2-core machine that other processes kept busy: models of this size gain nothing
    from a second thread, and its OpenMP workers wait for a core that is not free.
    """
    return max(1, available_cpus() // 2)


@dataclass(frozen=True)
class ExportConfig:
    enabled: bool = True
    name: str = "model"
    version: int | None = None
    weights: str = "best"


@dataclass(frozen=True)
class TrainConfig:
    """A whole validated configuration; ``model`` is the spec used for training."""

    path: Path
    data: DataConfig
    model: ModelSpec
    training: TrainingConfig
    export: ExportConfig

    @property
    def sequence_output(self) -> bool:
        return self.model.returns_sequences()


def load_config(path: Path | str) -> TrainConfig:
    """Read and validate a YAML training config.

    Raises:
        ConfigError: the file is unreadable or any field is invalid.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the config: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"not valid YAML: {exc}") from None
    return parse_config(raw, base_dir=path.parent, path=path)


def parse_config(raw: Any, base_dir: Path = Path("."), path: Path | None = None) -> TrainConfig:
    """Validate an already-parsed config mapping (paths resolve against ``base_dir``)."""
    root = Section("", raw)
    data = _data(root.section("data", required=True), base_dir)
    model_section = root.raw("model")
    training_section = root.section("training", required=True)
    stateful = training_section.boolean("stateful", False)
    batch_size = training_section.integer("batch_size", 32, minimum=1)
    model = model_spec(model_section, len(data.features), stateful, batch_size)
    training = _training(training_section, data, model, stateful, batch_size)
    export = _export(root.section("export"), model.name)
    root.finish()
    return TrainConfig(path or base_dir / "config.yaml", data, model, training, export)


# ----------------------------------------------------------------------------- data
def _data(s: Section, base_dir: Path) -> DataConfig:
    file = Path(s.string("file"))
    features = s.strings("features")
    targets = s.strings("targets")
    window = s.integer("window", minimum=1)
    horizon = s.integer("horizon", 1, minimum=0)
    stride = s.integer("stride", 1, minimum=1)
    validation_split = s.number("validation_split", 0.2, minimum=0.0, maximum=0.9)
    test_split = s.number("test_split", 0.0, minimum=0.0, maximum=0.9)
    if validation_split + test_split >= 1.0:
        raise s.error(
            "test_split",
            f"validation_split + test_split must be < 1, got {validation_split:g} + {test_split:g}",
        )
    scaling = s.choice("scaling", "standard", METHODS)
    target_scaling = s.choice("target_scaling", scaling, METHODS)
    missing = s.choice("missing", "error", MISSING_POLICIES)
    delimiter = s.string("delimiter", ",")
    s.finish()
    return DataConfig(
        file=file if file.is_absolute() else base_dir / file,
        features=features,
        targets=targets,
        window=window,
        horizon=horizon,
        stride=stride,
        validation_split=validation_split,
        test_split=test_split,
        scaling=scaling,
        target_scaling=target_scaling,
        missing=missing,
        delimiter=delimiter,
    )


# ----------------------------------------------------------------------------- training
def _training(
    s: Section, data: DataConfig, model: ModelSpec, stateful: bool, batch_size: int
) -> TrainingConfig:
    optimizer = optimizer_spec(s.raw("optimizer", "rmsprop"), "training.optimizer")
    loss = get_loss(s.raw("loss"), "training.loss")
    metric_names = s.raw("metrics", [])
    metrics = get_metrics(metric_names, loss.task, "training.metrics")
    _check_outputs(model, data, loss)
    if loss.task != "regression" and data.target_scaling != "none":
        raise ConfigError(
            "data.target_scaling",
            f"must be none for the classification loss {loss.name!r}; got {data.target_scaling!r}",
        )
    shuffle = s.boolean("shuffle", not stateful)
    if stateful and shuffle:
        raise s.error(
            "shuffle",
            "must be false with stateful: true (sample i of each batch "
            "continues sample i of the previous batch)",
        )
    history_names = ["loss", *(m.name for m in metrics)]
    has_validation = data.validation_split > 0
    callbacks = read_callbacks(
        s, history_names, has_validation, {m.name: m.higher_is_better for m in metrics}
    )
    output_dir = s.raw("output_dir", None)
    training = TrainingConfig(
        optimizer=optimizer,
        loss=loss,
        metrics=[m.name for m in metrics],
        epochs=s.integer("epochs", 1, minimum=1),
        batch_size=batch_size,
        shuffle=shuffle,
        seed=s.optional_integer("seed", minimum=0),
        stateful=stateful,
        callbacks=callbacks,
        output_dir=Path(output_dir) if output_dir else Path("runs") / model.name,
        progress=s.boolean("progress", True),
        threads=s.integer("threads", default_threads(), minimum=1),
    )
    s.finish()
    return training


def _check_outputs(model: ModelSpec, data: DataConfig, loss: Loss) -> None:
    width = model.output_features()
    targets = len(data.targets)
    if loss.task == "sparse":
        if targets != 1:
            raise ConfigError(
                "data.targets",
                f"loss {loss.name!r} needs one column of class ids, got {targets} columns",
            )
    elif width != targets:
        raise ConfigError(
            "model.layers",
            f"the model outputs {width} value(s) per step but "
            f"data.targets lists {targets} column(s)",
        )


# ----------------------------------------------------------------------------- export
def _export(s: Section, model_name: str) -> ExportConfig:
    name = s.string("name", model_name)
    try:
        validate_model_name(name)
    except GruServeError as exc:
        raise s.error("name", str(exc)) from None
    export = ExportConfig(
        enabled=s.boolean("enabled", True),
        name=name,
        version=s.optional_integer("version", minimum=1),
        weights=s.choice("weights", "best", ("best", "last")),
    )
    s.finish()
    return export
