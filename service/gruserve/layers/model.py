"""A linear stack of layer specs: what a Keras Sequential (or linear functional) model is.

:class:`ModelSpec` checks the chain once (widths, where masks come from,
which layers may follow a sequence-to-vector layer, time-major agreement) and
answers the questions the torch model, the exporter and the server ask: the
input layout, each layer's input width, and the list of recurrent states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gruserve.errors import ConfigError, UnsupportedLayer
from gruserve.layers._serialized import keras_layer_entry
from gruserve.layers.base import LayerSpec
from gruserve.layers.core import DenseSpec, DropoutSpec, EmbeddingSpec, InputLayerSpec, MaskingSpec
from gruserve.layers.recurrent import BidirectionalSpec, GRUSpec, RNNSpec

LAYER_CLASSES: dict[str, Any] = {
    cls.class_name: cls
    for cls in (
        GRUSpec,
        RNNSpec,
        BidirectionalSpec,
        DenseSpec,
        DropoutSpec,
        EmbeddingSpec,
        MaskingSpec,
    )
}
RecurrentSpec = RNNSpec | BidirectionalSpec


def supported_layers() -> list[str]:
    return sorted([*LAYER_CLASSES, "InputLayer"])


def layer_from_config(class_name: str, config: dict[str, Any], keras_version: int = 3) -> LayerSpec:
    """Build the spec for one serialized Keras layer."""
    cls = LAYER_CLASSES.get(class_name)
    if cls is None:
        raise UnsupportedLayer(str(config.get("name", "?")), class_name, supported_layers())
    spec: LayerSpec = cls.from_config(config, keras_version)
    return spec


def is_recurrent(layer: LayerSpec) -> bool:
    return isinstance(layer, (RNNSpec, BidirectionalSpec))


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state carried between calls: which layer, which cell, its width."""

    layer: str
    path: str
    units: int

    @property
    def key(self) -> str:
        """Stable identifier, e.g. ``gru`` or ``bidirectional/backward``."""
        return f"{self.layer}/{self.path}" if self.path else self.layer


@dataclass(frozen=True)
class ModelSpec:
    """A validated linear model: input layer plus an ordered tuple of layers."""

    name: str
    input: InputLayerSpec
    layers: tuple[LayerSpec, ...]
    keras_version: int = 3

    def __post_init__(self) -> None:
        self._check_chain()

    # -- structure -----------------------------------------------------------------
    @property
    def time_major(self) -> bool:
        return any(getattr(layer, "time_major", False) for layer in self.layers)

    @property
    def takes_token_ids(self) -> bool:
        return bool(self.layers) and isinstance(self.layers[0], EmbeddingSpec)

    @property
    def input_features(self) -> int | None:
        """Features per timestep of the input (None for token-id input)."""
        if self.takes_token_ids:
            return None
        return self.input.shape[-1]  # type: ignore[return-value]

    @property
    def timesteps(self) -> int | None:
        """Static timesteps, if the input declares them.

        Keras reads axis 0 of every Input as the batch, so a time-major model's
        declared "batch" size is really its timesteps.
        """
        return self.input.batch_size if self.time_major else self.input.shape[0]

    @property
    def batch_size(self) -> int | None:
        return self.input.shape[0] if self.time_major else self.input.batch_size

    def recurrent_layers(self) -> list[LayerSpec]:
        return [layer for layer in self.layers if is_recurrent(layer)]

    def states(self) -> list[StateSpec]:
        states = []
        for layer in self.recurrent_layers():
            for path, units in layer.state_paths():  # type: ignore[attr-defined]
                states.append(StateSpec(layer.name, path, units))
        return states

    def layer_input_features(self) -> list[int]:
        """Width of the tensor entering each layer (embedding: its id vocabulary)."""
        widths = []
        width = self.input_features or 0
        for layer in self.layers:
            widths.append(width)
            width = layer.output_features(width)
        return widths

    def output_features(self) -> int:
        width = self.input_features or 0
        for layer in self.layers:
            width = layer.output_features(width)
        return width

    def returns_sequences(self) -> bool:
        """Whether the final output has a time axis."""
        sequences = True
        for layer in self.layers:
            if is_recurrent(layer):
                sequences = bool(layer.return_sequences)  # type: ignore[attr-defined]
        return sequences

    def output_names(self) -> list[str]:
        last = self.layers[-1] if self.layers else None
        if isinstance(last, BidirectionalSpec) and last.merge_mode is None:
            return ["outputs/forward", "outputs/backward"]
        return ["outputs"]

    def weight_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        return {
            layer.name: layer.weight_shapes(width)
            for layer, width in zip(self.layers, self.layer_input_features(), strict=True)
            if layer.weight_shapes(width)
        }

    # -- config round trip -------------------------------------------------------------
    @classmethod
    def from_layer_configs(
        cls, name: str, configs: list[dict[str, Any]], keras_version: int = 3
    ) -> ModelSpec:
        """From Keras Sequential ``config["layers"]`` entries ({class_name, config})."""
        if not configs:
            raise ConfigError(f"model {name!r}", "has no layers")
        input_spec: InputLayerSpec | None = None
        layers: list[LayerSpec] = []
        for entry in configs:
            class_name = entry.get("class_name")
            config = dict(entry.get("config") or {})
            if class_name == "InputLayer":
                input_spec = InputLayerSpec.from_config(config)
                continue
            if input_spec is None and not layers:
                input_spec = _input_from_first_layer(config, str(class_name), entry)
            layers.append(layer_from_config(str(class_name), config, keras_version))
        if input_spec is None:
            raise ConfigError(f"model {name!r}", "the input shape is unknown; add an InputLayer")
        names = [layer.name for layer in layers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"model {name!r}", f"duplicate layer names {duplicates}")
        return cls(name=name, input=input_spec, layers=tuple(layers), keras_version=keras_version)

    def to_config(self) -> dict[str, Any]:
        """Keras Sequential config (``{"name", "layers": [...]}``).

        ``keras.Sequential.from_config`` loads it as it is.
        """
        return {
            "name": self.name,
            "layers": [keras_layer_entry("InputLayer", self.input.to_config())]
            + [keras_layer_entry(layer.class_name, layer.to_config()) for layer in self.layers],
        }

    # -- validation ----------------------------------------------------------------------
    def _check_chain(self) -> None:
        where = f"model {self.name!r}"
        shape = self.input.shape
        if not self.layers:
            raise ConfigError(where, "has no layers")
        if self.takes_token_ids:
            if len(shape) != 1:
                raise ConfigError(where, f"an Embedding input must be (timesteps,), got {shape}")
        elif len(shape) != 2 or shape[1] is None:
            raise ConfigError(
                where, f"input must be (timesteps, features) with known features, got shape {shape}"
            )
        is_sequence = True
        time_major = {
            bool(getattr(layer, "time_major", False)) for layer in self.recurrent_layers()
        }
        if len(time_major) > 1:
            raise ConfigError(where, "all recurrent layers must agree on `time_major`")
        if not self.recurrent_layers():
            raise ConfigError(where, "has no GRU layer")
        for index, layer in enumerate(self.layers):
            at = f"{where} layer {layer.name!r}"
            last = index == len(self.layers) - 1
            if isinstance(layer, EmbeddingSpec) and index != 0:
                raise ConfigError(at, "Embedding must be the first layer")
            if is_recurrent(layer):
                if not is_sequence:
                    raise ConfigError(
                        at,
                        "receives a vector; the recurrent layer before it needs "
                        "return_sequences=True",
                    )
                if layer.return_state and not last:  # type: ignore[attr-defined]
                    raise ConfigError(at, "return_state=True is only allowed on the last layer")
                if isinstance(layer, BidirectionalSpec) and layer.merge_mode is None and not last:
                    raise ConfigError(
                        at, "merge_mode=None gives two outputs; it must be the last layer"
                    )
                is_sequence = bool(layer.return_sequences)  # type: ignore[attr-defined]
            elif isinstance(layer, MaskingSpec) and not is_sequence:
                raise ConfigError(at, "Masking needs a (batch, timesteps, features) input")


def _input_from_first_layer(
    config: dict[str, Any], class_name: str, entry: dict[str, Any]
) -> InputLayerSpec | None:
    """tf-keras puts ``batch_input_shape`` on the first layer instead of an InputLayer."""
    batch_shape = config.get("batch_input_shape") or config.get("batch_shape")
    if batch_shape is None:
        build = (entry.get("build_config") or {}).get("input_shape")
        batch_shape = build
    if batch_shape is None:
        return None
    dtype = "int32" if class_name == "Embedding" else "float32"
    return InputLayerSpec(
        name="input", shape=tuple(batch_shape[1:]), batch_size=batch_shape[0], dtype=dtype
    )
