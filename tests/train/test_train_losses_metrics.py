"""Every loss and metric name against the real keras functions and metric objects."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gruserve.train.losses import get_loss
from gruserve.train.metrics import get_metric
from keras_helpers import keras, to_numpy

B, T, D = 4, 5, 3


def _regression(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return (
        rng.normal(size=(B, T, D)).astype(np.float32) * 2,
        rng.normal(size=(B, T, D)).astype(np.float32) * 2,
    )


def _probabilities(rng: np.random.Generator) -> np.ndarray:
    p = rng.random((B, T, D)).astype(np.float32) + 0.05
    return p / p.sum(-1, keepdims=True)


def _pair(name: str, rng: np.random.Generator):  # type: ignore[no-untyped-def]
    if name in ("binary_crossentropy", "bce"):
        return (rng.random((B, T, D)) > 0.5).astype(np.float32), _probabilities(rng)
    if name == "categorical_crossentropy":
        return np.eye(D, dtype=np.float32)[rng.integers(0, D, (B, T))], _probabilities(rng)
    if name == "sparse_categorical_crossentropy":
        return rng.integers(0, D, (B, T)).astype(np.float32), _probabilities(rng)
    if name in ("msle", "mean_squared_logarithmic_error"):
        y, p = _regression(rng)
        return np.abs(y), np.abs(p)
    return _regression(rng)


LOSSES = [
    "mse",
    "mae",
    "mape",
    "msle",
    "huber",
    "log_cosh",
    "mean_squared_error",
    "binary_crossentropy",
    "categorical_crossentropy",
    "sparse_categorical_crossentropy",
]


@pytest.mark.parametrize("name", LOSSES)
def test_losses_equal_keras(name: str, rng: np.random.Generator) -> None:
    y, p = _pair(name, rng)
    expected = keras.losses.get(name)(y, p)
    ours = get_loss(name).values(torch.from_numpy(y), torch.from_numpy(p))
    np.testing.assert_allclose(to_numpy(ours), to_numpy(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("class_name", "config"),
    [
        ("Huber", {"delta": 0.3}),
        ("BinaryCrossentropy", {"from_logits": True, "label_smoothing": 0.1}),
        ("CategoricalCrossentropy", {"from_logits": True, "label_smoothing": 0.2}),
        ("SparseCategoricalCrossentropy", {"from_logits": True}),
        ("MeanSquaredError", {"reduction": "sum"}),
    ],
)
def test_configured_losses_equal_keras_objects(
    class_name: str, config: dict, rng: np.random.Generator
) -> None:
    name = {"Huber": "huber", "MeanSquaredError": "mse"}.get(class_name, "")
    snake = (
        name
        or {
            "BinaryCrossentropy": "binary_crossentropy",
            "CategoricalCrossentropy": "categorical_crossentropy",
            "SparseCategoricalCrossentropy": "sparse_categorical_crossentropy",
        }[class_name]
    )
    y, p = _pair(snake, rng)
    if config.get("from_logits"):
        p = np.log(p) * 3
    expected = getattr(keras.losses, class_name)(**config)(y, p)
    ours = get_loss({"class_name": class_name, "config": config})(
        torch.from_numpy(y), torch.from_numpy(p)
    )
    assert float(ours) == pytest.approx(float(to_numpy(expected)), rel=1e-5)


@pytest.mark.parametrize(
    ("name", "keras_metric", "task"),
    [
        ("mae", "MeanAbsoluteError", "regression"),
        ("mse", "MeanSquaredError", "regression"),
        ("rmse", "RootMeanSquaredError", "regression"),
        ("mape", "MeanAbsolutePercentageError", "regression"),
        ("accuracy", "SparseCategoricalAccuracy", "sparse"),
        ("accuracy", "CategoricalAccuracy", "categorical"),
        ("accuracy", "BinaryAccuracy", "binary"),
    ],
)
def test_metrics_accumulate_like_keras(
    name: str, keras_metric: str, task: str, rng: np.random.Generator
) -> None:
    loss = {
        "sparse": "sparse_categorical_crossentropy",
        "categorical": "categorical_crossentropy",
        "binary": "binary_crossentropy",
    }.get(task, "mse")
    theirs = getattr(keras.metrics, keras_metric)()
    ours = get_metric(name, task)
    for step in range(3):  # batches of different lengths, as a stateful epoch's last chunk
        y, p = _pair(loss, rng)
        y, p = y[:, : T - step], p[:, : T - step]
        theirs.update_state(y, p)
        ours.update(torch.from_numpy(y), torch.from_numpy(p))
    assert ours.result() == pytest.approx(float(to_numpy(theirs.result())), rel=1e-5)
    assert ours.name == name
