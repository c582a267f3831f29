"""The way back: a repository version written as a ``.keras`` file, without Keras.

A version folder holds everything Keras needs: the manifest's
``model_config`` is a Keras Sequential config, and the ONNX file stores every
weight once, in Keras layout, under ``LAYER/PATH`` (see
:mod:`gruserve.export.model_graph`). This module reads them back and writes
the archive Keras 3's ``model.save`` would: ``config.json``,
``metadata.json`` and ``model.weights.h5`` with each layer's variables in
creation order under ``layers/<class name, counted>/.../vars/<i>``, the same
layout :mod:`gruserve.keras_io.weights` reads.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import onnx
from onnx import numpy_helper

from gruserve import __version__
from gruserve.errors import ExportError
from gruserve.keras_io.archive import CONFIG, METADATA, WEIGHTS
from gruserve.keras_io.weights import Weights, counted_names, variable_groups
from gruserve.layers.model import ModelSpec
from gruserve.layers.recurrent import BidirectionalSpec, RNNSpec
from gruserve.manifest import Manifest

KERAS_VERSION = "3.0.0"
"""The oldest Keras whose archive format this writes; newer versions read it too."""


def spec_of_manifest(manifest: Manifest) -> ModelSpec:
    """The model spec a version was exported from (its ``model_config``)."""
    config = manifest.model_config
    if not config.get("layers"):
        raise ExportError(
            f"model {manifest.name} v{manifest.version}: the manifest has no model_config"
        )
    return ModelSpec.from_layer_configs(
        str(config.get("name") or manifest.name),
        list(config["layers"]),
        keras_version=manifest.keras_version,
    )


def onnx_weights(model: onnx.ModelProto, spec: ModelSpec) -> Weights:
    """Every weight of ``spec``, read from the graph's ``LAYER/PATH`` initializers."""
    stored = {init.name: init for init in model.graph.initializer}
    weights: Weights = {}
    for layer, shapes in spec.weight_shapes().items():
        weights[layer] = {}
        for path, shape in shapes.items():
            init = stored.get(f"{layer}/{path}")
            if init is None:
                raise ExportError(f"the ONNX graph has no weight {layer}/{path}")
            value = numpy_helper.to_array(init).astype(np.float32)
            if value.shape != tuple(shape):
                raise ExportError(
                    f"weight {layer}/{path} has shape {value.shape}, expected {shape}"
                )
            weights[layer][path] = value
    return weights


def _check_expressible(spec: ModelSpec) -> None:
    """Keras 3 cannot express tf-keras's hard_sigmoid (0.2x + 0.5) nor time-major RNNs."""
    if spec.time_major:
        raise ExportError("time-major models cannot be written for Keras 3 (it has no time_major)")
    if spec.keras_version == 2:
        for layer in spec.recurrent_layers():
            rnns = (
                [layer.forward, layer.backward] if isinstance(layer, BidirectionalSpec) else [layer]
            )
            for rnn in rnns:
                for cell in rnn.cells if isinstance(rnn, RNNSpec) else []:
                    if "hard_sigmoid" in (cell.activation, cell.recurrent_activation):
                        raise ExportError(
                            f"layer {layer.name!r} uses tf-keras's hard_sigmoid (0.2x + 0.5), "
                            "which Keras 3 computes differently (x/6 + 0.5)"
                        )


def _strip_keras2(value: Any) -> Any:
    """Drop the ``keras_version`` marks gruserve adds to Keras 2 cells."""
    if isinstance(value, dict):
        return {k: _strip_keras2(v) for k, v in value.items() if k != "keras_version"}
    if isinstance(value, list):
        return [_strip_keras2(v) for v in value]
    return value


def model_json(spec: ModelSpec) -> dict[str, Any]:
    """``config.json``: the Sequential as ``keras.saving.serialize_keras_object`` writes it."""
    config = _strip_keras2(spec.to_config())
    input_shape = config["layers"][0]["config"]["batch_shape"]
    return {
        "module": "keras",
        "class_name": "Sequential",
        "config": {"name": config["name"], "trainable": True, "layers": config["layers"]},
        "registered_name": None,
        "build_config": {"input_shape": input_shape},
        "compile_config": None,
    }


def weights_h5(spec: ModelSpec, weights: Weights) -> bytes:
    """``model.weights.h5``: one ``vars`` group per object, variables in creation order."""
    buffer = io.BytesIO()
    layers = spec.layers
    names = counted_names(layer.class_name for layer in layers)
    with h5py.File(buffer, "w") as h5:
        h5.create_group("vars")
        root = h5.create_group("layers")
        for layer, name, width in zip(layers, names, spec.layer_input_features(), strict=True):
            group = root.create_group(name)
            group.create_group("vars")
            for var_group in variable_groups(layer, width):
                target = group
                for part in [p for p in var_group.archive_path.split("/") if p]:
                    target = target.require_group(part)
                    target.require_group("vars")
                holder = target["vars"]
                for index, path in enumerate(var_group.weights):
                    holder.create_dataset(str(index), data=weights[layer.name][path])
    return buffer.getvalue()


def write_keras_file(spec: ModelSpec, weights: Weights, out: Path) -> None:
    """Write ``out`` (a ``.keras`` archive) atomically: a failure leaves no partial file."""
    _check_expressible(spec)
    out = Path(out)
    if out.suffix != ".keras":
        raise ExportError(f"{out}: the output must be a .keras file")
    metadata = {
        "keras_version": KERAS_VERSION,
        "date_saved": datetime.now(UTC).strftime("%Y-%m-%d@%H:%M:%S"),
        "producer": f"gruserve {__version__}",
    }
    members = {
        METADATA: json.dumps(metadata).encode(),
        CONFIG: json.dumps(model_json(spec)).encode(),
        WEIGHTS: weights_h5(spec, weights),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(handle, "wb") as raw, zipfile.ZipFile(raw, "w") as archive:
            for member, data in members.items():
                archive.writestr(member, data)
        os.replace(staging, out)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
