"""Keras's EarlyStopping, ReduceLROnPlateau and a best/last checkpoint, as fit callbacks.

The improvement rule is Keras's ``MonitorCallback``: in ``min`` mode a value
improves on the best when ``value - min_delta < best``; ``auto`` minimises
losses and errors and maximises accuracies. EarlyStopping counts epochs
without improvement and stops once ``wait >= patience`` (never after the
first epoch), optionally restoring the best weights at the end, exactly as
``keras.callbacks.EarlyStopping`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gruserve.train._reader import Section
from gruserve.train.checkpoints import save_weights

if TYPE_CHECKING:
    from gruserve.train.loop import Trainer

Logs = dict[str, float]


@dataclass(frozen=True)
class MonitorConfig:
    monitor: str
    higher_is_better: bool
    min_delta: float = 0.0
    baseline: float | None = None


@dataclass(frozen=True)
class EarlyStoppingConfig(MonitorConfig):
    patience: int = 0
    restore_best_weights: bool = False
    start_from_epoch: int = 0


@dataclass(frozen=True)
class ReduceLRConfig(MonitorConfig):
    factor: float = 0.1
    patience: int = 10
    cooldown: int = 0
    min_lr: float = 0.0


@dataclass(frozen=True)
class CallbackConfig:
    checkpoint: MonitorConfig
    early_stopping: EarlyStoppingConfig | None = None
    reduce_lr: ReduceLRConfig | None = None


def read_callbacks(
    training: Section, names: list[str], has_validation: bool, higher: dict[str, bool]
) -> CallbackConfig:
    """Read ``training.early_stopping``, ``.checkpoint`` and ``.reduce_lr_on_plateau``."""
    available = names + ([f"val_{n}" for n in names] if has_validation else [])
    default = "val_loss" if has_validation else "loss"

    def monitor(s: Section, min_delta: float) -> dict[str, Any]:
        name = s.string("monitor", default)
        if name not in available:
            hint = "" if has_validation else " (val_* needs data.validation_split > 0)"
            raise s.error(
                "monitor", f"unknown quantity {name!r}; available: {', '.join(available)}{hint}"
            )
        mode = s.choice("mode", "auto", ("auto", "min", "max"))
        up = higher.get(name.removeprefix("val_"), False) if mode == "auto" else mode == "max"
        return {
            "monitor": name,
            "higher_is_better": up,
            "min_delta": abs(s.number("min_delta", min_delta)),
        }

    checkpoint_section = training.section("checkpoint")
    checkpoint = MonitorConfig(**monitor(checkpoint_section, 0.0))
    checkpoint_section.finish()

    early = None
    if training.raw("early_stopping", None) is not None:
        s = training.section("early_stopping")
        early = EarlyStoppingConfig(
            **monitor(s, 0.0),
            baseline=s.optional_number("baseline"),
            patience=s.integer("patience", 0, minimum=0),
            restore_best_weights=s.boolean("restore_best_weights", False),
            start_from_epoch=s.integer("start_from_epoch", 0, minimum=0),
        )
        s.finish()

    reduce_lr = None
    if training.raw("reduce_lr_on_plateau", None) is not None:
        s = training.section("reduce_lr_on_plateau")
        reduce_lr = ReduceLRConfig(
            **monitor(s, 1e-4),
            factor=s.number("factor", 0.1, minimum=0.0, exclusive_minimum=True),
            patience=s.integer("patience", 10, minimum=0),
            cooldown=s.integer("cooldown", 0, minimum=0),
            min_lr=s.number("min_lr", 0.0, minimum=0.0),
        )
        if reduce_lr.factor >= 1.0:
            raise s.error("factor", f"must be < 1, got {reduce_lr.factor:g}")
        s.finish()
    return CallbackConfig(checkpoint, early, reduce_lr)


class Callback:
    """Hooks the training loop calls; every method is optional."""

    def on_train_begin(self, trainer: Trainer) -> None: ...

    def on_epoch_begin(self, epoch: int, trainer: Trainer) -> None: ...

    def on_batch_end(self, batch: int, logs: Logs, trainer: Trainer) -> None: ...

    def on_epoch_end(self, epoch: int, logs: Logs, trainer: Trainer) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...


class Monitor:
    """Keras's improvement test for one logged quantity."""

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self.best: float | None = None

    def improves(self, value: float, reference: float | None) -> bool:
        if reference is None:
            return True
        if self.config.higher_is_better:
            return value - self.config.min_delta > reference
        return value + self.config.min_delta < reference

    def value(self, logs: Logs) -> float | None:
        value = logs.get(self.config.monitor)
        return None if value is None or not np.isfinite(value) else float(value)


class EarlyStopping(Callback):
    """``keras.callbacks.EarlyStopping`` with the same counters and restore rule."""

    def __init__(self, config: EarlyStoppingConfig) -> None:
        self.config = config
        self.monitor = Monitor(config)
        self.wait = 0
        self.stopped_epoch: int | None = None
        self.best_epoch: int | None = None
        self.best_weights: dict[str, dict[str, np.ndarray]] | None = None

    def on_epoch_end(self, epoch: int, logs: Logs, trainer: Trainer) -> None:
        current = self.monitor.value(logs)
        if current is None or epoch < self.config.start_from_epoch:
            return
        if self.config.restore_best_weights and self.best_weights is None:
            self.best_weights, self.best_epoch = trainer.model.get_weights(), epoch
        self.wait += 1
        if self.monitor.improves(current, self.monitor.best):
            self.monitor.best, self.best_epoch = current, epoch
            if self.config.restore_best_weights:
                self.best_weights = trainer.model.get_weights()
            if self.config.baseline is None or self.monitor.improves(current, self.config.baseline):
                self.wait = 0
            return
        if self.wait >= self.config.patience and epoch > 0:
            self.stopped_epoch = epoch
            trainer.stop_training = True

    def on_train_end(self, trainer: Trainer) -> None:
        if self.config.restore_best_weights and self.best_weights is not None:
            trainer.model.set_weights(self.best_weights)


class ReduceLROnPlateau(Callback):
    """``keras.callbacks.ReduceLROnPlateau``: multiply the learning rate by ``factor``."""

    def __init__(self, config: ReduceLRConfig) -> None:
        self.config = config
        self.monitor = Monitor(config)
        self.wait = 0
        self.cooldown = 0

    def on_epoch_end(self, epoch: int, logs: Logs, trainer: Trainer) -> None:
        current = self.monitor.value(logs)
        if current is None:
            return
        if self.cooldown > 0:
            self.cooldown -= 1
            self.wait = 0
        if self.monitor.improves(current, self.monitor.best):
            self.monitor.best, self.wait = current, 0
        elif self.cooldown == 0:
            self.wait += 1
            optimizer = trainer.optimizer
            if self.wait >= self.config.patience and optimizer.learning_rate > np.float32(
                self.config.min_lr
            ):
                optimizer.learning_rate = max(
                    optimizer.learning_rate * self.config.factor, self.config.min_lr
                )
                self.cooldown, self.wait = self.config.cooldown, 0


class Checkpoint(Callback):
    """Writes ``last.safetensors`` after every epoch and ``best.safetensors`` on improvement.

    Both are replaced atomically, so an interrupted run always leaves the
    last complete epoch's weights and the best ones on disk.
    """

    def __init__(self, config: MonitorConfig, directory: Path) -> None:
        self.config = config
        self.monitor = Monitor(config)
        self.directory = Path(directory)
        self.best_epoch: int | None = None

    @property
    def best_path(self) -> Path:
        return self.directory / "best.safetensors"

    @property
    def last_path(self) -> Path:
        return self.directory / "last.safetensors"

    def on_epoch_end(self, epoch: int, logs: Logs, trainer: Trainer) -> None:
        weights = trainer.model.get_weights()
        metadata = {"epoch": str(epoch + 1), **{k: repr(float(v)) for k, v in logs.items()}}
        save_weights(self.last_path, weights, metadata)
        current = self.monitor.value(logs)
        if current is not None and self.monitor.improves(current, self.monitor.best):
            self.monitor.best, self.best_epoch = current, epoch
            save_weights(self.best_path, weights, {**metadata, "monitor": self.config.monitor})
