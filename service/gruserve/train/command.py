"""``gruserve train CONFIG.yaml``: validate, train, report, export — in that order.

Everything that can be wrong with the config or the data is found before the
first step (:func:`load_config`, :func:`prepare_data`, the target version
folder). Training writes into ``training.output_dir``: ``checkpoints/`` (best
and last, safetensors), ``history.json`` and ``curves.png``. The exported
version goes through the core exporter, parity check included, with the
scaling in ``preprocessing`` and the held-out error in ``metrics``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from gruserve.errors import ConfigError, TrainingInterrupted
from gruserve.export.exporter import ExportResult, export_model
from gruserve.nn.sequential import Sequential
from gruserve.train.callbacks import Callback, Checkpoint, EarlyStopping, ReduceLROnPlateau
from gruserve.train.checkpoints import load_weights
from gruserve.train.config import TrainConfig, load_config
from gruserve.train.data import PreparedData, prepare_data
from gruserve.train.evaluation import StreamValidation, WindowValidation, forecast_report
from gruserve.train.loop import History, Trainer, Validation
from gruserve.train.model_config import inference_spec
from gruserve.train.progress import ProgressBar
from gruserve.train.report import plot_curves, write_history


@dataclass(frozen=True)
class TrainingResult:
    config: TrainConfig
    history: History
    report: dict[str, Any]
    weights: dict[str, dict[str, np.ndarray]]
    output_dir: Path
    export: ExportResult | None
    seconds: float


def run_training(
    config_path: Path | str, *, models_dir: Path = Path("models"), console: Console | None = None
) -> TrainingResult:
    """Train the model of one config file and export it into ``models_dir``.

    Raises:
        ConfigError: anything wrong in the config or the data, before training.
        TrainingInterrupted: Ctrl-C; the checkpoints of the last complete epoch stay.
    """
    console = console or Console(stderr=True)
    started = time.monotonic()
    config = load_config(config_path)
    t = config.training
    data = prepare_data(
        config.data,
        sequence_output=config.sequence_output,
        batch_size=t.batch_size,
        stateful=t.stateful,
    )
    _check_version_is_free(config, Path(models_dir))
    seed = t.seed if t.seed is not None else int(np.random.default_rng().integers(2**31))
    torch.set_num_threads(t.threads)
    torch.manual_seed(seed)
    model = Sequential.from_spec(config.model)
    model.initialize_weights(np.random.default_rng(seed))
    trainer = Trainer(
        model, t.optimizer.build(model.parameters()), t.loss, t.metrics, stateful=t.stateful
    )
    batches = data.training_batches(t.batch_size, t.shuffle, seed, t.stateful)
    export_spec = inference_spec(config.model)
    checkpoint = Checkpoint(t.callbacks.checkpoint, t.output_dir / "checkpoints")  # type: ignore[union-attr]
    callbacks = _callbacks(config, len(batches), checkpoint)
    _describe(console, config, data, model, len(batches), seed)

    history = trainer.fit(batches, t.epochs, _validation(config, data, export_spec), callbacks)
    facts: dict[str, Any] = {
        "config": str(config.path),
        "seed": seed,
        "best_epoch": _epoch(checkpoint.best_epoch),
        "monitor": checkpoint.config.monitor,
        "checkpoints": {"best": str(checkpoint.best_path), "last": str(checkpoint.last_path)},
    }
    if history.interrupted:
        write_history(t.output_dir, history, facts)
        raise TrainingInterrupted(len(history.epochs) + 1, t.epochs, _kept(checkpoint, history))

    weights = model.get_weights()
    if config.export.weights == "best" and checkpoint.best_epoch is not None:
        weights, _ = load_weights(checkpoint.best_path)
    report = forecast_report(data, export_spec, weights, t.loss.task)
    seconds = time.monotonic() - started
    facts.update(
        {
            "epochs_trained": len(history.epochs),
            "train_seconds": round(seconds, 1),
            "exported_weights": "best"
            if checkpoint.best_epoch is not None and config.export.weights == "best"
            else "last",
            **report,
        }
    )
    write_history(t.output_dir, history, facts)
    plot_curves(t.output_dir, history, title=f"{config.model.name}: {t.loss.name}")

    exported = None
    if config.export.enabled:
        with console.status("exporting to ONNX and checking parity"):
            exported = export_model(
                export_spec,
                weights,
                models_dir=Path(models_dir),
                name=config.export.name,
                version=config.export.version,
                preprocessing=data.preprocessing(),
                source={
                    "kind": "gruserve train",
                    "config": str(config.path),
                    "data": config.data.file.name,
                    "seed": seed,
                },
                metrics=_manifest_metrics(report, history, facts),
            )
    _summarise(console, report, t.output_dir, exported, seconds)
    return TrainingResult(config, history, report, weights, t.output_dir, exported, seconds)


def _check_version_is_free(config: TrainConfig, models_dir: Path) -> None:
    """An explicit version that exists would fail the export after all the training."""
    if not (config.export.enabled and config.export.version):
        return
    target = models_dir / config.export.name / str(config.export.version)
    if target.exists():
        raise ConfigError(
            "export.version",
            f"{target} already exists; remove it or choose another version "
            "(or leave version out for the next free one)",
        )


def _callbacks(config: TrainConfig, steps: int, checkpoint: Checkpoint) -> list[Callback]:
    t = config.training
    callbacks: list[Callback] = []
    if t.progress:
        callbacks.append(ProgressBar(t.epochs, steps))
    callbacks.append(checkpoint)
    if t.callbacks and t.callbacks.early_stopping:
        callbacks.append(EarlyStopping(t.callbacks.early_stopping))
    if t.callbacks and t.callbacks.reduce_lr:
        callbacks.append(ReduceLROnPlateau(t.callbacks.reduce_lr))
    return callbacks


def _validation(config: TrainConfig, data: PreparedData, spec: Any) -> Validation | None:
    if data.size("validation") == 0:
        return None
    if config.sequence_output and config.training.stateful:
        return StreamValidation(spec, data)
    x, y = data.windows("validation")
    return WindowValidation(spec, x, y, config.training.batch_size)


def _epoch(index: int | None) -> int | None:
    return None if index is None else index + 1


def _kept(checkpoint: Checkpoint, history: History) -> str:
    if not history.epochs:
        return "no epoch had finished, so no checkpoint was written"
    best = checkpoint.monitor.best
    if best is None:
        return f"kept {checkpoint.last_path} (epoch {len(history.epochs)})"
    return (
        f"kept {checkpoint.last_path} (epoch {len(history.epochs)}) and {checkpoint.best_path}"
        f" (epoch {_epoch(checkpoint.best_epoch)}, {checkpoint.config.monitor}={best:.6g})"
    )


def _manifest_metrics(
    report: dict[str, Any], history: History, facts: dict[str, Any]
) -> dict[str, Any]:
    metrics = {k: _rounded(v) for k, v in report.items() if isinstance(v, (int, float, str, bool))}
    metrics["epochs_trained"] = facts["epochs_trained"]
    metrics["best_epoch"] = facts["best_epoch"]
    last = history.epochs[-1] if history.epochs else {}
    for key in ("loss", "val_loss"):
        if key in last:
            metrics[f"final_{key}"] = _rounded(last[key])
    return metrics


def _rounded(value: Any) -> Any:
    """Six significant digits: a manifest is read by people, float noise helps nobody."""
    return float(f"{value:.6g}") if isinstance(value, float) else value


def _describe(
    console: Console,
    config: TrainConfig,
    data: PreparedData,
    model: Sequential,
    steps: int,
    seed: int,
) -> None:
    t = config.training
    parameters = sum(p.numel() for p in model.parameters())
    console.print(
        f"[bold]{config.model.name}[/]: {parameters} weights; {config.data.file.name}: "
        f"{data.size('train')} training / {data.size('validation')} validation / "
        f"{data.size('test')} test steps; {'stateful ' if t.stateful else ''}{steps} batches "
        f"per epoch; {t.optimizer.name}, {t.loss.name}, seed {seed}, "
        f"{t.threads} torch thread{'s' if t.threads > 1 else ''}",
        highlight=False,
    )


def _summarise(
    console: Console,
    report: dict[str, Any],
    output_dir: Path,
    exported: ExportResult | None,
    seconds: float,
) -> None:
    if "heldout_mae" in report:
        model = f"MAE {report['heldout_mae']:.4g}, RMSE {report['heldout_rmse']:.4g}"
        naive = (
            f"MAE {report['naive_last_value_mae']:.4g}, RMSE {report['naive_last_value_rmse']:.4g}"
        )
        split = f"{report['heldout_split']} ({report['heldout_steps']} steps)"
        console.print(f"held-out {split}: {model}; naive last value: {naive}", highlight=False)
    elif "heldout_accuracy" in report:
        split = f"{report['heldout_split']} ({report['heldout_steps']} steps)"
        console.print(
            f"held-out {split}: accuracy {report['heldout_accuracy']:.4g}", highlight=False
        )
    console.print(f"history and curves in {output_dir} ({seconds:.0f} s)", highlight=False)
    if exported is not None:
        parity = exported.manifest.parity
        console.print(
            f"[green]exported[/] {exported.path} (parity max |diff| {parity['max_abs_diff']:.2e})",
            highlight=False,
        )
