"""A Keras-style Sequential model of gruserve torch layers.

Built from layer modules, from a :class:`~gruserve.layers.model.ModelSpec`, or
from a Keras Sequential config (``model.get_config()``). Masks flow between
layers as in Keras; states of recurrent layers can be passed and returned
explicitly (:meth:`Sequential.forward_with_states`), which is what the
exporter's parity check and the training loop use.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from gruserve.errors import ConfigError
from gruserve.layers.base import LayerSpec
from gruserve.layers.core import InputLayerSpec
from gruserve.layers.forward import LayerFn, run_layers
from gruserve.layers.model import ModelSpec
from gruserve.nn.base import KerasLayer
from gruserve.nn.core import Dense, Dropout, Embedding, InputLayer, Masking
from gruserve.nn.recurrent import RNN, Bidirectional

_MODULES: dict[str, Any] = {
    "GRU": RNN.from_spec,
    "RNN": RNN.from_spec,
    "Bidirectional": Bidirectional.from_spec,
    "Dense": lambda spec: Dense(**spec.to_config()),
    "Dropout": lambda spec: Dropout(**spec.to_config()),
    "Embedding": lambda spec: Embedding(**spec.to_config()),
    "Masking": lambda spec: Masking(**spec.to_config()),
}


def layer_from_spec(spec: LayerSpec) -> KerasLayer:
    """The torch module for one layer spec (fresh weights)."""
    module: KerasLayer = _MODULES[spec.class_name](spec)
    return module


class Sequential(nn.Module):
    """A linear stack of gruserve layers, the first optionally an :class:`InputLayer`."""

    def __init__(self, layers: Sequence[KerasLayer], name: str = "sequential") -> None:
        super().__init__()
        layers = list(layers)
        self.input_spec: InputLayerSpec | None = None
        if layers and isinstance(layers[0], InputLayer):
            self.input_spec = layers.pop(0).spec  # type: ignore[assignment]
        self.model_name = name
        self.layers = nn.ModuleList(layers)
        if self.input_spec is not None:
            self.build_all()

    def _keras_layers(self) -> Iterable[KerasLayer]:
        """``self.layers``, typed as the KerasLayers it holds (ModuleList yields plain Modules)."""
        return cast("Iterable[KerasLayer]", self.layers)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_spec(
        cls, spec: ModelSpec, weights: Mapping[str, Mapping[str, np.ndarray]] | None = None
    ) -> Sequential:
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.input_spec = spec.input
        model.model_name = spec.name
        model.layers = nn.ModuleList([layer_from_spec(layer) for layer in spec.layers])
        model.build_all()
        if weights is not None:
            model.set_weights(weights)
        return model

    @classmethod
    def from_config(cls, config: Mapping[str, Any], keras_version: int = 3) -> Sequential:
        """From Keras's ``Sequential.get_config()`` (``{"name", "layers": [...]}``)."""
        layers = list(config.get("layers") or [])
        spec = ModelSpec.from_layer_configs(
            str(config.get("name") or "sequential"), layers, keras_version
        )
        return cls.from_spec(spec)

    def to_spec(self) -> ModelSpec:
        if self.input_spec is None:
            raise ConfigError(
                f"model {self.model_name!r}", "needs an InputLayer to describe its input"
            )
        # A model's layers hold LayerSpecs: only a GRUCell, never a model layer, holds another.
        specs = tuple(cast(LayerSpec, layer.spec) for layer in self._keras_layers())
        return ModelSpec(self.model_name, self.input_spec, specs)

    def get_config(self) -> dict[str, Any]:
        return self.to_spec().to_config()

    def build_all(self) -> None:
        """Create every layer's parameters from the declared input shape."""
        spec = self.to_spec()
        for layer, width in zip(self._keras_layers(), spec.layer_input_features(), strict=True):
            if not layer.built:
                layer.build(width)

    # -- weights -------------------------------------------------------------------------
    def get_weights(self) -> dict[str, dict[str, np.ndarray]]:
        return {
            layer.name: layer.get_weights()
            for layer in self._keras_layers()
            if layer.keras_weights()
        }

    def set_weights(self, weights: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        for layer in self._keras_layers():
            if layer.keras_weights() or layer.name in weights:
                layer.set_keras_weights(weights.get(layer.name, {}))

    def initialize_weights(self, rng: np.random.Generator | None = None) -> None:
        """Redraw every weight from its Keras initializer, layer by layer, in order."""
        for layer in self._keras_layers():
            layer.initialize_weights(rng)

    def regularization_loss(self) -> torch.Tensor | float:
        """Keras's ``sum(model.losses)``: weight penalties plus last call's activity penalties."""
        total: torch.Tensor | float = 0.0
        for layer in self._keras_layers():
            total = total + layer.regularization_loss()
        return total

    def apply_constraints(self) -> None:
        for layer in self._keras_layers():
            layer.apply_constraints()

    def reset_states(self) -> None:
        for layer in self._keras_layers():
            if getattr(layer.spec, "stateful", False):
                # Only RNNSpec and BidirectionalSpec have stateful; RNN and Bidirectional hold them.
                cast("RNN | Bidirectional", layer).reset_states()

    # -- calls ---------------------------------------------------------------------------
    def forward_with_states(
        self,
        inputs: torch.Tensor,
        mask: torch.Tensor | None = None,
        states: Mapping[str, Sequence[torch.Tensor]] | None = None,
        training: bool | None = None,
    ) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
        """Outputs and the final state of every recurrent layer, by layer name."""
        training = self.training if training is None else training

        def bind(layer: KerasLayer) -> LayerFn:
            return lambda x, m, s: layer.call_layer(x, m, s, training)

        chain = [(layer.name, layer.state_count(), bind(layer)) for layer in self._keras_layers()]
        return run_layers(chain, inputs, mask, states)

    def call_with_mask(
        self, inputs: torch.Tensor, mask: torch.Tensor | None = None, training: bool | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Outputs and the mask Keras attaches to them (what masks a sequence loss).

        Stateful layers use and update their stored states, as in :meth:`forward`.
        """
        training = self.training if training is None else training
        outputs, out_mask = [inputs], mask
        for layer in self._keras_layers():
            result = layer.call_layer(outputs[0], out_mask, None, training)
            outputs, out_mask = result.outputs, result.mask
        return outputs, out_mask

    def forward(
        self, inputs: torch.Tensor, mask: torch.Tensor | None = None, training: bool | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        outputs, _ = self.forward_with_states(inputs, mask, None, training)
        return outputs[0] if len(outputs) == 1 else outputs
