"""Torch versions of the layers around a GRU: InputLayer, Masking, Embedding, Dense, Dropout."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gruserve.layers.base import LayerSpec
from gruserve.layers.constraints import Constraint
from gruserve.layers.core import DenseSpec, DropoutSpec, EmbeddingSpec, InputLayerSpec, MaskingSpec
from gruserve.layers.forward import LayerResult, apply_layer
from gruserve.layers.initializers import Initializer
from gruserve.layers.regularizers import Regularizer
from gruserve.nn.base import KerasLayer, keras_kwargs


class _Stateless(KerasLayer):
    """Layers whose inference math is :func:`apply_layer`."""

    spec: LayerSpec

    def call_layer(self, x, mask, states=None, training=False):  # type: ignore[no-untyped-def]
        self.ensure_built(x)
        result = apply_layer(self.backend, self.spec, self.keras_weights(), x, mask)
        self.record_activity(result.outputs)
        return result

    def forward(
        self, inputs: torch.Tensor, mask: torch.Tensor | None = None, training: bool | None = None
    ) -> torch.Tensor:
        training = self.training if training is None else training
        return self.call_layer(inputs, mask, None, training).outputs[0]

    def compute_mask(
        self, inputs: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        return self.call_layer(inputs, mask).mask

    def keras_weights(self) -> dict[str, torch.Tensor]:
        return {}

    def _initializer_for(self, path: str) -> Initializer:
        raise KeyError(path)


class InputLayer(_Stateless):
    """Declares the input shape (without the batch axis) like ``keras.Input``."""

    def __init__(
        self,
        shape: Sequence[int | None],
        batch_size: int | None = None,
        dtype: str = "float32",
        name: str | None = None,
    ) -> None:
        spec = InputLayerSpec.from_config(
            {"batch_shape": [batch_size, *shape], "dtype": dtype, "name": name or "input_layer"}
        )
        super().__init__(spec)
        self.built = True


class Masking(_Stateless):
    """Masks timesteps whose features all equal ``mask_value`` (and zeroes them)."""

    def __init__(self, mask_value: float = 0.0, **kwargs: Any) -> None:
        super().__init__(MaskingSpec.from_config(keras_kwargs(locals())))
        self.built = True


class Dropout(_Stateless):
    """Keras ``Dropout``: scales kept units by 1/(1-rate) in training only."""

    def __init__(
        self,
        rate: float,
        noise_shape: Sequence[int | None] | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(DropoutSpec.from_config(keras_kwargs(locals())))
        self.generator = _seeded(seed)
        self.built = True

    def call_layer(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        states: Sequence[torch.Tensor] | None = None,
        training: bool = False,
    ) -> LayerResult:
        spec: DropoutSpec = self.spec  # type: ignore[assignment]
        if not training or not 0.0 < spec.rate < 1.0:
            return LayerResult([x], mask)
        shape = list(x.shape)
        if spec.noise_shape is not None:
            shape = [s if n is None else n for s, n in zip(shape, spec.noise_shape, strict=True)]
        keep = bernoulli_mask(shape, spec.rate, self.generator, x)
        return LayerResult([x * keep], mask)


class Embedding(_Stateless):
    """Keras ``Embedding``; ``mask_zero=True`` masks id 0 for the layers after it."""

    # Registered by build() as an nn.Parameter; declared so it is not Module.__getattr__'s union.
    embeddings: torch.Tensor

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        embeddings_initializer: Any = "uniform",
        embeddings_regularizer: Any = None,
        embeddings_constraint: Any = None,
        mask_zero: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(EmbeddingSpec.from_config(keras_kwargs(locals())))
        self.build(0)

    def keras_weights(self) -> dict[str, torch.Tensor]:
        return {"embeddings": self.embeddings} if self.built else {}

    def _initializer_for(self, path: str) -> Initializer:
        return self.spec.embeddings_initializer  # type: ignore[attr-defined,no-any-return]

    def weight_options(self) -> list[tuple[torch.Tensor, Regularizer | None, Constraint | None]]:
        spec: EmbeddingSpec = self.spec  # type: ignore[assignment]
        return [(self.embeddings, spec.embeddings_regularizer, spec.embeddings_constraint)]

    def ensure_built(self, x: torch.Tensor) -> None:
        """Embeddings are built at construction: the input is ids, not features."""


class Dense(_Stateless):
    """Keras ``Dense``; on a (batch, time, features) input it applies per timestep."""

    # Registered by build() as nn.Parameters; declared so they are not Module.__getattr__'s union.
    kernel: torch.Tensor
    bias: torch.Tensor

    def __init__(
        self,
        units: int,
        activation: Any = None,
        use_bias: bool = True,
        kernel_initializer: Any = "glorot_uniform",
        bias_initializer: Any = "zeros",
        kernel_regularizer: Any = None,
        bias_regularizer: Any = None,
        activity_regularizer: Any = None,
        kernel_constraint: Any = None,
        bias_constraint: Any = None,
        input_dim: int | None = None,
        **kwargs: Any,
    ) -> None:
        args = keras_kwargs(locals())
        args.pop("input_dim")
        super().__init__(DenseSpec.from_config(args))
        if input_dim is not None:
            self.build(input_dim)

    def keras_weights(self) -> dict[str, torch.Tensor]:
        if not self.built:
            return {}
        weights = {"kernel": self.kernel}
        if self.spec.use_bias:  # type: ignore[attr-defined]
            weights["bias"] = self.bias
        return weights

    def _initializer_for(self, path: str) -> Initializer:
        spec: DenseSpec = self.spec  # type: ignore[assignment]
        return spec.kernel_initializer if path == "kernel" else spec.bias_initializer

    def weight_options(self) -> list[tuple[torch.Tensor, Regularizer | None, Constraint | None]]:
        spec: DenseSpec = self.spec  # type: ignore[assignment]
        options = [(self.kernel, spec.kernel_regularizer, spec.kernel_constraint)]
        if spec.use_bias:
            options.append((self.bias, spec.bias_regularizer, spec.bias_constraint))
        return options


def _seeded(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return generator


def bernoulli_mask(
    shape: Sequence[int], rate: float, generator: torch.Generator | None, like: torch.Tensor
) -> torch.Tensor:
    """Keras's dropout mask: 0 with probability ``rate``, else 1/(1-rate)."""
    keep = torch.rand(list(shape), generator=generator, dtype=torch.float32) >= rate
    return keep.to(like.device, like.dtype) / (1.0 - rate)
