"""The whole model as one ONNX graph with explicit state inputs and outputs.

Graph signature (recorded in the manifest, consumed by the server):

- ``inputs``: float32 (batch, time, features), or int64 (batch, time) token
  ids for an Embedding model; (time, batch, ...) when the model is time-major;
- ``mask``: bool, same leading layout as ``inputs``; a batch of sequences of
  different lengths is padded and masked, with no effect on any valid step;
- ``initial_state/<layer>[/<direction>][/cells/<i>]``: float32 (batch, units),
  one per recurrent layer, direction and stacked cell;
- ``outputs`` (or ``outputs/forward`` and ``outputs/backward`` for a
  Bidirectional with ``merge_mode=None``) and ``final_state/...``.

Carrying ``final_state`` into ``initial_state`` of the next call is exactly
Keras's ``stateful=True``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from gruserve.errors import ExportError
from gruserve.export.recurrent import LayerExport, export_bidirectional, export_rnn
from gruserve.export.symbolic import GraphContext, OnnxBackend, OnnxTensor
from gruserve.layers.forward import apply_layer
from gruserve.layers.model import ModelSpec
from gruserve.layers.recurrent import BidirectionalSpec, RNNSpec

OPSET = 18
IR_VERSION = 8  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 would write 14 by default
INPUT = "inputs"
MASK = "mask"


def state_input_name(key: str) -> str:
    return f"initial_state/{key}"


def state_output_name(key: str) -> str:
    return f"final_state/{key}"


@dataclass(frozen=True)
class TensorSignature:
    name: str
    dtype: str
    shape: list[int | str]

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class GraphSignature:
    inputs: list[TensorSignature] = field(default_factory=list)
    outputs: list[TensorSignature] = field(default_factory=list)
    state_inputs: list[TensorSignature] = field(default_factory=list)
    state_outputs: list[TensorSignature] = field(default_factory=list)


@dataclass
class BuiltGraph:
    model: onnx.ModelProto
    signature: GraphSignature
    layers: dict[str, LayerExport]
    static_timesteps: int | None


def _needs_static_timesteps(spec: ModelSpec, strategy: str = "auto") -> bool:
    if strategy == "unrolled":
        return bool(spec.recurrent_layers())

    def unrolled(layer: object) -> bool:
        if isinstance(layer, BidirectionalSpec):
            return layer.forward.unroll or layer.backward.unroll
        return isinstance(layer, RNNSpec) and layer.unroll

    return any(unrolled(layer) for layer in spec.layers)


def _leading(spec: ModelSpec, time: int | str) -> list[int | str]:
    return [time, "batch"] if spec.time_major else ["batch", time]


def build_model_graph(
    spec: ModelSpec, weights: Mapping[str, Mapping[str, np.ndarray]], strategy: str = "auto"
) -> BuiltGraph:
    """Build and check the ONNX graph of ``spec`` with Keras-layout ``weights``.

    ``strategy`` is ``auto`` (per layer: native GRU node where exact, else the
    loop; unrolled for ``unroll=True``) or one strategy forced on every
    recurrent layer (see :func:`~gruserve.export.recurrent.choose_strategy`).
    """
    static_t = spec.timesteps if _needs_static_timesteps(spec, strategy) else None
    if _needs_static_timesteps(spec, strategy) and static_t is None:
        raise ExportError(
            "unrolling (unroll=True or strategy unrolled) needs a fixed number of timesteps: "
            "declare them in the model's input shape"
        )
    time: int | str = static_t if static_t is not None else "time"
    ctx = GraphContext()
    ob = OnnxBackend(ctx, timesteps=static_t)
    signature = GraphSignature()

    # -- graph inputs -------------------------------------------------------------------
    if spec.takes_token_ids:
        x_sig = TensorSignature(INPUT, "int64", _leading(spec, time))
    else:
        x_sig = TensorSignature(
            INPUT, "float32", [*_leading(spec, time), int(spec.input_features or 0)]
        )
    mask_sig = TensorSignature(MASK, "bool", _leading(spec, time))
    signature.inputs = [x_sig, mask_sig]
    for state in spec.states():
        signature.state_inputs.append(
            TensorSignature(state_input_name(state.key), "float32", ["batch", state.units])
        )
        signature.state_outputs.append(
            TensorSignature(state_output_name(state.key), "float32", ["batch", state.units])
        )
    reserved = [s.name for s in signature.inputs + signature.state_inputs + signature.state_outputs]
    for name in reserved + spec.output_names():
        ctx.fresh(name)  # reserve: no intermediate tensor may take a signature name

    x = OnnxTensor(ctx, INPUT, x_sig.dtype, len(x_sig.shape))
    mask: OnnxTensor | None = OnnxTensor(ctx, MASK, "bool", 2)
    states_in = {
        s.key: OnnxTensor(ctx, state_input_name(s.key), "float32", 2) for s in spec.states()
    }

    # -- layers --------------------------------------------------------------------------
    layer_exports: dict[str, LayerExport] = {}
    final_states: dict[str, OnnxTensor] = {}
    outputs = [x]
    for layer in spec.layers:
        layer_weights = {
            key: ob.asarray(np.asarray(value, np.float32), name=f"{layer.name}/{key}")
            for key, value in weights.get(layer.name, {}).items()
        }
        keys = [
            f"{layer.name}/{p}" if p else layer.name
            for p, _ in getattr(layer, "state_paths", list)()
        ]
        init = [states_in[k] for k in keys]
        if isinstance(layer, BidirectionalSpec):
            outputs, new_states, plan = export_bidirectional(
                ob, layer, layer_weights, outputs[0], mask, init, strategy
            )
            layer_exports[layer.name] = plan
            mask = mask if layer.return_sequences else None
        elif isinstance(layer, RNNSpec):
            out, new_states, plan = export_rnn(
                ob, layer, layer_weights, outputs[0], mask, init, strategy
            )
            outputs = [out]
            layer_exports[layer.name] = plan
            mask = mask if layer.return_sequences else None
        else:
            result = apply_layer(ob, layer, layer_weights, outputs[0], mask)
            outputs, mask, new_states = result.outputs, result.mask, []
        final_states.update(zip(keys, new_states, strict=True))

    # -- graph outputs -------------------------------------------------------------------
    per_step = spec.returns_sequences()
    out_width = spec.output_features()
    out_shape: list[int | str] = (
        [*_leading(spec, time), out_width] if per_step else ["batch", out_width]
    )
    names = spec.output_names()
    if len(names) != len(outputs):
        raise ExportError(f"model produced {len(outputs)} outputs, expected {names}")
    for name, tensor in zip(names, outputs, strict=True):
        ctx.nodes.append(
            helper.make_node("Identity", [tensor.name], [name], name=ctx.fresh("output_node"))
        )
        signature.outputs.append(TensorSignature(name, "float32", out_shape))
    for state in spec.states():
        out_name = state_output_name(state.key)
        ctx.nodes.append(
            helper.make_node(
                "Identity", [final_states[state.key].name], [out_name], name=ctx.fresh("state_node")
            )
        )

    graph = helper.make_graph(
        ctx.nodes,
        spec.name or "gru_model",
        [_value_info(s) for s in signature.inputs + signature.state_inputs],
        [_value_info(s) for s in signature.outputs + signature.state_outputs],
        initializer=ctx.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="gruserve",
    )
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:  # pragma: no cover - a bug in the builder
        raise ExportError(f"the generated ONNX graph is invalid: {exc}") from exc
    return BuiltGraph(model, signature, layer_exports, static_t)


_TYPES = {"float32": TensorProto.FLOAT, "bool": TensorProto.BOOL, "int64": TensorProto.INT64}


def _value_info(sig: TensorSignature) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(sig.name, _TYPES[sig.dtype], list(sig.shape))
