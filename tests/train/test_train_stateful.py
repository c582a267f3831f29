"""Stateful training: state carried from batch to batch, reset at every epoch.

One long sequence per stream is cut into consecutive windows across batches;
the state the layers hold at the end of the epoch must equal the final state
of running each whole stream at once. Keras's own stateful ``fit`` (which
never resets by itself) must give the same weights after the first epoch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from keras_pairs import twin, weight_diff

from gruserve.nn.recurrent import RNN
from gruserve.nn.sequential import Sequential
from gruserve.train.callbacks import Callback
from gruserve.train.loop import Trainer
from gruserve.train.losses import get_loss
from gruserve.train.optimizer_config import optimizer_spec
from gruserve.train.optimizers import SGD
from gruserve.train.windows import StatefulBatches, stateful_streams
from keras_helpers import keras, to_numpy

STREAMS, WINDOW, CHUNKS, F = 3, 5, 4, 2
LENGTH = WINDOW * CHUNKS


def _streams(seed: int = 0) -> StatefulBatches:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(STREAMS * LENGTH, F)).astype(np.float32)
    y = rng.normal(size=(STREAMS * LENGTH, 1)).astype(np.float32)
    return stateful_streams(x, y, len(x), STREAMS, WINDOW)


def _config(stateful: bool, batch: int | None) -> dict:
    return {
        "name": "m",
        "layers": [
            {"class_name": "InputLayer", "config": {"batch_shape": [batch, None, F]}},
            {
                "class_name": "GRU",
                "config": {
                    "name": "gru",
                    "units": 4,
                    "return_sequences": True,
                    "stateful": stateful,
                },
            },
            {
                "class_name": "GRU",
                "config": {
                    "name": "gru_1",
                    "units": 3,
                    "return_sequences": True,
                    "stateful": stateful,
                    "reset_after": False,
                },
            },
            {"class_name": "Dense", "config": {"name": "dense", "units": 1}},
        ],
    }


def _final_states(model: Sequential, x: np.ndarray) -> dict[str, list[np.ndarray]]:
    with torch.no_grad():
        _, states = model.forward_with_states(torch.from_numpy(x), training=False)
    return {k: [to_numpy(s) for s in v] for k, v in states.items()}


def test_streams_continue_across_batches() -> None:
    batches = _streams()
    chunks = list(batches.epoch(0))
    assert len(chunks) == CHUNKS == len(batches)
    whole = np.concatenate([x for x, _ in chunks], axis=1)
    np.testing.assert_array_equal(whole, batches.x)  # row i of batch k+1 follows row i of batch k


class _StateProbe(Callback):
    """Records the recurrent states when each epoch begins and ends."""

    def __init__(self) -> None:
        self.at_begin: list[dict[str, np.ndarray]] = []
        self.at_end: list[dict[str, np.ndarray]] = []

    @staticmethod
    def _states(trainer: Trainer) -> dict[str, np.ndarray]:
        return {
            layer.name: to_numpy(layer.states[0])
            for layer in trainer.model.layers
            if isinstance(layer, RNN) and layer.states is not None  # only RNN layers have states
        }

    def on_epoch_begin(self, epoch: int, trainer: Trainer) -> None:
        self.at_begin.append(self._states(trainer))

    def on_epoch_end(self, epoch: int, logs: dict, trainer: Trainer) -> None:
        self.at_end.append(self._states(trainer))


def test_state_is_carried_between_batches_and_reset_each_epoch() -> None:
    model = Sequential.from_config(_config(True, STREAMS))
    reference = Sequential.from_config(_config(False, None))
    reference.set_weights(model.get_weights())
    expected = _final_states(reference, _streams().x)  # each whole stream in one call
    frozen = SGD(model.parameters(), learning_rate=0.0, momentum=0.0, nesterov=False)
    probe = _StateProbe()
    Trainer(model, frozen, get_loss("mse"), stateful=True).fit(_streams(), 2, callbacks=[probe])
    for epoch in range(2):
        for name, states in expected.items():
            np.testing.assert_allclose(probe.at_end[epoch][name], states[0], atol=1e-5)
    # The state was zeroed when epoch 2 began: otherwise it would have continued epoch 1's
    # streams and ended elsewhere.
    assert probe.at_begin[1] and all(not s.any() for s in probe.at_begin[1].values())
    assert any(s.any() for s in probe.at_end[0].values())


def test_truncated_backprop_gradients_stop_at_the_batch_boundary() -> None:
    model = Sequential.from_config(_config(True, STREAMS))
    batches = list(_streams().epoch(0))
    model.train()
    model(torch.from_numpy(batches[0][0]))
    output = model(torch.from_numpy(batches[1][0]))
    torch.sum(output).backward()  # would fail or leak into batch 0's graph without detaching
    for layer in model.layers:
        for state in getattr(layer, "states", None) or []:
            assert not state.requires_grad


def test_first_stateful_epoch_equals_keras_stateful_fit() -> None:
    keras.utils.set_random_seed(8)
    # use_cudnn=False: Keras 3.15's torch "auto" path assigns the state variable in place
    # before backward and fails any stateful fit ("modified by an inplace operation").
    model = keras.Sequential(
        [
            keras.Input(batch_shape=(STREAMS, WINDOW, F)),
            keras.layers.GRU(
                4,
                return_sequences=True,
                stateful=True,
                use_cudnn=False,
                kernel_regularizer=keras.regularizers.L1L2(1e-3, 1e-2),
            ),
            keras.layers.GRU(
                3,
                return_sequences=True,
                stateful=True,
                use_cudnn=False,
                kernel_constraint=keras.constraints.MaxNorm(0.7),
            ),
            keras.layers.Dense(1),
        ]
    )
    ours = twin(model)
    batches = _streams(3)
    # Keras reads consecutive rows as batches: batch k is chunk k of every stream.
    chunks = list(batches.epoch(0))
    x = np.concatenate([c[0] for c in chunks])
    y = np.concatenate([c[1] for c in chunks])
    optimizer = {"class_name": "Adam", "config": {"learning_rate": 0.02}}
    model.compile(optimizer=keras.optimizers.deserialize(dict(optimizer)), loss="mse")
    history = model.fit(x, y, batch_size=STREAMS, epochs=1, shuffle=False, verbose=0)
    trainer = Trainer(
        ours, optimizer_spec(optimizer).build(ours.parameters()), get_loss("mse"), stateful=True
    )
    mine = trainer.fit(batches, epochs=1)
    assert weight_diff(model, ours) <= 1e-4
    assert mine["loss"][0] == pytest.approx(history.history["loss"][0], rel=1e-5)
    keras_state = to_numpy(model.layers[0].states[0].value)
    gru = ours.layers[0]
    assert isinstance(gru, RNN) and gru.states is not None
    np.testing.assert_allclose(to_numpy(gru.states[0]), keras_state, atol=1e-5)
