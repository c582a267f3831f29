"""Layer specs: Keras configs in and out, and clear errors for bad arguments."""

from __future__ import annotations

import pytest

from gruserve.errors import ConfigError, InvalidArgument, UnsupportedLayer
from gruserve.layers import BidirectionalSpec, DenseSpec, GRUSpec, ModelSpec, layer_from_config
from gruserve.layers.activations import known_activation_names
from gruserve.nn import GRU, Bidirectional, Dense, GRUCell
from keras_helpers import keras


def test_gru_config_round_trip_matches_keras() -> None:
    layer = keras.layers.GRU(
        7,
        activation="selu",
        recurrent_activation="hard_sigmoid",
        use_bias=False,
        kernel_regularizer=keras.regularizers.L1L2(0.01, 0.02),
        recurrent_constraint=keras.constraints.MaxNorm(3.0),
        dropout=0.25,
        recurrent_dropout=0.1,
        return_sequences=True,
        go_backwards=True,
        reset_after=False,
        seed=5,
        zero_output_for_mask=True,
    )
    keras_config = layer.get_config()
    spec = GRUSpec.from_config(keras_config)
    ours = spec.to_config()
    for key in (
        "units",
        "activation",
        "recurrent_activation",
        "use_bias",
        "dropout",
        "recurrent_dropout",
        "return_sequences",
        "go_backwards",
        "reset_after",
        "seed",
        "zero_output_for_mask",
    ):
        assert ours[key] == keras_config[key], key
    assert ours["kernel_regularizer"]["config"] == {"l1": 0.01, "l2": 0.02}
    assert ours["recurrent_constraint"] == {
        "class_name": "MaxNorm",
        "config": {"max_value": 3.0, "axis": 0},
    }
    assert spec.cell.implementation == 1  # recurrent_dropout forces per-gate masks, as in Keras
    # ... and Keras accepts our config back.
    rebuilt = keras.layers.GRU.from_config({k: v for k, v in ours.items() if k != "implementation"})
    assert rebuilt.get_config()["activation"] == "selu"
    assert GRUSpec.from_config(ours) == spec


def test_torch_layer_config_round_trip() -> None:
    layer = GRU(
        4, activation="gelu", return_state=True, stateful=True, time_major=True, input_dim=3
    )
    again = GRU(**layer.get_config(), input_dim=3)
    assert again.spec == layer.spec
    assert layer.keras_weights()["kernel"].shape == (3, 12)
    assert layer.keras_weights()["recurrent_kernel"].shape == (4, 12)
    assert layer.keras_weights()["bias"].shape == (2, 12)
    assert GRU(4, reset_after=False, input_dim=3).keras_weights()["bias"].shape == (12,)
    assert "bias" not in GRU(4, use_bias=False, input_dim=3).keras_weights()


def test_unknown_activation_lists_the_known_ones() -> None:
    with pytest.raises(InvalidArgument) as info:
        GRU(4, activation="swishy")
    message = str(info.value)
    assert "activation" in message and "swishy" in message
    for name in ("gelu", "hard_sigmoid", "tanh", "sparsemax"):
        assert repr(name) in message
    assert len(known_activation_names()) >= 30


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"units": 0}, "units"),
        ({"units": 2.5}, "units"),
        ({"units": 4, "dropout": "0.5"}, "dropout"),
        ({"units": 4, "recurrent_dropout": None}, "recurrent_dropout"),
        ({"units": 4, "kernel_regularizer": "l1_l2"}, "kernel_regularizer"),
        ({"units": 4, "recurrent_activation": "glu"}, "recurrent_activation"),
        ({"units": 4, "activation": "threshold"}, "activation"),
        ({"units": 4, "kernel_initializer": "glorot_unicorn"}, "kernel_initializer"),
        (
            {"units": 4, "kernel_regularizer": {"class_name": "L1L2", "config": {"l3": 1}}},
            "kernel_regularizer",
        ),
        ({"units": 4, "bias_constraint": "max_nrm"}, "bias_constraint"),
        ({"units": 4, "use_cudnn": "maybe"}, "use_cudnn"),
        ({"units": 4, "dtype": "float16"}, "dtype"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, argument: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidArgument) as info:
        GRU(**kwargs)
    assert info.value.argument == argument
    assert f"`{argument}`" in str(info.value) and "Received" in str(info.value)


def test_unknown_keys_are_rejected_not_ignored() -> None:
    with pytest.raises(ConfigError, match=r"unknown argument.*'peephole'"):
        GRUSpec.from_config({"units": 3, "peephole": True})


def test_bidirectional_checks() -> None:
    with pytest.raises(InvalidArgument, match="merge_mode"):
        Bidirectional(GRU(3), merge_mode="max")
    with pytest.raises(ConfigError, match="go_backwards"):
        Bidirectional(GRU(3), backward_layer=GRU(3))
    layer = Bidirectional(GRU(3, return_sequences=True), merge_mode="ave")
    # Keras forces zero_output_for_mask to follow return_sequences in both directions.
    assert layer.spec.forward.zero_output_for_mask and layer.spec.backward.zero_output_for_mask
    assert layer.spec.backward.go_backwards and not layer.spec.forward.go_backwards
    assert BidirectionalSpec.from_config(layer.get_config()) == layer.spec


def test_dense_and_cell_constructors() -> None:
    dense = Dense(3, activation="relu", input_dim=5)
    assert dense.keras_weights()["kernel"].shape == (5, 3)
    assert DenseSpec.from_config(dense.get_config()) == dense.spec
    cell = GRUCell(4, input_dim=2)
    assert cell.state_size == 4


def test_unsupported_layer_names_class_and_alternatives() -> None:
    with pytest.raises(UnsupportedLayer) as info:
        layer_from_config("LSTM", {"name": "lstm", "units": 3})
    assert (
        "'LSTM'" in str(info.value)
        and "GRU" in str(info.value)
        and "Bidirectional" in str(info.value)
    )


@pytest.mark.parametrize(
    "layers, message",
    [
        (
            [
                {"class_name": "GRU", "config": {"units": 2}},
                {"class_name": "GRU", "config": {"units": 2, "name": "g2"}},
            ],
            "return_sequences=True",
        ),
        (
            [
                {"class_name": "GRU", "config": {"units": 2, "return_state": True}},
                {"class_name": "Dense", "config": {"units": 1}},
            ],
            "return_state",
        ),
        ([{"class_name": "Dense", "config": {"units": 2}}], "no GRU layer"),
        (
            [
                {
                    "class_name": "GRU",
                    "config": {"units": 2, "time_major": True, "return_sequences": True},
                },
                {"class_name": "GRU", "config": {"units": 2, "name": "g2"}},
            ],
            "time_major",
        ),
    ],
)
def test_model_chain_validation(layers: list, message: str) -> None:  # type: ignore[type-arg]
    configs = [{"class_name": "InputLayer", "config": {"batch_shape": [None, 5, 3]}}, *layers]
    with pytest.raises(ConfigError, match=message):
        ModelSpec.from_layer_configs("m", configs)
