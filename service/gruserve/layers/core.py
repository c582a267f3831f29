"""Specs of the non-recurrent layers a GRU model needs around it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from gruserve.errors import InvalidArgument
from gruserve.layers.activations import Activation, activation_name, get_activation
from gruserve.layers.base import ArgReader, LayerSpec, base_config, read_base
from gruserve.layers.constraints import Constraint, get_constraint
from gruserve.layers.initializers import Initializer, get_initializer
from gruserve.layers.regularizers import Regularizer, get_regularizer


def _keras(obj: Initializer | Regularizer | Constraint | None) -> dict[str, Any] | None:
    return obj.to_keras() if obj is not None else None


@dataclass(frozen=True)
class InputLayerSpec(LayerSpec):
    """The model's input: its shape without the batch axis, and dtype."""

    class_name: ClassVar[str] = "InputLayer"

    shape: tuple[int | None, ...] = ()
    batch_size: int | None = None
    dtype: str = "float32"

    @classmethod
    def from_config(cls, config: dict[str, Any], keras_version: int = 3) -> InputLayerSpec:
        del keras_version
        reader = ArgReader("InputLayer", config)
        batch_shape = reader.raw("batch_shape") or reader.raw("batch_input_shape")
        if batch_shape is None:
            shape = reader.raw("shape")
            batch_shape = None if shape is None else [reader.raw("batch_size"), *shape]
        if not isinstance(batch_shape, (list, tuple)) or len(batch_shape) < 2:
            raise InvalidArgument(
                "InputLayer", "batch_shape", batch_shape, "(batch, timesteps[, features])"
            )
        dtype = reader.raw("dtype", "float32")
        if isinstance(dtype, dict):
            dtype = (dtype.get("config") or {}).get("name", "float32")
        if dtype not in ("float32", "int32", "int64"):
            raise InvalidArgument("InputLayer", "dtype", dtype, ["float32", "int32", "int64"])
        name = reader.raw("name") or "input_layer"
        reader.finish(extra_ignored={"sparse", "ragged", "optional", "shape", "batch_size"})
        return cls(name=name, shape=tuple(batch_shape[1:]), batch_size=batch_shape[0], dtype=dtype)

    def to_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "batch_shape": [self.batch_size, *self.shape],
            "dtype": self.dtype,
        }


@dataclass(frozen=True)
class MaskingSpec(LayerSpec):
    """Masks timesteps whose features all equal ``mask_value`` and zeroes them."""

    class_name: ClassVar[str] = "Masking"
    produces_mask: ClassVar[bool] = True

    mask_value: float = 0.0
    activity_regularizer: Regularizer | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any], keras_version: int = 3) -> MaskingSpec:
        del keras_version
        reader = ArgReader("Masking", config)
        name, activity = read_base(reader, "masking")
        value = reader.number("mask_value", 0.0)
        reader.finish()
        return cls(name=name, mask_value=value, activity_regularizer=activity)

    def to_config(self) -> dict[str, Any]:
        return {**base_config(self.name, self.activity_regularizer), "mask_value": self.mask_value}


@dataclass(frozen=True)
class EmbeddingSpec(LayerSpec):
    """Token ids -> vectors; ``mask_zero`` masks id 0 for the layers after it."""

    class_name: ClassVar[str] = "Embedding"

    input_dim: int = 1
    output_dim: int = 1
    embeddings_initializer: Initializer = field(
        default_factory=lambda: Initializer(
            "random_uniform", {"minval": -0.05, "maxval": 0.05, "seed": None}
        )
    )
    embeddings_regularizer: Regularizer | None = None
    embeddings_constraint: Constraint | None = None
    mask_zero: bool = False
    activity_regularizer: Regularizer | None = None

    @property
    def produces_mask(self) -> bool:  # type: ignore[override]
        return self.mask_zero

    @classmethod
    def from_config(cls, config: dict[str, Any], keras_version: int = 3) -> EmbeddingSpec:
        del keras_version
        where = f"Embedding {config.get('name', '')!r}".replace(" ''", "")
        reader = ArgReader(where, config)
        name, activity = read_base(reader, "embedding")
        spec = cls(
            name=name,
            input_dim=reader.int("input_dim", minimum=1),
            output_dim=reader.int("output_dim", minimum=1),
            embeddings_initializer=get_initializer(
                reader.raw("embeddings_initializer", "uniform"),
                where=where,
                argument="embeddings_initializer",
            ),
            embeddings_regularizer=get_regularizer(
                reader.raw("embeddings_regularizer"), where=where, argument="embeddings_regularizer"
            ),
            embeddings_constraint=get_constraint(
                reader.raw("embeddings_constraint"), where=where, argument="embeddings_constraint"
            ),
            mask_zero=reader.bool("mask_zero", False),
            activity_regularizer=activity,
        )
        lora = reader.raw("lora_rank")
        if lora:
            raise InvalidArgument(
                where, "lora_rank", lora, "None (LoRA embeddings are not supported)"
            )
        reader.finish(extra_ignored={"input_length", "sparse", "lora_alpha", "quantization_config"})
        return spec

    def to_config(self) -> dict[str, Any]:
        return {
            **base_config(self.name, self.activity_regularizer),
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "embeddings_initializer": _keras(self.embeddings_initializer),
            "embeddings_regularizer": _keras(self.embeddings_regularizer),
            "embeddings_constraint": _keras(self.embeddings_constraint),
            "mask_zero": self.mask_zero,
        }

    def weight_shapes(self, input_features: int) -> dict[str, tuple[int, ...]]:
        del input_features
        return {"embeddings": (self.input_dim, self.output_dim)}

    def output_features(self, input_features: int) -> int:
        del input_features
        return self.output_dim


@dataclass(frozen=True)
class DenseSpec(LayerSpec):
    """A dense layer; on a sequence it applies to every timestep, as in Keras."""

    class_name: ClassVar[str] = "Dense"

    units: int = 1
    activation: str = "linear"
    use_bias: bool = True
    kernel_initializer: Initializer = field(
        default_factory=lambda: Initializer("glorot_uniform", {"seed": None})
    )
    bias_initializer: Initializer = field(default_factory=lambda: Initializer("zeros"))
    kernel_regularizer: Regularizer | None = None
    bias_regularizer: Regularizer | None = None
    kernel_constraint: Constraint | None = None
    bias_constraint: Constraint | None = None
    activity_regularizer: Regularizer | None = None
    keras_version: int = 3

    @property
    def activation_fn(self) -> Activation:
        return get_activation(self.activation, keras_version=self.keras_version)

    @classmethod
    def from_config(cls, config: dict[str, Any], keras_version: int = 3) -> DenseSpec:
        where = f"Dense {config.get('name', 'dense')!r}"
        reader = ArgReader(where, config)
        name, activity = read_base(reader, "dense")
        keras_version = reader.int("keras_version", keras_version)
        activation = activation_name(reader.raw("activation"))
        get_activation(activation, keras_version=keras_version, where=where)

        def init(key: str, default: str) -> Initializer:
            return get_initializer(reader.raw(key, default), where=where, argument=key)

        spec = cls(
            name=name,
            units=reader.int("units", minimum=1),
            activation=activation,
            use_bias=reader.bool("use_bias", True),
            kernel_initializer=init("kernel_initializer", "glorot_uniform"),
            bias_initializer=init("bias_initializer", "zeros"),
            kernel_regularizer=get_regularizer(
                reader.raw("kernel_regularizer"), where=where, argument="kernel_regularizer"
            ),
            bias_regularizer=get_regularizer(
                reader.raw("bias_regularizer"), where=where, argument="bias_regularizer"
            ),
            kernel_constraint=get_constraint(
                reader.raw("kernel_constraint"), where=where, argument="kernel_constraint"
            ),
            bias_constraint=get_constraint(
                reader.raw("bias_constraint"), where=where, argument="bias_constraint"
            ),
            activity_regularizer=activity,
            keras_version=keras_version,
        )
        lora = reader.raw("lora_rank")
        if lora:
            raise InvalidArgument(where, "lora_rank", lora, "None (LoRA layers are not supported)")
        reader.finish(extra_ignored={"lora_alpha", "quantization_config"})
        return spec

    def to_config(self) -> dict[str, Any]:
        config = {
            **base_config(self.name, self.activity_regularizer),
            "units": self.units,
            "activation": self.activation,
            "use_bias": self.use_bias,
            "kernel_initializer": _keras(self.kernel_initializer),
            "bias_initializer": _keras(self.bias_initializer),
            "kernel_regularizer": _keras(self.kernel_regularizer),
            "bias_regularizer": _keras(self.bias_regularizer),
            "kernel_constraint": _keras(self.kernel_constraint),
            "bias_constraint": _keras(self.bias_constraint),
        }
        if self.keras_version != 3:
            config["keras_version"] = self.keras_version
        return config

    def weight_shapes(self, input_features: int) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {"kernel": (input_features, self.units)}
        if self.use_bias:
            shapes["bias"] = (self.units,)
        return shapes

    def output_features(self, input_features: int) -> int:
        del input_features
        return self.units


@dataclass(frozen=True)
class DropoutSpec(LayerSpec):
    """Dropout: active only in training; inference and export pass inputs through."""

    class_name: ClassVar[str] = "Dropout"

    rate: float = 0.0
    noise_shape: tuple[int | None, ...] | None = None
    seed: int | None = None
    activity_regularizer: Regularizer | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any], keras_version: int = 3) -> DropoutSpec:
        del keras_version
        where = f"Dropout {config.get('name', 'dropout')!r}"
        reader = ArgReader(where, config)
        name, activity = read_base(reader, "dropout")
        noise_shape = reader.raw("noise_shape")
        spec = cls(
            name=name,
            rate=reader.rate("rate"),
            noise_shape=None if noise_shape is None else tuple(noise_shape),
            seed=reader.optional_int("seed"),
            activity_regularizer=activity,
        )
        reader.finish()
        return spec

    def to_config(self) -> dict[str, Any]:
        return {
            **base_config(self.name, self.activity_regularizer),
            "rate": self.rate,
            "noise_shape": None if self.noise_shape is None else list(self.noise_shape),
            "seed": self.seed,
        }
