"""Specs of the recurrent layers: GRUCell, RNN (stacked cells), GRU, Bidirectional.

One :class:`GRUCellSpec` holds the per-step arguments (Keras's ``GRUCell``);
:class:`RNNSpec` holds the time-loop arguments around one or more cells;
:class:`GRUSpec` is the single-cell RNN with Keras's flat ``GRU`` config. The
cell config is shared, never copied, so an option cannot disagree between the
two levels.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from gruserve.errors import ConfigError, InvalidArgument, UnsupportedLayer
from gruserve.layers._serialized import keras_layer_entry
from gruserve.layers.activations import Activation, activation_name, get_activation
from gruserve.layers.base import ArgReader, LayerSpec, base_config, read_base
from gruserve.layers.constraints import Constraint, get_constraint
from gruserve.layers.initializers import Initializer, get_initializer
from gruserve.layers.regularizers import Regularizer, get_regularizer

MERGE_MODES = ("concat", "sum", "mul", "ave", None)
_LOOP_KEYS = [
    "return_sequences",
    "return_state",
    "go_backwards",
    "stateful",
    "unroll",
    "time_major",
    "zero_output_for_mask",
]


def _keras(obj: Initializer | Regularizer | Constraint | None) -> dict[str, Any] | None:
    return obj.to_keras() if obj is not None else None


@dataclass(frozen=True)
class GRUCellSpec:
    """Keras ``GRUCell`` arguments: the math of one step."""

    units: int
    activation: str = "tanh"
    recurrent_activation: str = "sigmoid"
    use_bias: bool = True
    kernel_initializer: Initializer = field(
        default_factory=lambda: Initializer("glorot_uniform", {"seed": None})
    )
    recurrent_initializer: Initializer = field(
        default_factory=lambda: Initializer("orthogonal", {"gain": 1.0, "seed": None})
    )
    bias_initializer: Initializer = field(default_factory=lambda: Initializer("zeros"))
    kernel_regularizer: Regularizer | None = None
    recurrent_regularizer: Regularizer | None = None
    bias_regularizer: Regularizer | None = None
    kernel_constraint: Constraint | None = None
    recurrent_constraint: Constraint | None = None
    bias_constraint: Constraint | None = None
    dropout: float = 0.0
    recurrent_dropout: float = 0.0
    reset_after: bool = True
    seed: int | None = None
    implementation: int = 2
    keras_version: int = 3
    name: str = "gru_cell"

    @property
    def activation_fn(self) -> Activation:
        return get_activation(self.activation, keras_version=self.keras_version)

    @property
    def recurrent_activation_fn(self) -> Activation:
        return get_activation(self.recurrent_activation, keras_version=self.keras_version)

    @classmethod
    def from_reader(cls, reader: ArgReader, keras_version: int = 3) -> GRUCellSpec:
        where = reader.where
        keras_version = reader.choice("keras_version", keras_version, [2, 3])
        units = reader.int("units", minimum=1, integral_floats=False, allow_bool=True)
        activation = activation_name(reader.raw("activation", "tanh"))
        recurrent_activation = activation_name(reader.raw("recurrent_activation", "sigmoid"))
        get_activation(activation, keras_version=keras_version, where=where, argument="activation")
        get_activation(
            recurrent_activation,
            keras_version=keras_version,
            where=where,
            argument="recurrent_activation",
        )
        recurrent_dropout = reader.clipped_rate("recurrent_dropout")
        if keras_version == 3:
            # Keras 3 stores any value and only asks whether it equals 1 (per-gate masks).
            implementation = 1 if reader.raw("implementation", 2) == 1 else 2
        else:
            implementation = reader.choice("implementation", 2, [0, 1, 2])
            if implementation == 0:  # tf-keras's deprecated mode 0 behaves as 1
                implementation = 1
        if recurrent_dropout:
            implementation = 1  # Keras forces per-gate masks with recurrent dropout

        def init(key: str, default: str) -> Initializer:
            return get_initializer(reader.raw(key, default), where=where, argument=key)

        def reg(key: str) -> Regularizer | None:
            return get_regularizer(
                reader.raw(key), where=where, argument=key, keras_version=keras_version
            )

        def con(key: str) -> Constraint | None:
            return get_constraint(reader.raw(key), where=where, argument=key)

        return cls(
            units=units,
            activation=activation,
            recurrent_activation=recurrent_activation,
            use_bias=reader.bool("use_bias", True),
            kernel_initializer=init("kernel_initializer", "glorot_uniform"),
            recurrent_initializer=init("recurrent_initializer", "orthogonal"),
            bias_initializer=init("bias_initializer", "zeros"),
            kernel_regularizer=reg("kernel_regularizer"),
            recurrent_regularizer=reg("recurrent_regularizer"),
            bias_regularizer=reg("bias_regularizer"),
            kernel_constraint=con("kernel_constraint"),
            recurrent_constraint=con("recurrent_constraint"),
            bias_constraint=con("bias_constraint"),
            dropout=reader.clipped_rate("dropout"),
            recurrent_dropout=recurrent_dropout,
            reset_after=reader.bool("reset_after", True),
            seed=reader.optional_int("seed"),
            implementation=implementation,
            keras_version=keras_version,
        )

    @classmethod
    def from_config(cls, config: dict[str, Any], keras_version: int = 3) -> GRUCellSpec:
        reader = ArgReader(f"GRUCell {config.get('name', 'gru_cell')!r}", config)
        spec = cls.from_reader(reader, keras_version)
        name = reader.raw("name") or "gru_cell"
        reader.finish()
        return replace(spec, name=name)

    def cell_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "units": self.units,
            "activation": self.activation,
            "recurrent_activation": self.recurrent_activation,
            "use_bias": self.use_bias,
            "kernel_initializer": _keras(self.kernel_initializer),
            "recurrent_initializer": _keras(self.recurrent_initializer),
            "bias_initializer": _keras(self.bias_initializer),
            "kernel_regularizer": _keras(self.kernel_regularizer),
            "recurrent_regularizer": _keras(self.recurrent_regularizer),
            "bias_regularizer": _keras(self.bias_regularizer),
            "kernel_constraint": _keras(self.kernel_constraint),
            "recurrent_constraint": _keras(self.recurrent_constraint),
            "bias_constraint": _keras(self.bias_constraint),
            "dropout": self.dropout,
            "recurrent_dropout": self.recurrent_dropout,
            "reset_after": self.reset_after,
            "seed": self.seed,
            "implementation": self.implementation,
        }
        if self.keras_version != 3:
            config["keras_version"] = self.keras_version
        return config

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, "trainable": True, "dtype": "float32", **self.cell_config()}

    def weight_shapes(self, input_features: int) -> dict[str, tuple[int, ...]]:
        u = self.units
        shapes: dict[str, tuple[int, ...]] = {
            "kernel": (input_features, 3 * u),
            "recurrent_kernel": (u, 3 * u),
        }
        if self.use_bias:
            shapes["bias"] = (2, 3 * u) if self.reset_after else (3 * u,)
        return shapes


@dataclass(frozen=True)
class RNNSpec(LayerSpec):
    """Keras ``RNN`` over one or more stacked GRU cells: the time-loop options."""

    class_name: ClassVar[str] = "RNN"

    cells: tuple[GRUCellSpec, ...] = ()
    return_sequences: bool = False
    return_state: bool = False
    go_backwards: bool = False
    stateful: bool = False
    unroll: bool = False
    time_major: bool = False
    zero_output_for_mask: bool = False
    activity_regularizer: Regularizer | None = None

    @property
    def units(self) -> int:
        return self.cells[-1].units

    def state_paths(self) -> list[tuple[str, int]]:
        """(path, units) of each state, in Keras's order; the path names the cell."""
        if len(self.cells) == 1:
            return [("", self.cells[0].units)]
        return [(f"cells/{i}", c.units) for i, c in enumerate(self.cells)]

    def cell_inputs(self, input_features: int) -> list[int]:
        """Input width of each stacked cell."""
        widths = [input_features]
        for cell in self.cells[:-1]:
            widths.append(cell.units)
        return widths

    def weight_shapes(self, input_features: int) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for (path, _), cell, width in zip(
            self.state_paths(), self.cells, self.cell_inputs(input_features), strict=True
        ):
            prefix = f"{path}/" if path else ""
            for key, shape in cell.weight_shapes(width).items():
                shapes[prefix + key] = shape
        return shapes

    def output_features(self, input_features: int) -> int:
        del input_features
        return self.units

    @staticmethod
    def read_loop_options(reader: ArgReader) -> dict[str, Any]:
        options = {key: reader.bool(key, False) for key in _LOOP_KEYS}
        use_cudnn = reader.raw("use_cudnn", "auto")
        if use_cudnn not in ("auto", True, False):
            raise InvalidArgument(reader.where, "use_cudnn", use_cudnn, ["auto", True, False])
        return options

    @classmethod
    def from_config(cls, config: dict[str, Any], keras_version: int = 3) -> RNNSpec:
        where = f"RNN {config.get('name', 'rnn')!r}"
        reader = ArgReader(where, config)
        name, activity = read_base(reader, "rnn")
        cell = reader.raw("cell")
        cells = _read_cells(cell, where, keras_version)
        options = cls.read_loop_options(reader)
        reader.finish()
        return cls(name=name, cells=tuple(cells), activity_regularizer=activity, **options)

    def loop_config(self) -> dict[str, Any]:
        config = {key: getattr(self, key) for key in _LOOP_KEYS}
        if not self.time_major:
            del config["time_major"]  # Keras 3 rejects the key; only tf-keras configs carry it
        return config

    def to_config(self) -> dict[str, Any]:
        if len(self.cells) == 1:
            cell = keras_layer_entry("GRUCell", self.cells[0].to_config())
        else:
            cells = [keras_layer_entry("GRUCell", c.to_config()) for c in self.cells]
            cell = keras_layer_entry("StackedRNNCells", {"cells": cells})
        return {
            **base_config(self.name, self.activity_regularizer),
            **self.loop_config(),
            "cell": cell,
        }


def _read_cells(cell: Any, where: str, keras_version: int) -> list[GRUCellSpec]:
    if isinstance(cell, list):  # RNN(cells=[...]) written by some Keras versions
        configs = cell
    elif isinstance(cell, dict) and cell.get("class_name") == "StackedRNNCells":
        configs = (cell.get("config") or {}).get("cells") or []
    else:
        configs = [cell]
    cells = []
    for i, item in enumerate(configs):
        if not isinstance(item, dict) or item.get("class_name") != "GRUCell":
            class_name = item.get("class_name") if isinstance(item, dict) else type(item).__name__
            raise UnsupportedLayer(f"{where} cell {i}", str(class_name), ["GRUCell"])
        cells.append(GRUCellSpec.from_config(item.get("config") or {}, keras_version))
    if not cells:
        raise ConfigError(where, "argument `cell` holds no cells")
    return cells


@dataclass(frozen=True)
class GRUSpec(RNNSpec):
    """Keras ``GRU``: an RNN over a single GRUCell, configured flat."""

    class_name: ClassVar[str] = "GRU"

    @property
    def cell(self) -> GRUCellSpec:
        return self.cells[0]

    @classmethod
    def from_config(cls, config: dict[str, Any], keras_version: int = 3) -> GRUSpec:
        where = f"GRU {config.get('name', 'gru')!r}"
        reader = ArgReader(where, config)
        name, activity = read_base(reader, "gru")
        cell = GRUCellSpec.from_reader(reader, keras_version)
        options = cls.read_loop_options(reader)
        reader.finish()
        return cls(name=name, cells=(cell,), activity_regularizer=activity, **options)

    def to_config(self) -> dict[str, Any]:
        return {
            **base_config(self.name, self.activity_regularizer),
            **self.loop_config(),
            **self.cell.cell_config(),
        }


@dataclass(frozen=True)
class BidirectionalSpec(LayerSpec):
    """Keras ``Bidirectional`` over a GRU (or RNN of GRU cells)."""

    class_name: ClassVar[str] = "Bidirectional"

    forward: RNNSpec = field(
        default_factory=lambda: GRUSpec(name="forward_gru", cells=(GRUCellSpec(1),))
    )
    backward: RNNSpec = field(
        default_factory=lambda: GRUSpec(
            name="backward_gru", cells=(GRUCellSpec(1),), go_backwards=True
        )
    )
    merge_mode: str | None = "concat"
    activity_regularizer: Regularizer | None = None

    @property
    def return_sequences(self) -> bool:
        return self.forward.return_sequences

    @property
    def return_state(self) -> bool:
        return self.forward.return_state

    @property
    def stateful(self) -> bool:
        return self.forward.stateful

    @property
    def time_major(self) -> bool:
        return self.forward.time_major

    def directions(self) -> list[tuple[str, RNNSpec]]:
        return [("forward", self.forward), ("backward", self.backward)]

    def state_paths(self) -> list[tuple[str, int]]:
        return [
            (f"{direction}/{path}".rstrip("/"), units)
            for direction, layer in self.directions()
            for path, units in layer.state_paths()
        ]

    def weight_shapes(self, input_features: int) -> dict[str, tuple[int, ...]]:
        return {
            f"{direction}/{key}": shape
            for direction, layer in self.directions()
            for key, shape in layer.weight_shapes(input_features).items()
        }

    def output_features(self, input_features: int) -> int:
        del input_features
        if self.merge_mode == "concat":
            return self.forward.units + self.backward.units
        return self.forward.units

    @classmethod
    def from_config(cls, config: dict[str, Any], keras_version: int = 3) -> BidirectionalSpec:
        where = f"Bidirectional {config.get('name', 'bidirectional')!r}"
        reader = ArgReader(where, config)
        name, activity = read_base(reader, "bidirectional")
        merge_mode = reader.choice("merge_mode", "concat", MERGE_MODES)
        layer = _read_wrapped(reader.raw("layer"), where, keras_version)
        backward_config = reader.raw("backward_layer")
        reader.finish(extra_ignored={"weights"})
        forward = replace(layer, name=f"forward_{layer.name.removeprefix('forward_')}")
        if backward_config is None:
            backward = replace(
                layer,
                name=f"backward_{layer.name.removeprefix('backward_')}",
                go_backwards=not layer.go_backwards,
            )
        else:
            backward = _read_wrapped(backward_config, where, keras_version)
        return cls.build(name, forward, backward, merge_mode, activity)

    @classmethod
    def build(
        cls,
        name: str,
        forward: RNNSpec,
        backward: RNNSpec,
        merge_mode: str | None,
        activity: Regularizer | None = None,
    ) -> BidirectionalSpec:
        """Apply Keras's checks and its forced ``zero_output_for_mask``."""
        where = f"Bidirectional {name!r}"
        if forward.go_backwards == backward.go_backwards:
            raise ConfigError(where, "forward and backward layers must differ in `go_backwards`")
        for attr in ("stateful", "return_sequences", "return_state", "time_major"):
            if getattr(forward, attr) != getattr(backward, attr):
                raise ConfigError(where, f"forward and backward layers disagree on `{attr}`")
        if merge_mode in ("sum", "mul", "ave") and forward.units != backward.units:
            raise ConfigError(
                where, f"merge_mode={merge_mode!r} needs equal units in both directions"
            )
        forward = replace(forward, zero_output_for_mask=forward.return_sequences)
        backward = replace(backward, zero_output_for_mask=backward.return_sequences)
        return cls(
            name=name,
            forward=forward,
            backward=backward,
            merge_mode=merge_mode,
            activity_regularizer=activity,
        )

    def to_config(self) -> dict[str, Any]:
        return {
            **base_config(self.name, self.activity_regularizer),
            "merge_mode": self.merge_mode,
            "layer": keras_layer_entry(self.forward.class_name, self.forward.to_config()),
            "backward_layer": keras_layer_entry(
                self.backward.class_name, self.backward.to_config()
            ),
        }


def _read_wrapped(layer: Any, where: str, keras_version: int) -> RNNSpec:
    if not isinstance(layer, dict):
        raise InvalidArgument(where, "layer", layer, "a serialized GRU or RNN layer")
    class_name = layer.get("class_name")
    config = layer.get("config") or {}
    if class_name == "GRU":
        return GRUSpec.from_config(config, keras_version)
    if class_name == "RNN":
        return RNNSpec.from_config(config, keras_version)
    raise UnsupportedLayer(f"{where} wrapped layer", str(class_name), ["GRU", "RNN"])
