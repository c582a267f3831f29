"""Exporting one recurrent layer: native ONNX GRU, Scan loop, or unrolled steps.

Strategy per layer (recorded in the manifest):

- ``native``: every cell's activations exist in the ONNX GRU operator. The
  native node handles right-padded masks through ``sequence_lens``; a mask
  with holes or left padding is only known at run time, so the node sits in
  the ``then`` branch of an If whose ``else`` branch is the Scan loop.
- ``loop``: a Scan whose body is the Keras step function.
- ``unrolled``: ``unroll=True``; one copy of the step per timestep (the model
  must declare its number of timesteps).

Keras semantics the native branch restores around the operator: the output
sequence of ``go_backwards`` is in processing order (ONNX returns input
order), masked outputs repeat the previous output unless
``zero_output_for_mask`` (ONNX writes zeros), and an all-masked sample keeps
its initial state (ONNX reports zeros).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from onnx import helper

from gruserve.errors import ExportError
from gruserve.export.symbolic import OnnxBackend, OnnxTensor, value_info
from gruserve.layers.activations import OnnxGruActivation
from gruserve.layers.forward import (
    bidirectional_forward,
    cell_weights,
    combine_directions,
    merge_directions,
    rnn_forward,
)
from gruserve.layers.recurrent import BidirectionalSpec, GRUCellSpec, RNNSpec

# ONNX activations that read an alpha / a beta from the attribute lists.
_TAKES_ALPHA = {"Affine", "HardSigmoid", "LeakyRelu", "Elu", "ThresholdedRelu", "ScaledTanh"}
_TAKES_BETA = {"Affine", "HardSigmoid", "ScaledTanh"}


def _declared(value: float | None) -> float:
    """An alpha/beta of an op above: every such activation declares it (layers.activations).

    A missing one raises TypeError, as ``float(None)`` did, but names what is missing.
    """
    if value is None:
        raise TypeError("an ONNX GRU activation lacks the alpha/beta its op reads")
    return float(value)


@dataclass
class LayerExport:
    """How one layer was exported, for the manifest."""

    strategy: str
    cudnn_eligible: bool
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "strategy": self.strategy,
            "cudnn_eligible": self.cudnn_eligible,
            "notes": self.notes,
        }


def _native_activations(cell: GRUCellSpec) -> list[OnnxGruActivation] | None:
    f = cell.recurrent_activation_fn.onnx_gru
    g = cell.activation_fn.onnx_gru
    return None if f is None or g is None else [f, g]


def _inexact_activations(cell: GRUCellSpec) -> list[str]:
    """Activations the GRU node spells but computes less exactly than Keras's formula."""
    acts = (cell.activation_fn, cell.recurrent_activation_fn)
    return sorted({a.name for a in acts if a.onnx_gru is not None and not a.native_exact})


def _cudnn_reasons(cells: Sequence[GRUCellSpec]) -> list[str]:
    """Why onnxruntime's CUDA EP would fall back to the CPU for these cells."""
    reasons = []
    for cell in cells:
        if (cell.activation, cell.recurrent_activation) != ("tanh", "sigmoid"):
            reasons.append(
                f"activations {cell.activation}/{cell.recurrent_activation} (cuDNN: tanh/sigmoid)"
            )
        if not cell.reset_after:
            reasons.append("reset_after=False (cuDNN needs linear_before_reset=1)")
    return sorted(set(reasons))


STRATEGIES = ("auto", "native", "loop", "unrolled")


def choose_strategy(spec: RNNSpec, requested: str = "auto") -> LayerExport:
    """The strategy of one layer: Keras's own choice under ``auto``, else the one requested.

    Raises:
        ExportError: an unknown strategy, or ``native`` for activations the
            ONNX GRU node cannot compute as exactly as the loop.
    """
    if requested not in STRATEGIES:
        raise ExportError(f"unknown export strategy {requested!r}; expected one of {STRATEGIES}")
    if requested == "unrolled" or (requested == "auto" and spec.unroll):
        why = "unroll=True" if spec.unroll and requested == "auto" else "strategy unrolled"
        return LayerExport("unrolled", False, [f"{why}: one step per timestep"])
    missing = [
        f"{c.activation}/{c.recurrent_activation}"
        for c in spec.cells
        if _native_activations(c) is None
    ]
    if requested == "loop":
        return LayerExport("loop", False, ["strategy loop requested"])
    if missing:
        if requested == "native":
            raise ExportError(
                f"layer {spec.name!r} cannot use the native GRU node: activations "
                f"{', '.join(missing)} have no ONNX GRU equivalent; use loop or unrolled"
            )
        return LayerExport(
            "loop", False, [f"activations {', '.join(missing)} have no ONNX GRU equivalent"]
        )
    inexact = sorted({name for c in spec.cells for name in _inexact_activations(c)})
    inexact += sorted(
        {
            f"{c.recurrent_activation} as a gate (unbounded)"
            for c in spec.cells
            if not c.recurrent_activation_fn.bounded
        }
    )
    if inexact and requested == "auto":
        return LayerExport(
            "loop",
            False,
            [f"onnxruntime's GRU kernel is less exact than Keras for {', '.join(inexact)}"],
        )
    reasons = _cudnn_reasons(spec.cells)
    notes = ["masks with holes or left padding run the Scan loop (If branch)", *reasons]
    if inexact:
        notes.append(f"strategy native forced although inexact for {', '.join(inexact)}")
    return LayerExport("native", not reasons, notes)


def _as_planned(spec: RNNSpec, plan: LayerExport) -> RNNSpec:
    """The spec whose ``unroll`` matches the plan (the manifest keeps the original)."""
    unroll = plan.strategy == "unrolled"
    return spec if spec.unroll == unroll else replace(spec, unroll=unroll)


# ----------------------------------------------------------------------------- native node
def _gru_node(
    ob: OnnxBackend,
    x_tbf: OnnxTensor,
    cells: Sequence[tuple[GRUCellSpec, Mapping[str, OnnxTensor]]],
    lens: OnnxTensor,
    h0: OnnxTensor,
    direction: str,
) -> tuple[OnnxTensor, OnnxTensor]:
    """One ONNX GRU node (1 or 2 directions) from Keras-layout weights.

    The transposes of the Keras kernels are constant-folded by onnxruntime
    when the session loads, so the file stores each weight once.
    """
    reset_after = {c.reset_after for c, _ in cells}
    if len(reset_after) != 1:
        raise ExportError("a bidirectional GRU node needs the same reset_after in both directions")
    units = cells[0][0].units
    ws, rs, bs = [], [], []
    activations: list[OnnxGruActivation] = []
    for cell, w in cells:
        ws.append(ob.expand_dims(ob.transpose(w["kernel"], [1, 0]), 0))
        rs.append(ob.expand_dims(ob.transpose(w["recurrent_kernel"], [1, 0]), 0))
        if cell.use_bias:
            bias = w["bias"]
            flat = ob.op("Reshape", [bias, ob.ints([-1])], rank=1)
            if not cell.reset_after:  # input bias only; recurrent half is zero
                flat = ob.concat([flat, ob.const(np.zeros(3 * units, np.float32))], axis=0)
        else:
            flat = ob.const(np.zeros(6 * units, np.float32))
        bs.append(ob.expand_dims(flat, 0))
        acts = _native_activations(cell)
        if acts is None:
            raise ExportError(f"activations of {cell.name} are not native")
        activations.extend(acts)

    def cat(parts: list[OnnxTensor]) -> OnnxTensor:
        return parts[0] if len(parts) == 1 else ob.concat(parts, axis=0)

    attrs: dict[str, Any] = {
        "hidden_size": units,
        "direction": direction,
        "linear_before_reset": int(reset_after.pop()),
        "layout": 0,
    }
    default = ["Sigmoid", "Tanh"] * len(cells)
    if [a.op for a in activations] != default:
        attrs["activations"] = [a.op for a in activations]
    alphas = [a.alpha for a in activations if a.op in _TAKES_ALPHA]
    betas = [a.beta for a in activations if a.op in _TAKES_BETA]
    if alphas:
        attrs["activation_alpha"] = [_declared(v) for v in alphas]
    if betas:
        attrs["activation_beta"] = [_declared(v) for v in betas]
    y, y_h = ob.op(
        "GRU", [x_tbf, cat(ws), cat(rs), cat(bs), lens, h0], rank=4, n_outputs=2, **attrs
    )
    y_h.rank = 3
    return y, y_h


def _right_padded_lengths(ob: OnnxBackend, mask: OnnxTensor) -> OnnxTensor:
    return ob.op(
        "ReduceSum", [ob.cast(mask, "int32"), ob.ints([1])], dtype="int32", rank=1, keepdims=0
    )


def _is_right_padded(ob: OnnxBackend, mask: OnnxTensor, lens: OnnxTensor) -> OnnxTensor:
    """A scalar bool: every row of ``mask`` is ``lens[b]`` trues then falses."""
    steps = ob.op("Shape", [mask], dtype="int64", rank=1, start=1, end=2)
    steps = ob.squeeze(steps, 0)
    positions = ob.op(
        "Range", [ob.const(0, "int64"), steps, ob.const(1, "int64")], dtype="int64", rank=1
    )
    expected = ob.less(ob.expand_dims(positions, 0), ob.expand_dims(ob.cast(lens, "int64"), 1))
    agree = ob.cast(ob.op("Equal", [expected, mask], dtype="bool", rank=2), "int32")
    # ReduceMin over an empty batch gives INT_MAX, i.e. "true".
    return ob.greater(ob.op("ReduceMin", [agree], dtype="int32", rank=0, keepdims=0), 0)


def _keras_output(
    ob: OnnxBackend,
    spec: RNNSpec,
    y_seq: OnnxTensor,
    last_valid: OnnxTensor,
    mask: OnnxTensor,
) -> OnnxTensor:
    """Keras's output from the node's (B, T, U) input-order sequence.

    ``last_valid`` is the state after the last valid step, zeros for an
    all-masked sample (Keras's "previous output" starts at zeros).
    """
    if spec.return_sequences:
        if spec.go_backwards:
            # Processing order puts the padding first, before any valid step: zeros either way.
            return ob.flip(y_seq, 1)
        if spec.zero_output_for_mask:
            return y_seq  # the node writes zeros past each length
        return ob.where(ob.expand_dims(mask, -1), y_seq, ob.expand_dims(last_valid, 1))
    if spec.zero_output_for_mask and not spec.go_backwards:
        # The last processed step is the last timestep: its output is 0 unless it is valid.
        last_step = ob.expand_dims(ob.time_step(mask, -1), -1)
        return ob.where(last_step, last_valid, 0.0)
    return last_valid


def _native_rnn(
    ob: OnnxBackend,
    spec: RNNSpec,
    weights: Mapping[str, OnnxTensor],
    x: OnnxTensor,
    mask: OnnxTensor,
    lens: OnnxTensor,
    initial_states: Sequence[OnnxTensor],
) -> tuple[OnnxTensor, list[OnnxTensor]]:
    """Stacked forward nodes; x and mask are batch-major, ``lens`` their valid lengths.

    ``go_backwards`` reverses each sample within its own length around forward
    nodes instead of using ``direction="reverse"``: onnxruntime's CUDA kernel
    reverses the whole padded time axis for that direction
    (``cudnn_rnn_base.cc``), which would feed padding first to a right-padded
    sample. ``ReverseSequence`` keeps the padding at the end on every provider.
    """
    seq_tbf = ob.transpose(x, [1, 0, 2])
    lens64 = ob.cast(lens, "int64")
    if spec.go_backwards:
        seq_tbf = _reverse_within_lengths(ob, seq_tbf, lens64)
    any_valid = ob.expand_dims(ob.greater(lens, 0), -1)
    states: list[OnnxTensor] = []
    last_valid = None
    for i, ((path, _), cell) in enumerate(zip(spec.state_paths(), spec.cells, strict=True)):
        h0 = initial_states[i]
        y, y_h = _gru_node(
            ob,
            seq_tbf,
            [(cell, cell_weights(weights, path))],
            lens,
            ob.expand_dims(h0, 0),
            "forward",
        )
        seq_tbf = ob.squeeze(y, 1)  # (T, B, U): the next cell reads it as it is
        last = ob.squeeze(y_h, 0)
        states.append(ob.where(any_valid, last, h0))  # an all-masked sample keeps its state
        last_valid = ob.where(any_valid, last, 0.0)
    if last_valid is None:
        raise ExportError(f"layer {spec.name!r} has no cells")
    if spec.go_backwards:
        seq_tbf = _reverse_within_lengths(ob, seq_tbf, lens64)  # back to input order
    y_seq = ob.transpose(seq_tbf, [1, 0, 2])
    return _keras_output(ob, spec, y_seq, last_valid, mask), states


def _reverse_within_lengths(ob: OnnxBackend, seq_tbf: OnnxTensor, lens64: OnnxTensor) -> OnnxTensor:
    return ob.op("ReverseSequence", [seq_tbf, lens64], rank=3, batch_axis=1, time_axis=0)


def _with_fallback(
    ob: OnnxBackend, mask: OnnxTensor, native, loop, n_states: int, output_ranks: list[int]
):  # type: ignore[no-untyped-def]
    """If(mask is right-padded) then native(lens) else loop(); both return (outputs, states)."""
    ctx = ob.ctx
    lens = _right_padded_lengths(ob, mask)
    cond = _is_right_padded(ob, mask, lens)
    branches = []
    for build in (functools.partial(native, lens), loop):
        with ctx.subgraph() as scope:
            outputs, states = build()
            results = ob.own_all([*outputs, *states])
            infos = [value_info(t.name, "float32", t.rank) for t in results]
            branches.append(ctx.make_subgraph(scope, "branch", [], infos))
    n_out = len(output_ranks)
    merged = ob.op(
        "If",
        [cond],
        rank=2,
        n_outputs=n_out + n_states,
        then_branch=branches[0],
        else_branch=branches[1],
    )
    for tensor, rank in zip(merged[:n_out], output_ranks, strict=True):
        tensor.rank = rank
    return merged[:n_out], merged[n_out:]


# ----------------------------------------------------------------------------- layers
def export_rnn(
    ob: OnnxBackend,
    spec: RNNSpec,
    weights: Mapping[str, OnnxTensor],
    x: OnnxTensor,
    mask: OnnxTensor | None,
    initial_states: Sequence[OnnxTensor],
    strategy: str = "auto",
) -> tuple[OnnxTensor, list[OnnxTensor], LayerExport]:
    """Export a GRU / RNN layer; semantics identical to :func:`rnn_forward`."""
    plan = choose_strategy(spec, strategy)
    spec = _as_planned(spec, plan)
    if plan.strategy == "unrolled" and ob.timesteps is None:
        raise ExportError(
            f"layer {spec.name!r} is unrolled, which needs a fixed number of timesteps: "
            "declare them in the model's input shape"
        )

    def loop() -> tuple[list[OnnxTensor], list[OnnxTensor]]:
        out, states = rnn_forward(ob, spec, weights, x, mask, initial_states)
        return [out], states

    if plan.strategy != "native" or mask is None:
        (output,), states = loop()
        return output, states, plan

    def native(lens: OnnxTensor) -> tuple[list[OnnxTensor], list[OnnxTensor]]:
        xb, mb = (ob.swap_batch_time(x), ob.swap_batch_time(mask)) if spec.time_major else (x, mask)
        out, states = _native_rnn(ob, spec, weights, xb, mb, lens, initial_states)
        if spec.time_major and spec.return_sequences:
            out = ob.swap_batch_time(out)
        return [out], states

    rank = 3 if spec.return_sequences else 2
    (output,), states = _with_fallback(
        ob,
        mask if not spec.time_major else ob.swap_batch_time(mask),
        native,
        loop,
        len(spec.cells),
        [rank],
    )
    return output, states, plan


def _fused_bidirectional(spec: BidirectionalSpec, strategy: str) -> bool:
    """Whether both directions fit one ``direction="bidirectional"`` GRU node."""
    f, b = spec.forward, spec.backward
    return (
        len(f.cells) == 1
        and len(b.cells) == 1
        and not f.go_backwards
        and b.go_backwards
        and f.units == b.units
        and f.cells[0].reset_after == b.cells[0].reset_after
        and choose_strategy(f, strategy).strategy == "native"
        and choose_strategy(b, strategy).strategy == "native"
    )


def export_bidirectional(
    ob: OnnxBackend,
    spec: BidirectionalSpec,
    weights: Mapping[str, OnnxTensor],
    x: OnnxTensor,
    mask: OnnxTensor | None,
    initial_states: Sequence[OnnxTensor],
    strategy: str = "auto",
) -> tuple[list[OnnxTensor], list[OnnxTensor], LayerExport]:
    """Export Keras ``Bidirectional``; one bidirectional node when both sides allow."""
    if not _fused_bidirectional(spec, strategy) or mask is None:
        n_forward = len(spec.forward.cells)
        y, fs, f_plan = export_rnn(
            ob,
            spec.forward,
            cell_weights(weights, "forward"),
            x,
            mask,
            initial_states[:n_forward],
            strategy,
        )
        y_rev, bs, b_plan = export_rnn(
            ob,
            spec.backward,
            cell_weights(weights, "backward"),
            x,
            mask,
            initial_states[n_forward:],
            strategy,
        )
        strategies = {f_plan.strategy, b_plan.strategy}
        plan = LayerExport(
            "+".join(sorted(strategies)) if len(strategies) > 1 else f_plan.strategy,
            f_plan.cudnn_eligible and b_plan.cudnn_eligible,
            [f"forward: {n}" for n in f_plan.notes] + [f"backward: {n}" for n in b_plan.notes],
        )
        return combine_directions(ob, spec, y, y_rev), fs + bs, plan

    reasons = _cudnn_reasons([spec.forward.cells[0], spec.backward.cells[0]])
    plan = LayerExport(
        "native",
        not reasons,
        ["one bidirectional GRU node", "masks with holes run the Scan loop (If branch)", *reasons],
    )

    def native(lens: OnnxTensor) -> tuple[list[OnnxTensor], list[OnnxTensor]]:
        xb = ob.swap_batch_time(x) if spec.time_major else x
        cells = [
            (spec.forward.cells[0], cell_weights(weights, "forward")),
            (spec.backward.cells[0], cell_weights(weights, "backward")),
        ]
        h0 = ob.stack(list(initial_states), 0)
        y, y_h = _gru_node(ob, ob.transpose(xb, [1, 0, 2]), cells, lens, h0, "bidirectional")
        any_valid = ob.expand_dims(ob.greater(lens, 0), -1)
        states = [ob.where(any_valid, y_h[d], initial_states[d]) for d in range(2)]
        if spec.return_sequences:  # zero_output_for_mask is forced on: ONNX's zeros are right
            # y is (T, 2, B, U); direction d is y[:, d], already in input order for both.
            seqs = [ob.transpose(ob.time_step(y, d), [1, 0, 2]) for d in range(2)]
            if spec.time_major:
                seqs = [ob.swap_batch_time(s) for s in seqs]
        else:
            seqs = [ob.where(any_valid, s, 0.0) for s in states]
        return merge_directions(ob, spec.merge_mode, seqs[0], seqs[1]), states

    def loop() -> tuple[list[OnnxTensor], list[OnnxTensor]]:
        outputs, states = bidirectional_forward(ob, spec, weights, x, mask, initial_states)
        return outputs, states

    rank = 3 if spec.return_sequences else 2
    n_outputs = 2 if spec.merge_mode is None else 1
    outputs, states = _with_fallback(
        ob,
        mask if not spec.time_major else ob.swap_batch_time(mask),
        native,
        loop,
        2,
        [rank] * n_outputs,
    )
    return outputs, states, plan


def gru_node_names(model_proto) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    """The GRU nodes of a model with their attributes (for inspection and tests)."""
    found = []

    def visit(graph) -> None:  # type: ignore[no-untyped-def]
        for node in graph.node:
            if node.op_type == "GRU":
                found.append({a.name: helper.get_attribute_value(a) for a in node.attribute})
            for attr in node.attribute:
                if attr.type == attr.GRAPH:
                    visit(attr.g)

    visit(model_proto.graph)
    return found
