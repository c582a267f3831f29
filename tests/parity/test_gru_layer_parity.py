"""GRU and Bidirectional layers: gruserve's torch module and onnxruntime vs the real keras.

Every case builds the Keras layer, gives it random weights, calls it with
explicit masks and initial states, and requires max |diff| <= 1e-5 for the
output and the final states of (a) ``gruserve.nn`` built from the Keras
config and (b) the exported ONNX graph run by onnxruntime.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np
import pytest
import torch

from gruserve.layers.activations import known_activation_names
from gruserve.nn.sequential import Sequential
from keras_helpers import (
    assert_close,
    keras,
    onnx_session,
    randomize,
    run_onnx,
    spec_of_layers,
    to_numpy,
    weights_of_layers,
)

B, T, F, U = 3, 6, 4, 5
NATIVE = [
    "sigmoid",
    "tanh",
    "relu",
    "softsign",
    "softplus",
    "hard_sigmoid",
    "sparse_sigmoid",
    "linear",
    "elu",
    "leaky_relu",
]
LOOP_ONLY = sorted(set(known_activation_names()) - set(NATIVE) - {"swish", "hard_swish"})
MASKS = {
    "none": None,
    "right_padded": np.array([[1] * T, [1] * (T - 2) + [0] * 2, [1] + [0] * (T - 1)], bool),
    "holes": np.array([[1, 0, 1, 1, 0, 1], [1, 1, 0, 0, 1, 0], [0, 1, 1, 0, 1, 1]], bool),
    "left_padded": np.array([[1] * T, [0] * 2 + [1] * (T - 2), [0] * (T - 1) + [1]], bool),
}
# Activations that grow without bound need smaller weights to stay in float32's comfort zone.
_GROWING = {
    "exponential",
    "softplus",
    "linear",
    "relu",
    "elu",
    "selu",
    "celu",
    "squareplus",
    "sparse_plus",
    "leaky_relu",
    "relu6",
    "gelu",
    "silu",
    "mish",
    "hard_silu",
    "softsign",
    "tanh_shrink",
    "log_sigmoid",
    "log_softmax",
    "soft_shrink",
    "hard_shrink",
}


class Case:
    """One Keras layer with random weights, and our two implementations of it."""

    def __init__(self, make_layer, seed: int, scale: float) -> None:  # type: ignore[no-untyped-def]
        self.rng = np.random.default_rng(seed)
        self.layer = make_layer()
        self.layer(np.zeros((B, T, F), np.float32))  # build
        randomize(self.layer, self.rng, scale)
        self.spec = spec_of_layers("case", (T, F), [self.layer])
        self.weights = weights_of_layers(self.spec, [self.layer])
        self.torch_model = Sequential.from_spec(self.spec, self.weights).eval()
        self.session = onnx_session(self.spec, self.weights)
        self.n_states = len(self.spec.states())

    def inputs(self, with_state: bool) -> tuple[np.ndarray, list[np.ndarray] | None]:
        x = self.rng.normal(size=(B, T, F)).astype(np.float32)
        states = [
            (self.rng.normal(size=(B, U)) * 0.5).astype(np.float32) for _ in range(self.n_states)
        ]
        return x, (states if with_state else None)

    def keras(self, x, mask, states):  # type: ignore[no-untyped-def]
        kwargs = {}
        if mask is not None:
            kwargs["mask"] = mask
        if states is not None:
            kwargs["initial_state"] = states if self.n_states > 1 else states[0]
        out = self.layer(x, **kwargs)
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        return [to_numpy(o) for o in out]

    def ours(self, backend: str, x, mask, states):  # type: ignore[no-untyped-def]
        name = self.spec.layers[0].name
        given = {name: states} if states is not None else None
        if backend == "torch":
            with torch.no_grad():
                outputs, final = self.torch_model.forward_with_states(
                    torch.from_numpy(x),
                    None if mask is None else torch.from_numpy(mask),
                    None
                    if given is None
                    else {k: [torch.from_numpy(s) for s in v] for k, v in given.items()},
                )
            return [to_numpy(o) for o in outputs], [to_numpy(s) for s in final[name]]
        return run_onnx(self.session, self.spec, x, mask, given)


@functools.cache
def case(key: tuple) -> Case:  # type: ignore[type-arg]
    kind, kwargs, scale = key[0], dict(key[1]), key[2]
    if kind == "gru":
        return Case(
            lambda: keras.layers.GRU(U, **kwargs), seed=zlib.crc32(repr(key).encode()), scale=scale
        )
    merge_mode = kwargs.pop("merge_mode")
    return Case(
        lambda: keras.layers.Bidirectional(keras.layers.GRU(U, **kwargs), merge_mode=merge_mode),
        seed=zlib.crc32(repr(key).encode()),
        scale=scale,
    )


def check(key: tuple, backend: str, mask_name: str, with_state: bool) -> None:  # type: ignore[type-arg]
    c = case(key)
    mask = MASKS[mask_name]
    x, states = c.inputs(with_state)
    expected = c.keras(x, mask, states)
    outputs, final = c.ours(backend, x, mask, states)
    spec = c.spec.layers[0]
    n_out = len(c.spec.output_names())
    if getattr(spec, "return_state", False):
        assert_close(final, expected[n_out:])
    assert_close(outputs, expected[:n_out])


def gru_key(scale: float = 0.5, **kwargs: object) -> tuple:  # type: ignore[type-arg]
    return ("gru", tuple(sorted(kwargs.items())), scale)


BACKENDS = ["torch", "onnxruntime"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("role", ["activation", "recurrent_activation"])
@pytest.mark.parametrize("activation", NATIVE + LOOP_ONLY)
def test_every_activation(backend: str, role: str, activation: str) -> None:
    scale = 0.25 if activation in _GROWING else 0.5
    if activation == "exponential" or (role == "recurrent_activation" and activation in _GROWING):
        scale = 0.05  # an unbounded gate (z > 1) makes the state grow geometrically
    key = gru_key(scale, **{role: activation}, return_sequences=True, return_state=True)
    for mask_name in ("none", "right_padded", "holes"):
        check(key, backend, mask_name, with_state=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("zero_output_for_mask", [False, True])
def test_option_grid(
    backend: str,
    reset_after: bool,
    use_bias: bool,
    go_backwards: bool,
    return_sequences: bool,
    zero_output_for_mask: bool,
) -> None:
    key = gru_key(
        reset_after=reset_after,
        use_bias=use_bias,
        go_backwards=go_backwards,
        return_sequences=return_sequences,
        zero_output_for_mask=zero_output_for_mask,
        return_state=True,
    )
    for mask_name in MASKS:
        for with_state in (False, True):
            check(key, backend, mask_name, with_state)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options",
    [
        {"unroll": True, "return_sequences": True},
        {"unroll": True, "reset_after": False, "activation": "selu"},
        {"implementation": 1, "return_sequences": True},
        {
            "activation": "gelu",
            "reset_after": False,
            "go_backwards": True,
            "return_sequences": True,
        },
        {"activation": "hard_sigmoid", "recurrent_activation": "leaky_relu", "use_bias": False},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_other_options(backend: str, options: dict) -> None:  # type: ignore[type-arg]
    key = gru_key(0.2, **options, return_state=True)
    for mask_name in ("none", "right_padded", "holes"):
        # Keras's unrolled torch loop cannot reverse a mask; it is not asked to here.
        check(key, backend, mask_name, with_state=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("merge_mode", ["concat", "sum", "mul", "ave", None])
@pytest.mark.parametrize("return_sequences", [False, True])
def test_bidirectional(backend: str, merge_mode: str | None, return_sequences: bool) -> None:
    key = (
        "bidirectional",
        (
            ("merge_mode", merge_mode),
            ("return_sequences", return_sequences),
            ("return_state", True),
        ),
        0.5,
    )
    for mask_name in MASKS:
        check(key, backend, mask_name, with_state=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bidirectional_loop_activation(backend: str) -> None:
    key = (
        "bidirectional",
        (
            ("activation", "silu"),
            ("merge_mode", "concat"),
            ("reset_after", False),
            ("return_sequences", True),
        ),
        0.5,
    )
    for mask_name in MASKS:
        check(key, backend, mask_name, with_state=True)


def test_the_grid_uses_both_native_and_loop_strategies() -> None:
    """Guards the grid itself: a native default and a loop gelu must both be exercised."""
    from gruserve.export.recurrent import choose_strategy

    native = case(
        gru_key(
            return_sequences=True,
            reset_after=True,
            use_bias=True,
            go_backwards=False,
            zero_output_for_mask=False,
            return_state=True,
        )
    )
    assert choose_strategy(native.spec.layers[0]).strategy == "native"  # type: ignore[arg-type]
    loop = case(gru_key(0.25, activation="gelu", return_sequences=True, return_state=True))
    assert choose_strategy(loop.spec.layers[0]).strategy == "loop"  # type: ignore[arg-type]
    assert len(LOOP_ONLY) >= 15 and {"gelu", "silu", "selu", "relu6"} <= set(LOOP_ONLY)
