"""Torch GRUCell, RNN (stacked cells), GRU and Bidirectional with Keras semantics.

``GRUCell`` owns one step's weights and dropout masks; ``RNN`` owns the time
loop options, the stateful buffers and ``reset_states``; ``GRU`` is ``RNN``
over one ``GRUCell`` configured flat, as in Keras. Dropout masks are drawn
once per call and shared by all timesteps (per gate for ``implementation=1``);
stateful layers keep their last state, detached, like a Keras variable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from gruserve.errors import ConfigError, InvalidArgument
from gruserve.layers.constraints import Constraint
from gruserve.layers.forward import (
    CellDropout,
    LayerResult,
    combine_directions,
    gru_input_projection,
    gru_recurrent_step,
    rnn_forward,
)
from gruserve.layers.initializers import Initializer
from gruserve.layers.recurrent import BidirectionalSpec, GRUCellSpec, GRUSpec, RNNSpec
from gruserve.layers.regularizers import Regularizer
from gruserve.nn.base import KerasLayer, keras_kwargs
from gruserve.nn.core import _seeded, bernoulli_mask


class GRUCell(KerasLayer):
    """Keras ``GRUCell``: weights kernel (F, 3U), recurrent_kernel (U, 3U), bias."""

    spec: GRUCellSpec
    # Registered by build() as nn.Parameters; declared so they are not Module.__getattr__'s union.
    kernel: torch.Tensor
    recurrent_kernel: torch.Tensor
    bias: torch.Tensor

    def __init__(
        self,
        units: int,
        activation: Any = "tanh",
        recurrent_activation: Any = "sigmoid",
        use_bias: bool = True,
        kernel_initializer: Any = "glorot_uniform",
        recurrent_initializer: Any = "orthogonal",
        bias_initializer: Any = "zeros",
        kernel_regularizer: Any = None,
        recurrent_regularizer: Any = None,
        bias_regularizer: Any = None,
        kernel_constraint: Any = None,
        recurrent_constraint: Any = None,
        bias_constraint: Any = None,
        dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        reset_after: bool = True,
        seed: int | None = None,
        input_dim: int | None = None,
        **kwargs: Any,
    ) -> None:
        args = keras_kwargs(locals())
        args.pop("input_dim")
        super().__init__(GRUCellSpec.from_config(args))
        self.generator = _seeded(self.spec.seed)
        self._masks: CellDropout | None = None
        if input_dim is not None:
            self.build(input_dim)

    @classmethod
    def from_spec(cls, spec: GRUCellSpec) -> GRUCell:
        return cls(**spec.to_config())

    @property
    def state_size(self) -> int:
        return self.spec.units

    def keras_weights(self) -> dict[str, torch.Tensor]:
        if not self.built:
            return {}
        weights = {"kernel": self.kernel, "recurrent_kernel": self.recurrent_kernel}
        if self.spec.use_bias:
            weights["bias"] = self.bias
        return weights

    def _initializer_for(self, path: str) -> Initializer:
        return {
            "kernel": self.spec.kernel_initializer,
            "recurrent_kernel": self.spec.recurrent_initializer,
            "bias": self.spec.bias_initializer,
        }[path]

    def weight_options(self) -> list[tuple[torch.Tensor, Regularizer | None, Constraint | None]]:
        s = self.spec
        options = [
            (self.kernel, s.kernel_regularizer, s.kernel_constraint),
            (self.recurrent_kernel, s.recurrent_regularizer, s.recurrent_constraint),
        ]
        if s.use_bias:
            options.append((self.bias, s.bias_regularizer, s.bias_constraint))
        return options

    def get_initial_state(self, batch_size: int) -> list[torch.Tensor]:
        return [torch.zeros(batch_size, self.spec.units)]

    # -- dropout ------------------------------------------------------------------------
    def dropout_masks(
        self, inputs: torch.Tensor, state: torch.Tensor, training: bool
    ) -> CellDropout:
        """Masks for this call, drawn on first use and kept until :meth:`reset_dropout_masks`."""
        if self._masks is None:
            s = self.spec
            masks = CellDropout()
            if training and 0.0 < s.dropout < 1.0:
                count = 3 if s.implementation == 1 else 1
                masks.inputs = [
                    bernoulli_mask(inputs.shape, s.dropout, self.generator, inputs)
                    for _ in range(count)
                ]
            if training and 0.0 < s.recurrent_dropout < 1.0:
                masks.recurrent = [
                    bernoulli_mask(state.shape, s.recurrent_dropout, self.generator, state)
                    for _ in range(3)
                ]
            self._masks = masks
        return self._masks

    def reset_dropout_masks(self) -> None:
        self._masks = None

    # -- one step ------------------------------------------------------------------------
    def forward(
        self,
        inputs: torch.Tensor,
        states: torch.Tensor | Sequence[torch.Tensor],
        training: bool | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One step: ``(output, [new_state])``, Keras's ``GRUCell.call``."""
        training = self.training if training is None else training
        self.ensure_built(inputs)
        h = states if isinstance(states, torch.Tensor) else states[0]
        masks = self.dropout_masks(inputs, h, training)
        weights = self.keras_weights()
        projected = gru_input_projection(self.backend, inputs, weights, self.spec, masks.inputs)
        new_h = gru_recurrent_step(self.backend, projected, h, weights, self.spec, masks.recurrent)
        return new_h, [new_h]


def _as_state(value: Any) -> torch.Tensor:
    """A state given as a tensor, a numpy array or nested lists (Keras takes all three)."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.as_tensor(np.asarray(value, np.float32))


class StackedRNNCells(nn.Module):
    """Keras ``StackedRNNCells``: the cells of one RNN, run in order at every step."""

    def __init__(self, cells: Sequence[GRUCell]) -> None:
        super().__init__()
        self.cells = nn.ModuleList(cells)


class RNN(KerasLayer):
    """Keras ``RNN`` over one GRUCell or a list of them (stacked)."""

    spec: RNNSpec

    def __init__(
        self,
        cell: GRUCell | Sequence[GRUCell],
        return_sequences: bool = False,
        return_state: bool = False,
        go_backwards: bool = False,
        stateful: bool = False,
        unroll: bool = False,
        zero_output_for_mask: bool = False,
        time_major: bool = False,
        activity_regularizer: Any = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        cells = [cell] if isinstance(cell, GRUCell) else list(cell)
        if not cells or not all(isinstance(c, GRUCell) for c in cells):
            raise InvalidArgument("RNN", "cell", cell, "a GRUCell or a non-empty list of GRUCells")
        args = keras_kwargs(locals())
        args.pop("cells")
        args["cell"] = {
            "class_name": "StackedRNNCells",
            "config": {
                "cells": [{"class_name": "GRUCell", "config": c.get_config()} for c in cells]
            },
        }
        super().__init__(RNNSpec.from_config(args))
        self._attach_cells(cells)

    def _attach_cells(self, cells: list[GRUCell]) -> None:
        self.cell: GRUCell | StackedRNNCells = (
            cells[0] if len(cells) == 1 else StackedRNNCells(cells)
        )
        self.states: list[torch.Tensor] | None = None
        self.built = all(c.built for c in cells)

    @classmethod
    def from_spec(cls, spec: RNNSpec) -> RNN:
        if isinstance(spec, GRUSpec):
            return GRU(**spec.to_config())
        layer = cls.__new__(cls)
        KerasLayer.__init__(layer, spec)
        layer._attach_cells([GRUCell.from_spec(c) for c in spec.cells])
        return layer

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RNN:
        return cls.from_spec(RNNSpec.from_config(config))

    def cells(self) -> list[GRUCell]:
        if isinstance(self.cell, StackedRNNCells):
            # StackedRNNCells holds GRUCells; ModuleList iterates as plain Modules.
            return cast("list[GRUCell]", list(self.cell.cells))
        return [self.cell]

    # -- weights -------------------------------------------------------------------------
    def build(self, input_features: int) -> None:
        for cell, width in zip(self.cells(), self.spec.cell_inputs(input_features), strict=True):
            if not cell.built:
                cell.build(width)
        self.built = True

    def keras_weights(self) -> dict[str, torch.Tensor]:
        weights = {}
        for (path, _), cell in zip(self.spec.state_paths(), self.cells(), strict=True):
            prefix = f"{path}/" if path else ""
            weights.update({prefix + k: v for k, v in cell.keras_weights().items()})
        return weights

    def weight_options(self) -> list[tuple[torch.Tensor, Regularizer | None, Constraint | None]]:
        return [option for cell in self.cells() for option in cell.weight_options()]

    def initialize_weights(self, rng: np.random.Generator | None = None) -> None:
        """Each cell draws its own kernel, recurrent kernel and bias, in cell order."""
        for cell in self.cells():
            cell.initialize_weights(rng)

    # -- state ---------------------------------------------------------------------------
    def _batch_size(self, x: torch.Tensor) -> int:
        return int(x.shape[1] if self.spec.time_major else x.shape[0])

    def reset_states(self, states: Sequence[Any] | Any | None = None) -> None:
        """Zero the stored states, or set them (tf-keras's ``reset_states(states=)``)."""
        if not self.spec.stateful:
            raise ConfigError(f"layer {self.name!r}", "reset_states() needs stateful=True")
        units = [c.units for c in self.spec.cells]
        if states is None:
            if self.states is not None:
                self.states = [torch.zeros_like(s) for s in self.states]
            return
        values = [states] if not isinstance(states, (list, tuple)) else list(states)
        if len(values) != len(units):
            raise InvalidArgument(
                self.name, "states", f"{len(values)} arrays", f"{len(units)} arrays, one per cell"
            )
        batch = self.states[0].shape[0] if self.states is not None else np.shape(values[0])[0]
        new = []
        for value, width in zip(values, units, strict=True):
            tensor = torch.as_tensor(
                np.asarray(value, np.float32) if not isinstance(value, torch.Tensor) else value
            )
            if tuple(tensor.shape) != (batch, width):
                raise InvalidArgument(
                    self.name, "states", tuple(tensor.shape), f"shape {(batch, width)}"
                )
            new.append(tensor.detach().clone().float())
        self.states = new

    def reset_state(self) -> None:
        """Keras 3 spelling."""
        self.reset_states()

    def _initial_states(
        self, x: torch.Tensor, given: Sequence[torch.Tensor] | None
    ) -> list[torch.Tensor] | None:
        if given is not None:
            single = isinstance(given, (torch.Tensor, np.ndarray)) and np.ndim(given) == 2
            states = [_as_state(s) for s in ([given] if single else list(given))]
            if len(states) != len(self.spec.cells):
                raise InvalidArgument(
                    self.name,
                    "initial_state",
                    f"{len(states)} tensors",
                    f"{len(self.spec.cells)} tensors, one per cell",
                )
            return states
        if not self.spec.stateful:
            return None
        batch = self._batch_size(x)
        if self.states is None:
            self.states = [torch.zeros(batch, c.units, device=x.device) for c in self.spec.cells]
        elif self.states[0].shape[0] != batch:
            raise ConfigError(
                f"layer {self.name!r}",
                f"stateful layer expects batch size {self.states[0].shape[0]}, got {batch}",
            )
        return self.states

    # -- calls ---------------------------------------------------------------------------
    def call_layer(self, x, mask, states=None, training=False):  # type: ignore[no-untyped-def]
        self.ensure_built(x)
        init = self._initial_states(x, states)
        batch = self._batch_size(x)
        step_x = x[0] if self.spec.time_major else x[:, 0]
        drops = []
        for i, cell in enumerate(self.cells()):
            width_like = step_x if i == 0 else torch.zeros(batch, self.spec.cells[i - 1].units)
            state_like = init[i] if init is not None else torch.zeros(batch, cell.spec.units)
            drops.append(cell.dropout_masks(width_like, state_like, training))
        try:
            output, new_states = rnn_forward(
                self.backend, self.spec, self.keras_weights(), x, mask, init, drops
            )
        finally:
            for cell in self.cells():
                cell.reset_dropout_masks()
        if self.spec.stateful:
            self.states = [s.detach() for s in new_states]
        self.record_activity([output, *(new_states if self.spec.return_state else [])])
        return LayerResult([output], mask if self.spec.return_sequences else None, new_states)

    def forward(
        self,
        inputs: torch.Tensor,
        mask: torch.Tensor | None = None,
        initial_state: Sequence[torch.Tensor] | torch.Tensor | None = None,
        training: bool | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Keras's call: the output, or ``[output, *states]`` with ``return_state``."""
        training = self.training if training is None else training
        result = self.call_layer(inputs, mask, initial_state, training)
        if self.spec.return_state:
            return [result.outputs[0], *result.states]
        return result.outputs[0]


class GRU(RNN):
    """Keras ``GRU``: every constructor argument of ``keras.layers.GRU`` (and tf-keras's)."""

    spec: GRUSpec

    def __init__(
        self,
        units: int,
        activation: Any = "tanh",
        recurrent_activation: Any = "sigmoid",
        use_bias: bool = True,
        kernel_initializer: Any = "glorot_uniform",
        recurrent_initializer: Any = "orthogonal",
        bias_initializer: Any = "zeros",
        kernel_regularizer: Any = None,
        recurrent_regularizer: Any = None,
        bias_regularizer: Any = None,
        activity_regularizer: Any = None,
        kernel_constraint: Any = None,
        recurrent_constraint: Any = None,
        bias_constraint: Any = None,
        dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        seed: int | None = None,
        return_sequences: bool = False,
        return_state: bool = False,
        go_backwards: bool = False,
        stateful: bool = False,
        unroll: bool = False,
        reset_after: bool = True,
        use_cudnn: Any = "auto",
        time_major: bool = False,
        implementation: int = 2,
        zero_output_for_mask: bool = False,
        input_dim: int | None = None,
        **kwargs: Any,
    ) -> None:
        args = keras_kwargs(locals())
        args.pop("input_dim")
        spec = GRUSpec.from_config(args)
        KerasLayer.__init__(self, spec)
        self._attach_cells([GRUCell.from_spec(spec.cell)])
        if input_dim is not None:
            self.build(input_dim)


class Bidirectional(KerasLayer):
    """Keras ``Bidirectional`` over a GRU or RNN; new weights, as Keras recreates the layers."""

    spec: BidirectionalSpec

    def __init__(
        self,
        layer: RNN,
        merge_mode: str | None = "concat",
        backward_layer: RNN | None = None,
        activity_regularizer: Any = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(layer, RNN):
            raise InvalidArgument("Bidirectional", "layer", layer, "a GRU or RNN layer")
        config: dict[str, Any] = {
            "merge_mode": merge_mode,
            "layer": {"class_name": layer.spec.class_name, "config": layer.get_config()},
            "activity_regularizer": activity_regularizer,
            **kwargs,
        }
        if backward_layer is not None:
            config["backward_layer"] = {
                "class_name": backward_layer.spec.class_name,
                "config": backward_layer.get_config(),
            }
        config["name"] = name or f"bidirectional_{layer.name}"
        self._init_from_spec(BidirectionalSpec.from_config(config))

    def _init_from_spec(self, spec: BidirectionalSpec) -> None:
        KerasLayer.__init__(self, spec)
        self.forward_layer = RNN.from_spec(spec.forward)
        self.backward_layer = RNN.from_spec(spec.backward)
        self.built = self.forward_layer.built and self.backward_layer.built

    @classmethod
    def from_spec(cls, spec: BidirectionalSpec) -> Bidirectional:
        layer = cls.__new__(cls)
        layer._init_from_spec(spec)
        return layer

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Bidirectional:
        return cls.from_spec(BidirectionalSpec.from_config(config))

    def _directions(self) -> list[tuple[str, RNN]]:
        return [("forward", self.forward_layer), ("backward", self.backward_layer)]

    def build(self, input_features: int) -> None:
        for _, layer in self._directions():
            layer.build(input_features)
        self.built = True

    def keras_weights(self) -> dict[str, torch.Tensor]:
        return {
            f"{d}/{k}": v
            for d, layer in self._directions()
            for k, v in layer.keras_weights().items()
        }

    def weight_options(self) -> list[tuple[torch.Tensor, Regularizer | None, Constraint | None]]:
        return self.forward_layer.weight_options() + self.backward_layer.weight_options()

    def initialize_weights(self, rng: np.random.Generator | None = None) -> None:
        for _, layer in self._directions():
            layer.initialize_weights(rng)

    def regularization_loss(self) -> torch.Tensor | float:
        """Also the wrapped layers' own activity penalties: Keras collects sublayer losses."""
        total = super().regularization_loss()
        for _, layer in self._directions():
            if layer.last_activity_loss is not None:
                total = total + layer.last_activity_loss
        return total

    def reset_states(self, states: Sequence[Any] | None = None) -> None:
        n_forward = len(self.spec.forward.cells)
        self.forward_layer.reset_states(None if states is None else list(states)[:n_forward])
        self.backward_layer.reset_states(None if states is None else list(states)[n_forward:])

    def call_layer(self, x, mask, states=None, training=False):  # type: ignore[no-untyped-def]
        self.ensure_built(x)
        n_forward = len(self.spec.forward.cells)
        init = list(states) if states is not None else None
        # Each direction is its own layer: it keeps its stateful buffers and dropout masks.
        forward = self.forward_layer.call_layer(
            x, mask, init[:n_forward] if init else None, training
        )
        backward = self.backward_layer.call_layer(
            x, mask, init[n_forward:] if init else None, training
        )
        outputs = combine_directions(
            self.backend, self.spec, forward.outputs[0], backward.outputs[0]
        )
        new_states = forward.states + backward.states
        self.record_activity([*outputs, *(new_states if self.spec.return_state else [])])
        return LayerResult(outputs, mask if self.spec.return_sequences else None, new_states)

    def forward(
        self,
        inputs: torch.Tensor,
        mask: torch.Tensor | None = None,
        initial_state: Sequence[torch.Tensor] | None = None,
        training: bool | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        training = self.training if training is None else training
        result = self.call_layer(inputs, mask, initial_state, training)
        outputs = list(result.outputs)
        if self.spec.return_state:
            return [*outputs, *result.states]
        return outputs[0] if len(outputs) == 1 else outputs
