"""EarlyStopping and ReduceLROnPlateau decide exactly when Keras's callbacks do."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from gruserve.train.callbacks import (
    EarlyStopping,
    EarlyStoppingConfig,
    ReduceLRConfig,
    ReduceLROnPlateau,
)
from keras_helpers import keras

LOSSES = [1.0, 0.8, 0.81, 0.79, 0.795, 0.9, 0.7, 0.71, 0.72, 0.73, 0.74, 0.75, 0.76]


class _FakeKerasModel:
    """What Keras's callbacks touch on a model: weights, stop flag, optimizer."""

    def __init__(self) -> None:
        self.stop_training = False
        self.epoch = 0
        self.optimizer = SimpleNamespace(learning_rate=0.1)

    def get_weights(self) -> list[np.ndarray]:
        return [np.array([self.epoch])]

    def set_weights(self, weights: list[np.ndarray]) -> None:
        self.epoch = int(weights[0][0])


class _FakeTrainer:
    def __init__(self) -> None:
        self.stop_training = False
        self.epoch = 0
        self.optimizer = SimpleNamespace(learning_rate=0.1)
        self.model = SimpleNamespace(
            get_weights=lambda: {"l": {"w": np.array([self.epoch])}}, set_weights=self._restore
        )

    def _restore(self, weights: dict) -> None:
        self.epoch = int(weights["l"]["w"][0])


@pytest.mark.parametrize(
    "options",
    [
        {"patience": 0},
        {"patience": 2},
        {"patience": 2, "min_delta": 0.015},
        {"patience": 3, "restore_best_weights": True},
        {"patience": 1, "baseline": 0.75},
        {"patience": 1, "start_from_epoch": 4},
    ],
)
def test_early_stopping_matches_keras(options: dict) -> None:
    theirs = keras.callbacks.EarlyStopping(monitor="val_loss", **options)
    model = _FakeKerasModel()
    theirs.set_model(model)
    theirs.on_train_begin()
    ours = EarlyStopping(EarlyStoppingConfig(monitor="val_loss", higher_is_better=False, **options))
    trainer = _FakeTrainer()
    keras_stop = ours_stop = None
    for epoch, loss in enumerate(LOSSES):
        model.epoch = trainer.epoch = epoch
        if keras_stop is None:
            theirs.on_epoch_end(epoch, {"val_loss": loss})
            keras_stop = epoch if model.stop_training else None
        if ours_stop is None:
            ours.on_epoch_end(epoch, {"val_loss": loss}, trainer)  # type: ignore[arg-type]
            ours_stop = epoch if trainer.stop_training else None
    theirs.on_train_end()
    ours.on_train_end(trainer)  # type: ignore[arg-type]
    assert ours_stop == keras_stop
    assert ours_stop is not None or options.get("start_from_epoch") or options.get("baseline")
    assert trainer.epoch == model.epoch  # the same weights restored (or kept)


@pytest.mark.parametrize(
    "options",
    [
        {"patience": 1},
        {"patience": 2, "cooldown": 2},
        {"patience": 0, "min_lr": 0.02, "factor": 0.5},
    ],
)
def test_reduce_lr_on_plateau_matches_keras(options: dict) -> None:
    theirs = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", **options)
    model = _FakeKerasModel()
    theirs.set_model(model)
    theirs.on_train_begin()
    config = {"factor": 0.1, "min_delta": 1e-4, **options}
    ours = ReduceLROnPlateau(ReduceLRConfig(monitor="val_loss", higher_is_better=False, **config))
    trainer = _FakeTrainer()
    for epoch, loss in enumerate(LOSSES):
        theirs.on_epoch_end(epoch, {"val_loss": loss})
        ours.on_epoch_end(epoch, {"val_loss": loss}, trainer)  # type: ignore[arg-type]
        assert trainer.optimizer.learning_rate == pytest.approx(model.optimizer.learning_rate)
    assert trainer.optimizer.learning_rate < 0.1  # the plateau was detected at least once
