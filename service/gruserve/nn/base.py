"""What every gruserve torch layer shares: Keras-layout weights, configs, losses.

A layer wraps one immutable spec (:mod:`gruserve.layers`) — constructor
arguments are validated there, so a torch layer rejects exactly what Keras
rejects — plus torch parameters stored in Keras's shapes and names
(``kernel`` is (features, 3*units)). The math comes from
:mod:`gruserve.layers.forward`, shared with the exporter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from gruserve.errors import WeightShapeError
from gruserve.layers.backend import TorchBackend, torch_backend
from gruserve.layers.base import LayerSpec
from gruserve.layers.constraints import Constraint
from gruserve.layers.forward import LayerResult
from gruserve.layers.initializers import Initializer
from gruserve.layers.recurrent import GRUCellSpec
from gruserve.layers.regularizers import Regularizer


def keras_kwargs(args: dict[str, Any]) -> dict[str, Any]:
    """Constructor locals -> a Keras config dict (drops self, __class__, None names)."""
    config = {
        k: v for k, v in args.items() if k not in ("self", "__class__", "kwargs", "input_shape")
    }
    config.update(args.get("kwargs") or {})
    if config.get("name") is None:
        config.pop("name", None)
    return config


class KerasLayer(nn.Module):
    """Base of the torch layers: a spec, Keras-named parameters, losses."""

    # A GRUCell shares this machinery but is no layer of a model: its spec is a GRUCellSpec.
    spec: LayerSpec | GRUCellSpec

    def __init__(self, spec: LayerSpec | GRUCellSpec) -> None:
        super().__init__()
        self.spec = spec
        self.built = False
        self.last_activity_loss: torch.Tensor | None = None

    @property
    def backend(self) -> TorchBackend:
        return torch_backend()

    @property
    def name(self) -> str:
        return self.spec.name

    # -- construction ------------------------------------------------------------------
    def build(self, input_features: int) -> None:
        """Create parameters for inputs with ``input_features`` per timestep."""
        for path, shape in self.spec.weight_shapes(input_features).items():
            initializer = self._initializer_for(path)
            value = torch.from_numpy(initializer(shape))
            self._owner(path).register_parameter(path.rsplit("/", 1)[-1], nn.Parameter(value))
        self.built = True

    @torch.no_grad()
    def initialize_weights(self, rng: np.random.Generator | None = None) -> None:
        """Draw every weight again from its Keras initializer, in place.

        Training calls this with one generator seeded from ``training.seed`` so
        that a run is reproducible; an initializer with its own ``seed`` keeps
        drawing the same values, as in Keras.
        """
        for path, weight in self.keras_weights().items():
            value = self._initializer_for(path)(tuple(weight.shape), rng)
            weight.copy_(torch.from_numpy(value))

    def _owner(self, path: str) -> nn.Module:
        """The submodule that owns the parameter at ``path`` (cells, directions)."""
        return self

    def _initializer_for(self, path: str) -> Initializer:
        raise NotImplementedError

    def keras_weights(self) -> dict[str, torch.Tensor]:
        """Parameters by Keras weight path (``kernel``, ``cells/0/bias``, ...)."""
        raise NotImplementedError

    def set_keras_weights(
        self, weights: Mapping[str, np.ndarray], input_features: int | None = None
    ) -> None:
        """Load Keras-layout arrays (building the layer first if needed)."""
        if not self.built:
            if input_features is None:
                raise ValueError(f"layer {self.name!r} is not built; pass input_features")
            self.build(input_features)
        params = self.keras_weights()
        if set(weights) != set(params):
            raise WeightShapeError(
                self.name, f"weights {sorted(weights)} do not match {sorted(params)}"
            )
        with torch.no_grad():
            for key, value in weights.items():
                array = np.asarray(value, np.float32)
                if tuple(array.shape) != tuple(params[key].shape):
                    raise WeightShapeError(
                        self.name,
                        f"weight {key!r} has shape {array.shape}, "
                        f"expected {tuple(params[key].shape)}",
                    )
                params[key].copy_(torch.from_numpy(array))

    def get_weights(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().copy() for k, v in self.keras_weights().items()}

    def get_config(self) -> dict[str, Any]:
        return self.spec.to_config()

    # -- training-time extras -----------------------------------------------------------
    def weight_options(self) -> list[tuple[torch.Tensor, Regularizer | None, Constraint | None]]:
        """(parameter, regularizer, constraint) for every weight."""
        return []

    def regularization_loss(self) -> torch.Tensor | float:
        """Weight penalties plus the activity penalty of the last call (Keras's ``losses``)."""
        total: torch.Tensor | float = 0.0
        for weight, regularizer, _ in self.weight_options():
            if regularizer is not None:
                total = total + regularizer.penalty(weight, self.backend)
        if self.last_activity_loss is not None:
            total = total + self.last_activity_loss
        return total

    @torch.no_grad()
    def apply_constraints(self) -> None:
        """Project weights after an optimizer step, as Keras's optimizers do."""
        for weight, _, constraint in self.weight_options():
            if constraint is not None:
                weight.copy_(constraint.apply(weight, self.backend))

    def record_activity(self, outputs: Sequence[torch.Tensor]) -> None:
        """Keras adds ``activity_regularizer(output) / batch_size`` for every output.

        Keras records it on every call, in training and in inference alike, so
        a validation loss includes it too; the batch size is axis 0.
        """
        regularizer: Regularizer | None = getattr(self.spec, "activity_regularizer", None)
        if regularizer is None:
            self.last_activity_loss = None
            return
        total: torch.Tensor | float = 0.0
        for output in outputs:
            penalty = regularizer.penalty(output, self.backend)
            if output.ndim > 0 and output.shape[0] > 0:
                penalty = penalty / output.shape[0]
            total = total + penalty
        self.last_activity_loss = total  # type: ignore[assignment]

    # -- the common call protocol ---------------------------------------------------------
    def call_layer(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        states: Sequence[torch.Tensor] | None,
        training: bool = False,
    ) -> LayerResult:
        raise NotImplementedError

    def ensure_built(self, x: torch.Tensor) -> None:
        if not self.built:
            self.build(int(x.shape[-1]))

    def state_count(self) -> int:
        return len(getattr(self.spec, "state_paths", list)())
