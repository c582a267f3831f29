"""gruserve's fit against Keras's own ``fit`` (keras package, torch backend).

Same initial weights, same data and batches (shuffle off), same optimizer and
loss: after 5 steps every weight must equal Keras's to 1e-4, with l1+l2
regularizers, an activity regularizer and max_norm / unit_norm / non_neg
constraints on. The logged loss and metrics must match Keras's history too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from keras_pairs import twin, weight_diff

from gruserve.train.loop import Trainer
from gruserve.train.losses import get_loss
from gruserve.train.optimizer_config import optimizer_spec
from gruserve.train.windows import ArrayBatches
from keras_helpers import keras

BATCH, STEPS, T, F = 8, 5, 6, 3
TOLERANCE = 1e-4


def _regularized_model(activity: bool = False) -> keras.Model:
    l1_l2 = keras.regularizers.L1L2(l1=1e-3, l2=1e-2)
    return keras.Sequential(
        [
            keras.Input((T, F)),
            keras.layers.GRU(
                5,
                return_sequences=True,
                kernel_regularizer=l1_l2,
                recurrent_regularizer=keras.regularizers.L2(1e-2),
                bias_regularizer=keras.regularizers.L1(1e-3),
                kernel_constraint=keras.constraints.MaxNorm(0.5),
                recurrent_constraint=keras.constraints.MaxNorm(0.8, axis=1),
                activity_regularizer=keras.regularizers.L2(1e-2) if activity else None,
            ),
            keras.layers.GRU(4, reset_after=False, bias_constraint=keras.constraints.NonNeg()),
            keras.layers.Dense(
                2, kernel_regularizer=l1_l2, kernel_constraint=keras.constraints.UnitNorm()
            ),
        ]
    )


def _data(seed: int = 1, targets: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH * STEPS, T, F)).astype(np.float32)
    y = rng.normal(size=(BATCH * STEPS, targets)).astype(np.float32)
    return x, y


def _fit_both(
    model: keras.Model,
    optimizer: dict,
    loss: str,
    x: np.ndarray,
    y: np.ndarray,
    metrics: list[str] | None = None,
):  # type: ignore[no-untyped-def]
    ours = twin(model)
    before = {k: {p: v.copy() for p, v in w.items()} for k, w in ours.get_weights().items()}
    model.compile(
        optimizer=keras.optimizers.deserialize(dict(optimizer)),
        loss=loss,
        metrics=list(metrics or []),
    )
    history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    trainer = Trainer(
        ours, optimizer_spec(optimizer).build(ours.parameters()), get_loss(loss), metrics or []
    )
    mine = trainer.fit(ArrayBatches(x, y, BATCH), epochs=1)
    moved = max(
        float(np.max(np.abs(ours.get_weights()[k][p] - before[k][p])))
        for k in before
        for p in before[k]
    )
    return ours, history.history, mine, moved


@pytest.mark.parametrize(
    "optimizer",
    [
        {"class_name": "SGD", "config": {"learning_rate": 0.1}},
        {"class_name": "SGD", "config": {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True}},
        {"class_name": "Adam", "config": {"learning_rate": 0.01}},
        {"class_name": "Adam", "config": {"learning_rate": 0.01, "amsgrad": True}},
    ],
    ids=["sgd", "sgd_nesterov", "adam", "adam_amsgrad"],
)
def test_five_steps_equal_keras_fit(optimizer: dict) -> None:
    """The acceptance case: SGD and Adam, l1+l2 regularizers and max_norm on."""
    keras.utils.set_random_seed(3)
    model = _regularized_model()
    x, y = _data()
    ours, expected, mine, moved = _fit_both(model, optimizer, "mse", x, y)
    assert moved > 1e-3, "the weights barely moved: the comparison would prove nothing"
    assert weight_diff(model, ours) <= TOLERANCE
    assert mine["loss"][0] == pytest.approx(expected["loss"][0], rel=1e-5)


@pytest.mark.parametrize(
    ("optimizer", "loss"),
    [
        (
            {
                "class_name": "RMSprop",
                "config": {"learning_rate": 0.01, "momentum": 0.5, "centered": True},
            },
            "mae",
        ),
        ({"class_name": "AdamW", "config": {"learning_rate": 0.01, "clipnorm": 0.1}}, "huber"),
        (
            {"class_name": "Adagrad", "config": {"learning_rate": 0.05, "global_clipnorm": 0.5}},
            "log_cosh",
        ),
        ({"class_name": "Adamax", "config": {"learning_rate": 0.05, "clipvalue": 0.01}}, "mse"),
        ({"class_name": "Nadam", "config": {"learning_rate": 0.01, "weight_decay": 0.01}}, "mse"),
    ],
    ids=["rmsprop", "adamw", "adagrad", "adamax", "nadam"],
)
def test_other_optimizers_and_losses_equal_keras_fit(optimizer: dict, loss: str) -> None:
    keras.utils.set_random_seed(4)
    model = _regularized_model(activity=True)
    x, y = _data(2)
    ours, expected, mine, moved = _fit_both(model, optimizer, loss, x, y)
    assert moved > 1e-4
    assert weight_diff(model, ours) <= TOLERANCE
    assert mine["loss"][0] == pytest.approx(expected["loss"][0], rel=1e-5)


def test_masked_sequence_loss_and_metrics_equal_keras() -> None:
    """A Masking layer masks the per-step loss and metrics exactly as Keras does."""
    keras.utils.set_random_seed(5)
    model = keras.Sequential(
        [
            keras.Input((T, F)),
            keras.layers.Masking(0.0),
            keras.layers.GRU(5, return_sequences=True),
            keras.layers.Dense(2, activity_regularizer=keras.regularizers.L1(1e-3)),
        ]
    )
    x, _ = _data(3)
    x[::3, 4:] = 0.0  # right padding
    x[1::4, 2] = 0.0  # holes
    y = np.random.default_rng(9).normal(size=(len(x), T, 2)).astype(np.float32)
    metrics = ["mae", "root_mean_squared_error"]
    optimizer = {"class_name": "Adam", "config": {"learning_rate": 0.02}}
    ours, expected, mine, _ = _fit_both(model, optimizer, "mse", x, y, metrics)
    assert weight_diff(model, ours) <= TOLERANCE
    for name in ["loss", *metrics]:
        assert mine[name][0] == pytest.approx(expected[name][0], rel=1e-5), name


def test_classification_and_validation_logs_equal_keras() -> None:
    """Sparse categorical crossentropy, "accuracy" resolved like Keras, val_* like evaluate."""
    keras.utils.set_random_seed(6)
    model = keras.Sequential(
        [
            keras.Input((T, F)),
            keras.layers.GRU(6, kernel_regularizer=keras.regularizers.L2(1e-2)),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    x, _ = _data(4)
    y = np.random.default_rng(2).integers(0, 3, size=(len(x), 1)).astype(np.float32)
    xv, _ = _data(5)
    yv = np.random.default_rng(3).integers(0, 3, size=(len(xv), 1)).astype(np.float32)
    ours = twin(model)
    model.compile(
        optimizer=keras.optimizers.SGD(0.5, momentum=0.5),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    expected = model.fit(
        x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, validation_data=(xv, yv)
    ).history
    trainer = Trainer(
        ours,
        optimizer_spec(
            {"class_name": "SGD", "config": {"learning_rate": 0.5, "momentum": 0.5}}
        ).build(ours.parameters()),
        get_loss("sparse_categorical_crossentropy"),
        ["accuracy"],
    )
    mine = trainer.fit(
        ArrayBatches(x, y, BATCH),
        epochs=2,
        validation=lambda t: t.evaluate(t.model, ArrayBatches(xv, yv, BATCH).epoch(0)),
    )
    assert weight_diff(model, ours) <= TOLERANCE
    for name in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(mine[name], expected[name], rtol=1e-5, err_msg=name)


def test_loss_includes_every_keras_loss_term() -> None:
    """loss = compiled loss + weight penalties + activity penalties / batch size."""
    keras.utils.set_random_seed(7)
    model = _regularized_model(activity=True)
    x, y = _data(6)
    ours = twin(model)
    model.compile(optimizer="sgd", loss="mse")
    expected = float(model.evaluate(x[:BATCH], y[:BATCH], batch_size=BATCH, verbose=0))
    with torch.no_grad():
        outputs, mask = ours.call_with_mask(torch.from_numpy(x[:BATCH]), None, training=False)
        total = get_loss("mse")(torch.from_numpy(y[:BATCH]), outputs[0], mask)
        total = total + ours.regularization_loss()
    assert float(total) == pytest.approx(expected, rel=1e-6)


def test_bidirectional_with_activity_regularizers_equals_keras_fit() -> None:
    """Keras collects the wrapped layer's activity penalty as well as the wrapper's."""
    keras.utils.set_random_seed(3)
    inner = keras.layers.GRU(
        4,
        return_sequences=True,
        activity_regularizer=keras.regularizers.L2(0.05),
        kernel_regularizer=keras.regularizers.L1(0.01),
    )
    model = keras.Sequential(
        [
            keras.Input((T, F)),
            keras.layers.Bidirectional(
                inner, activity_regularizer=keras.regularizers.L1(0.02), merge_mode="sum"
            ),
            keras.layers.GRU(3),
            keras.layers.Dense(2),
        ]
    )
    x, y = _data(7)
    optimizer = {"class_name": "Adam", "config": {"learning_rate": 0.01}}
    ours, expected, mine, _ = _fit_both(model, optimizer, "mse", x, y)
    assert weight_diff(model, ours) <= TOLERANCE
    assert mine["loss"][0] == pytest.approx(expected["loss"][0], rel=1e-5)
