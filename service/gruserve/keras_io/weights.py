"""Map the variables stored in a Keras file onto the specs' weight paths.

The contract is :meth:`ModelSpec.weight_shapes`: ``{layer: {path: shape}}``
with paths such as ``kernel``, ``cells/1/bias`` or ``backward/recurrent_kernel``.
Files store the same variables differently:

* ``.keras`` archives name nothing: a layer's variables are ``vars/0``,
  ``vars/1``... in creation order, under a group named after the layer's
  *class* plus a counter (``layers/gru``, ``layers/gru_1``) in the order
  ``model.layers`` lists them, with sub-objects below it
  (``cell``, ``cell/cells/gru_cell_1``, ``forward_layer/cell``).
* legacy ``.h5`` files list each layer's variables by name, in the same
  creation order, in the ``weight_names`` attribute of ``model_weights/<layer>``.

Both orders are Keras's creation order, which :func:`variable_groups` spells
out per layer type. Stored names are checked against it, every shape against
the config, and a missing variable is an error: a model that silently runs on
zeros is worse than one that refuses to load.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from gruserve.errors import ModelFileError, WeightShapeError
from gruserve.keras_io.h5 import text_attr, text_list_attr
from gruserve.layers.base import LayerSpec
from gruserve.layers.core import DenseSpec
from gruserve.layers.model import ModelSpec
from gruserve.layers.recurrent import BidirectionalSpec, GRUCellSpec, RNNSpec

Weights = dict[str, dict[str, np.ndarray]]
# Roots of the layer groups: Keras 3, and tf-keras 2.13-2.15 archives.
_ARCHIVE_ROOTS = ("layers", "_layer_checkpoint_dependencies")


@dataclass(frozen=True)
class VariableGroup:
    """Variables Keras stores together: their ``.keras`` subgroup and weight paths, in order."""

    archive_path: str
    weights: tuple[str, ...]


def _cell_keys(cell: GRUCellSpec) -> list[str]:
    """GRUCell.build creates kernel, recurrent_kernel, then bias (if use_bias)."""
    return ["kernel", "recurrent_kernel", *(["bias"] if cell.use_bias else [])]


def _rnn_groups(layer: RNNSpec, archive_prefix: str, path_prefix: str) -> list[VariableGroup]:
    if len(layer.cells) == 1:
        return [
            VariableGroup(
                f"{archive_prefix}cell", tuple(path_prefix + k for k in _cell_keys(layer.cells[0]))
            )
        ]
    # StackedRNNCells keeps its cells in a list; the archive counts them by class name.
    names = counted_names(["GRUCell"] * len(layer.cells))
    return [
        VariableGroup(
            f"{archive_prefix}cell/cells/{name}",
            tuple(f"{path_prefix}cells/{i}/{k}" for k in _cell_keys(cell)),
        )
        for i, (name, cell) in enumerate(zip(names, layer.cells, strict=True))
    ]


def variable_groups(layer: LayerSpec, input_features: int) -> list[VariableGroup]:
    """The layer's variables in Keras's creation order, grouped as ``.keras`` stores them."""
    if isinstance(layer, BidirectionalSpec):
        groups = _rnn_groups(layer.forward, "forward_layer/", "forward/")
        groups += _rnn_groups(layer.backward, "backward_layer/", "backward/")
    elif isinstance(layer, RNNSpec):
        groups = _rnn_groups(layer, "", "")
    elif isinstance(layer, DenseSpec):
        groups = [VariableGroup("", ("kernel", *(("bias",) if layer.use_bias else ())))]
    else:
        keys = tuple(layer.weight_shapes(input_features))
        groups = [VariableGroup("", keys)] if keys else []
    listed = [path for group in groups for path in group.weights]
    if sorted(listed) != sorted(layer.weight_shapes(input_features)):
        raise AssertionError(
            f"weight layout of {type(layer).__name__} disagrees with its spec: {listed}"
        )
    return groups


def snake_case(class_name: str) -> str:
    """Keras's ``to_snake_case``: GRU -> gru, GRUCell -> gru_cell, RNN -> rnn.

    Written out here because the archive layout depends on it exactly.
    """
    name = re.sub(r"\W+", "", class_name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def counted_names(class_names: Iterable[str]) -> list[str]:
    """Archive group names: snake-cased class name, ``_1``, ``_2``... for repeats."""
    seen: dict[str, int] = {}
    names = []
    for class_name in class_names:
        base = snake_case(class_name)
        if base in seen:
            seen[base] += 1
            names.append(f"{base}_{seen[base]}")
        else:
            seen[base] = 0
            names.append(base)
    return names


def _layer_items(spec: ModelSpec) -> list[tuple[LayerSpec, list[VariableGroup]]]:
    return [
        (layer, groups)
        for layer, width in zip(spec.layers, spec.layer_input_features(), strict=True)
        if (groups := variable_groups(layer, width))
    ]


def _where(layer: LayerSpec) -> str:
    return f"layer {layer.name!r} ({layer.class_name})"


def read_array(
    path: Path, layer: LayerSpec, weight: str, node: object, shape: tuple[int, ...]
) -> np.ndarray:
    """One stored variable as float32, after checking it exists and has the config's shape."""
    if not isinstance(node, h5py.Dataset):
        raise ModelFileError(path, f"{_where(layer)}: weight {weight!r} is missing from the file")
    if node.dtype.kind != "f":
        raise ModelFileError(
            path,
            f"{_where(layer)}: weight {weight!r} is stored as {node.dtype}; "
            "only float weights are supported",
        )
    if tuple(node.shape) != tuple(shape):
        raise WeightShapeError(
            path,
            f"{_where(layer)}: weight {weight!r} has shape {tuple(node.shape)} in the file, "
            f"but the layer's config implies {tuple(shape)}",
        )
    try:
        return np.asarray(node[()], dtype=np.float32)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(
            path, f"{_where(layer)}: cannot read weight {weight!r}: {exc}"
        ) from exc


def archive_weights(
    path: Path, weights_file: h5py.File, spec: ModelSpec, tracked: Iterable[tuple[str, str]]
) -> Weights:
    """Weights from a ``.keras`` archive's ``model.weights.h5``."""
    root_name = next((name for name in _ARCHIVE_ROOTS if name in weights_file), None)
    if root_name is None:
        raise ModelFileError(
            path, "model.weights.h5 has no `layers` group: the model's weights are missing"
        )
    root = weights_file[root_name]
    tracked = list(tracked)
    group_names = dict(
        zip([name for name, _ in tracked], counted_names(c for _, c in tracked), strict=True)
    )
    shapes = spec.weight_shapes()
    result: Weights = {}
    for layer, groups in _layer_items(spec):
        group_path = f"{root_name}/{group_names.get(layer.name, '?')}"
        layer_group = root.get(group_names.get(layer.name, ""))
        if not isinstance(layer_group, h5py.Group):
            raise ModelFileError(
                path,
                f"{_where(layer)}: its weights are missing "
                f"(no group {group_path!r} in model.weights.h5)",
            )
        _check_recorded_name(path, layer, layer_group, group_path)
        arrays: dict[str, np.ndarray] = {}
        for group in groups:
            vars_path = f"{group.archive_path}/vars" if group.archive_path else "vars"
            stored = layer_group.get(vars_path)
            count = len(stored) if isinstance(stored, h5py.Group) else 0
            if count != len(group.weights):
                raise ModelFileError(
                    path,
                    f"{_where(layer)}: {group_path}/{vars_path} holds {count} variable(s), "
                    f"expected {len(group.weights)} ({', '.join(group.weights)})",
                )
            for index, weight in enumerate(group.weights):
                arrays[weight] = read_array(
                    path, layer, weight, stored.get(str(index)), shapes[layer.name][weight]
                )
        result[layer.name] = arrays
    return result


def _check_recorded_name(path: Path, layer: LayerSpec, group: h5py.Group, group_path: str) -> None:
    """Recent Keras 3 releases record the layer name on ``vars``; if it is there it must agree."""
    own = group.get("vars")
    if isinstance(own, h5py.Group) and "name" in own.attrs:
        recorded = text_attr(own.attrs["name"])
        if recorded != layer.name:
            raise ModelFileError(
                path,
                f"{_where(layer)}: the weights group {group_path!r} belongs to layer {recorded!r}; "
                "the archive's layer order does not match its config",
            )


def legacy_weights(path: Path, model_weights: h5py.Group, spec: ModelSpec) -> Weights:
    """Weights from a legacy ``.h5`` file's ``model_weights`` group, located by recorded names."""
    layer_names = text_list_attr(model_weights, "layer_names")
    shapes = spec.weight_shapes()
    result: Weights = {}
    for layer, groups in _layer_items(spec):
        expected = [weight for group in groups for weight in group.weights]
        group = model_weights.get(layer.name)
        if (layer_names is not None and layer.name not in layer_names) or not isinstance(
            group, h5py.Group
        ):
            raise ModelFileError(
                path,
                f"{_where(layer)}: its weights are missing (no group model_weights/{layer.name})",
            )
        stored = text_list_attr(group, "weight_names") or []
        if len(stored) != len(expected):
            raise ModelFileError(
                path,
                f"{_where(layer)}: the file lists {len(stored)} weight(s) {stored}, but this layer "
                f"has {len(expected)}: {expected}",
            )
        arrays: dict[str, np.ndarray] = {}
        for name, weight in zip(stored, expected, strict=True):
            _check_stored_name(path, layer, name, weight)
            arrays[weight] = read_array(
                path, layer, weight, group.get(name), shapes[layer.name][weight]
            )
        result[layer.name] = arrays
    return result


def _check_stored_name(path: Path, layer: LayerSpec, stored: str, weight: str) -> None:
    """``gru/gru_cell/kernel:0`` must end in ``kernel``; Bidirectional halves keep direction."""
    parts = [part.split(":")[0] for part in stored.split("/")]
    wanted = weight.split("/")
    problem = None
    if parts[-1] != wanted[-1]:
        problem = f"expected a {wanted[-1]!r} variable"
    elif isinstance(layer, BidirectionalSpec):
        # The component after the layer's own name is the wrapped layer: forward_gru, backward_gru.
        inner = parts[parts.index(layer.name) + 1] if layer.name in parts[:-1] else ""
        direction = inner.split("_")[0] if inner.startswith(("forward_", "backward_")) else None
        if direction is not None and direction != wanted[0]:
            problem = f"expected the {wanted[0]} layer's variable"
    if problem:
        raise ModelFileError(
            path,
            f"{_where(layer)}: stored weight {stored!r} is out of Keras's order "
            f"({problem} for {weight!r})",
        )
