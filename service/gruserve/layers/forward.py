"""The forward math of every layer, written once for all backends.

Functions take a :class:`~gruserve.layers.backend.Backend`, a spec, the
layer's weights in Keras layout (``{"kernel": (F, 3U), ...}``) and arrays.
The torch modules call them with torch tensors (and dropout masks), the
export-time reference with numpy arrays, and the ONNX exporter with symbolic
tensors, which turns the very same code into loop and unrolled graphs.

Masks are boolean (batch, timesteps) arrays, or (timesteps, batch) for
time-major models, following the layout of the inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from gruserve.layers.backend import Array, Backend
from gruserve.layers.base import LayerSpec
from gruserve.layers.core import DenseSpec, DropoutSpec, EmbeddingSpec, MaskingSpec
from gruserve.layers.model import ModelSpec
from gruserve.layers.recurrent import BidirectionalSpec, GRUCellSpec, RNNSpec

Weights = Mapping[str, Array]


@dataclass
class CellDropout:
    """Dropout masks of one cell for one call, drawn by the caller.

    ``inputs`` holds one mask (implementation 2) or three, one per gate
    (implementation 1), each broadcastable to the cell input; ``recurrent``
    holds three (batch, units) masks. Keras draws them once per call and
    reuses them at every timestep.
    """

    inputs: list[Array] | None = None
    recurrent: list[Array] | None = None


@dataclass
class LayerResult:
    outputs: list[Array]
    mask: Array | None
    states: list[Array] = field(default_factory=list)


# ----------------------------------------------------------------------------- GRU cell
def gru_input_projection(
    b: Backend, x: Array, weights: Weights, cell: GRUCellSpec, masks: list[Array] | None = None
) -> Array:
    """``x @ kernel + input_bias`` for all timesteps at once: (..., F) -> (..., 3U)."""
    kernel = weights["kernel"]
    if masks and len(masks) == 3:
        u = cell.units
        parts = [(x * m) @ kernel[:, i * u : (i + 1) * u] for i, m in enumerate(masks)]
        projected = b.concat(parts, axis=-1)
    else:
        projected = (x * masks[0] if masks else x) @ kernel
    if cell.use_bias:
        bias = weights["bias"]
        projected = projected + (bias[0] if cell.reset_after else bias)
    return projected


def gru_recurrent_step(
    b: Backend,
    x_proj: Array,
    h: Array,
    weights: Weights,
    cell: GRUCellSpec,
    masks: list[Array] | None = None,
) -> Array:
    """One GRU step from the projected input: Keras's ``GRUCell.call``."""
    u = cell.units
    rk = weights["recurrent_kernel"]
    act = cell.activation_fn
    ract = cell.recurrent_activation_fn
    rbias = weights["bias"][1] if cell.use_bias and cell.reset_after else None
    xz, xr, xh = x_proj[..., :u], x_proj[..., u : 2 * u], x_proj[..., 2 * u :]
    hz_in, hr_in, hh_in = (h * masks[0], h * masks[1], h * masks[2]) if masks else (h, h, h)

    if masks or not cell.reset_after:
        hz = hz_in @ rk[:, :u]
        hr = hr_in @ rk[:, u : 2 * u]
        if rbias is not None:
            hz = hz + rbias[:u]
            hr = hr + rbias[u : 2 * u]
        if cell.reset_after:
            hh = hh_in @ rk[:, 2 * u :]
            if rbias is not None:
                hh = hh + rbias[2 * u :]
    else:
        inner = h @ rk
        if rbias is not None:
            inner = inner + rbias
        hz, hr, hh = inner[..., :u], inner[..., u : 2 * u], inner[..., 2 * u :]

    z = ract(xz + hz, b)
    r = ract(xr + hr, b)
    # reset_after applies the reset gate after the recurrent matmul (cuDNN's form), else before.
    recurrent_h = r * hh if cell.reset_after else (r * hh_in) @ rk[:, 2 * u :]
    candidate = act(xh + recurrent_h, b)
    return z * h + (1.0 - z) * candidate


# ----------------------------------------------------------------------------- layers
def cell_weights(weights: Weights, path: str) -> dict[str, Array]:
    """The weights of one cell of a recurrent layer (path "" or "cells/i")."""
    prefix = f"{path}/" if path else ""
    return {key[len(prefix) :]: value for key, value in weights.items() if key.startswith(prefix)}


def rnn_forward(
    b: Backend,
    spec: RNNSpec,
    weights: Weights,
    x: Array,
    mask: Array | None = None,
    initial_states: Sequence[Array] | None = None,
    dropout: Sequence[CellDropout] | None = None,
) -> tuple[Array, list[Array]]:
    """A GRU / RNN-of-GRU-cells layer: returns ``(output, final_states)``.

    The output is the sequence (return_sequences) in Keras's order, which is
    the processing order for ``go_backwards``, or the last output.
    """
    if spec.time_major:
        x = b.swap_batch_time(x)
        mask = b.swap_batch_time(mask) if mask is not None else None
    paths = [path for path, _ in spec.state_paths()]
    per_cell = [cell_weights(weights, path) for path in paths]
    drops = list(dropout) if dropout else [CellDropout() for _ in spec.cells]
    if initial_states is None:
        states = [b.zeros_state(x, cell.units) for cell in spec.cells]
    else:
        states = list(initial_states)

    first_masks = drops[0].inputs
    if first_masks:
        first_masks = [b.expand_dims(m, 1) for m in first_masks]
    projected = gru_input_projection(b, x, per_cell[0], spec.cells[0], first_masks)

    def step(x_t: Array, previous: list[Array]) -> tuple[Array, list[Array]]:
        new_states = []
        output = x_t
        for i, cell in enumerate(spec.cells):
            x_proj = (
                output
                if i == 0
                else gru_input_projection(b, output, per_cell[i], cell, drops[i].inputs)
            )
            output = gru_recurrent_step(
                b, x_proj, previous[i], per_cell[i], cell, drops[i].recurrent
            )
            new_states.append(output)
        return output, new_states

    last, sequence, final = b.rnn(
        step,
        projected,
        states,
        mask,
        go_backwards=spec.go_backwards,
        zero_output_for_mask=spec.zero_output_for_mask,
        return_sequences=spec.return_sequences,
        unroll=spec.unroll,
    )
    if spec.return_sequences:
        return (b.swap_batch_time(sequence) if spec.time_major else sequence), final
    return last, final


def merge_directions(b: Backend, merge_mode: str | None, y: Array, y_rev: Array) -> list[Array]:
    if merge_mode == "concat":
        return [b.concat([y, y_rev], axis=-1)]
    if merge_mode == "sum":
        return [y + y_rev]
    if merge_mode == "ave":
        return [(y + y_rev) * 0.5]
    if merge_mode == "mul":
        return [y * y_rev]
    return [y, y_rev]


def bidirectional_forward(
    b: Backend,
    spec: BidirectionalSpec,
    weights: Weights,
    x: Array,
    mask: Array | None = None,
    initial_states: Sequence[Array] | None = None,
    dropout: Sequence[CellDropout] | None = None,
) -> tuple[list[Array], list[Array]]:
    """Keras ``Bidirectional``: the backward output is flipped back to input order."""
    n_forward = len(spec.forward.cells)
    init = list(initial_states) if initial_states is not None else None
    drops = list(dropout) if dropout else None
    y, forward_states = rnn_forward(
        b,
        spec.forward,
        cell_weights(weights, "forward"),
        x,
        mask,
        init[:n_forward] if init else None,
        drops[:n_forward] if drops else None,
    )
    y_rev, backward_states = rnn_forward(
        b,
        spec.backward,
        cell_weights(weights, "backward"),
        x,
        mask,
        init[n_forward:] if init else None,
        drops[n_forward:] if drops else None,
    )
    return combine_directions(b, spec, y, y_rev), forward_states + backward_states


def combine_directions(b: Backend, spec: BidirectionalSpec, y: Array, y_rev: Array) -> list[Array]:
    """Flip the backward sequence back to input order, then merge (Keras's order of work)."""
    if spec.return_sequences:
        y_rev = b.flip(y_rev, axis=0 if spec.time_major else 1)
    return merge_directions(b, spec.merge_mode, y, y_rev)


def dense_forward(b: Backend, spec: DenseSpec, weights: Weights, x: Array) -> Array:
    y = x @ weights["kernel"]
    if spec.use_bias:
        y = y + weights["bias"]
    return spec.activation_fn(y, b)


def and_masks(b: Backend, first: Array | None, second: Array | None) -> Array | None:
    if first is None:
        return second
    if second is None:
        return first
    return b.logical_and(first, second)


def apply_layer(
    b: Backend,
    spec: LayerSpec,
    weights: Weights,
    x: Array,
    mask: Array | None,
    states: Sequence[Array] | None = None,
) -> LayerResult:
    """Inference-time call of one layer, with Keras's mask propagation.

    A mask computed by Masking or Embedding(mask_zero) is combined (AND) with
    the mask coming in, which is how a server pads a batch of sequences of
    different lengths without changing any result.
    """
    if isinstance(spec, MaskingSpec):
        keep = b.any(b.not_equal(x, spec.mask_value), axis=-1)
        return LayerResult([b.where(b.expand_dims(keep, -1), x, 0.0)], and_masks(b, mask, keep))
    if isinstance(spec, EmbeddingSpec):
        vectors = b.take(weights["embeddings"], x)
        produced = b.not_equal(x, 0) if spec.mask_zero else None
        return LayerResult([vectors], and_masks(b, mask, produced))
    if isinstance(spec, DenseSpec):
        return LayerResult([dense_forward(b, spec, weights, x)], mask)
    if isinstance(spec, DropoutSpec):
        return LayerResult([x], mask)
    if isinstance(spec, BidirectionalSpec):
        outputs, new_states = bidirectional_forward(b, spec, weights, x, mask, states)
        return LayerResult(outputs, mask if spec.return_sequences else None, new_states)
    if isinstance(spec, RNNSpec):
        output, new_states = rnn_forward(b, spec, weights, x, mask, states)
        return LayerResult([output], mask if spec.return_sequences else None, new_states)
    raise TypeError(f"no forward rule for {type(spec).__name__}")


LayerFn = Callable[[Array, Array | None, Sequence[Array] | None], LayerResult]


def run_layers(
    layers: Sequence[tuple[str, int, LayerFn]],
    x: Array,
    mask: Array | None = None,
    states: Mapping[str, Sequence[Array]] | None = None,
) -> tuple[list[Array], dict[str, list[Array]]]:
    """Chain layers ``(name, state_count, fn)``; returns outputs and states by layer.

    Layers without state get ``None``; a recurrent layer missing from
    ``states`` starts from zeros.
    """
    outputs = [x]
    final: dict[str, list[Array]] = {}
    for name, count, fn in layers:
        given = states.get(name) if states and count else None
        result = fn(outputs[0], mask, given)
        outputs, mask = result.outputs, result.mask
        if count:
            final[name] = result.states
    return outputs, final


def run_model(
    b: Backend,
    model: ModelSpec,
    weights: Mapping[str, Weights],
    inputs: Array,
    mask: Array | None = None,
    states: Mapping[str, Sequence[Array]] | None = None,
) -> tuple[list[Array], dict[str, list[Array]]]:
    """Inference of a whole :class:`ModelSpec` on backend ``b``."""

    def bind(spec: LayerSpec) -> LayerFn:
        layer_weights = weights.get(spec.name, {})
        return lambda x, m, s: apply_layer(b, spec, layer_weights, x, m, s)

    chain = [
        (spec.name, len(getattr(spec, "state_paths", list)()), bind(spec)) for spec in model.layers
    ]
    return run_layers(chain, inputs, mask, states)
