"""``gruserve.nn`` accepts and refuses constructor arguments exactly as Keras 3 does.

Each argument of ``keras.layers.GRU`` / ``GRUCell`` is tried with one value
of every class that matters (valid, out of range, wrong type, None, a
truthy non-bool, a class-name string...). "Accepted" means what a user
sees: the layer is constructed and runs on a batch. Where both accept, the
effective setting (the clipped dropout rate, per-gate masks or not, a bias
or none) must agree too.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")

import gruserve.nn as gnn  # noqa: E402
from gruserve.errors import InvalidArgument  # noqa: E402

X = np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(2, 3, 2)
TABLE: dict[str, list[Any]] = {
    "units": [4, 1, 0, -1, 2.0, 2.5, "4", None, True],
    "activation": ["tanh", "softplus", "swish", None, "nope", 3],
    "recurrent_activation": ["sigmoid", "hard_sigmoid", "nope", None],
    "use_bias": [True, False, 0, 1, "yes", None],
    "kernel_initializer": ["glorot_uniform", "he_normal", "Zeros", None, "nope"],
    "recurrent_initializer": ["orthogonal", "Orthogonal", {"class_name": "Zeros", "config": {}}],
    "bias_initializer": ["zeros", "ones", None, "nope"],
    "kernel_regularizer": ["l1", "l2", "L2", "l1l2", "L1L2", "l1_l2", None, "nope", 0.1],
    "recurrent_regularizer": [{"class_name": "L1L2", "config": {"l1": 0.1, "l2": 0.0}}],
    "bias_regularizer": [{"class_name": "L1", "config": {"l3": 1}}],
    "kernel_constraint": [None, "max_norm", "non_neg", "NonNeg", "unit_norm", "nope"],
    "dropout": [0.0, 0.5, 1.0, 1.5, -0.1, 1, 0, True, "0.5", None],
    "recurrent_dropout": [0.0, 0.3, 1.5, -0.1, "x", None],
    "reset_after": [True, False, 0, "x", None],
    "seed": [None, 3, -1, 2.5, "x"],
    "implementation": [1, 2, 3, 0, -1, "x", None, True],
    "return_sequences": [True, False, 1, "x"],
    "return_state": [True, 0],
    "go_backwards": [True, False, 0],
    "unroll": [True, "x"],
    "use_cudnn": ["auto", True, False, 1, "x", None],
}
CELL_ONLY_NOT = {"return_sequences", "return_state", "go_backwards", "unroll", "use_cudnn"}
CASES = [(arg, value) for arg, values in TABLE.items() for value in values]


def _kwargs(argument: str, value: Any) -> dict[str, Any]:
    return {"units": value} if argument == "units" else {"units": 4, argument: value}


def _outcome(build: Callable[[], Any], run: Callable[[Any], Any]) -> tuple[bool, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer = build()
            run(layer)
    except Exception as exc:  # the class of failure is what is compared
        return False, exc
    return True, layer


def _keras_run(layer: Any) -> None:
    layer(X)


def _ours_run(layer: Any) -> None:
    layer(torch.from_numpy(X))


def _effective(cell: Any, ours: bool) -> tuple[float, float, bool, bool]:
    """(dropout, recurrent_dropout, per-gate masks, has bias) as the cell will use them."""
    source = cell.spec if ours else cell
    return (
        float(source.dropout),
        float(source.recurrent_dropout),
        source.implementation == 1,
        bool(source.use_bias),
    )


@pytest.mark.parametrize("argument, value", CASES, ids=[f"{a}={v!r}" for a, v in CASES])
def test_gru_arguments_as_keras(argument: str, value: Any) -> None:
    kwargs = _kwargs(argument, value)
    keras_ok, keras_layer = _outcome(lambda: keras.layers.GRU(**kwargs), _keras_run)
    ours_ok, ours_layer = _outcome(lambda: gnn.GRU(**kwargs), _ours_run)
    assert ours_ok == keras_ok, f"keras: {keras_layer!r}, gruserve: {ours_layer!r}"
    if not ours_ok:
        assert isinstance(ours_layer, InvalidArgument), repr(ours_layer)
        assert f"`{argument}`" in str(ours_layer)
        return
    assert _effective(ours_layer.cell, True) == _effective(keras_layer.cell, False)


CELL_CASES = [(a, v) for a, v in CASES if a not in CELL_ONLY_NOT]


@pytest.mark.parametrize("argument, value", CELL_CASES, ids=[f"{a}={v!r}" for a, v in CELL_CASES])
def test_gru_cell_arguments_as_keras(argument: str, value: Any) -> None:
    """A cell is used inside an RNN layer; that is where Keras checks ``units``."""
    kwargs = _kwargs(argument, value)
    keras_ok, keras_rnn = _outcome(
        lambda: keras.layers.RNN(keras.layers.GRUCell(**kwargs)), _keras_run
    )
    ours_ok, ours_rnn = _outcome(lambda: gnn.RNN(gnn.GRUCell(**kwargs)), _ours_run)
    assert ours_ok == keras_ok, f"keras: {keras_rnn!r}, gruserve: {ours_rnn!r}"
    if ours_ok:
        assert _effective(ours_rnn.cell, True) == _effective(keras_rnn.cell, False)


def test_orthogonal_regularizer_is_refused_as_unsupported() -> None:
    """Keras knows it; gruserve does not compute it, and says so instead of ignoring it."""
    with pytest.raises(InvalidArgument, match="a regularizer gruserve computes"):
        gnn.GRU(4, kernel_regularizer="orthogonal_regularizer")


@pytest.mark.parametrize("kind", ["numpy", "list", "tensor"])
def test_initial_state_may_be_numpy(kind: str) -> None:
    rng = np.random.default_rng(3)
    ours = gnn.GRU(4, return_sequences=True)
    ours(torch.from_numpy(X))
    reference = keras.layers.GRU(4, return_sequences=True)
    reference(X)
    reference.set_weights([w.detach().numpy() for w in ours.parameters()])
    h0 = rng.normal(size=(2, 4)).astype(np.float32)
    given = {"numpy": h0, "list": [h0], "tensor": torch.from_numpy(h0)}[kind]
    got = ours(torch.from_numpy(X), initial_state=given).detach().numpy()
    want = keras.ops.convert_to_numpy(reference(X, initial_state=[h0]))
    np.testing.assert_allclose(got, want, atol=1e-6)
