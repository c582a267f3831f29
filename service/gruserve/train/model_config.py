"""The ``model`` section: Keras layer configs -> the spec to train and the spec to export.

The section is what Keras's ``Sequential.get_config()`` returns (or just its
``layers`` list), so a Keras user pastes theirs. An ``InputLayer`` is added
when missing; ``training.stateful`` turns on ``stateful`` in every recurrent
layer and fixes the batch size, as Keras requires. The exported spec drops
both again: the server carries state explicitly and batches freely.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from gruserve.errors import ConfigError, GruServeError
from gruserve.layers.model import LAYER_CLASSES, ModelSpec, supported_layers
from gruserve.layers.recurrent import BidirectionalSpec, RNNSpec
from gruserve.train._reader import Section

_MODEL_KEYS_IGNORED = {
    "trainable",
    "dtype",
    "build_input_shape",
    "build_config",
    "module",
    "registered_name",
}


def model_spec(raw: Any, features: int, stateful: bool, batch_size: int) -> ModelSpec:
    """Keras layer configs -> the training :class:`ModelSpec` (InputLayer added if absent)."""
    if isinstance(raw, list):
        raw = {"layers": raw}
    if isinstance(raw, dict) and raw.get("class_name") == "Sequential":
        raw = raw.get("config") or {}
    s = Section("model", raw)
    name = s.string("name", "model")
    layers = s.raw("layers")
    s.used |= _MODEL_KEYS_IGNORED & set(s.data)
    s.finish()
    if not isinstance(layers, list) or not layers:
        raise ConfigError(
            "model.layers", f"expected a non-empty list of layer configs, got {layers!r}"
        )
    entries = []
    for i, entry in enumerate(layers):
        at = f"model.layers[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("config", {}), dict):
            raise ConfigError(at, f"expected {{class_name, config}}, got {entry!r}")
        class_name = entry.get("class_name")
        if class_name != "InputLayer" and class_name not in LAYER_CLASSES:
            raise ConfigError(
                f"{at}.class_name",
                f"unknown layer {class_name!r}; supported: {', '.join(supported_layers())}",
            )
        config = dict(entry.get("config") or {})
        if config.get("stateful") and not stateful:
            raise ConfigError(
                f"{at}.config.stateful",
                "true needs training.stateful: true, "
                "which builds the batches a stateful layer expects",
            )
        if stateful and class_name in ("GRU", "RNN"):
            config["stateful"] = True
        if stateful and class_name == "Bidirectional":
            config = _stateful_bidirectional(config)
        entries.append({"class_name": class_name, "config": config})
    batch = batch_size if stateful else None
    if entries[0]["class_name"] == "InputLayer":
        given = entries[0]["config"]
        shape = given.get("batch_shape") or given.get("batch_input_shape")
        if shape is None and given.get("shape") is not None:
            shape = [None, *given["shape"]]
        if not isinstance(shape, (list, tuple)) or len(shape) != 3:
            raise ConfigError(
                "model.layers[0].config.batch_shape",
                f"expected [batch, timesteps, features], got {shape!r}",
            )
        if shape[-1] != features:
            raise ConfigError(
                "model.layers[0]",
                f"InputLayer has {shape[-1]} features per step but data.features lists {features}",
            )
        for key in ("batch_input_shape", "shape", "batch_size"):
            given.pop(key, None)
        given["batch_shape"] = [batch, None, features]
    else:
        first = entries[0]["config"]
        for key in ("batch_input_shape", "batch_shape", "input_shape", "input_dim"):
            first.pop(key, None)
        entries.insert(
            0,
            {
                "class_name": "InputLayer",
                "config": {"batch_shape": [batch, None, features], "name": "inputs"},
            },
        )
    try:
        spec = ModelSpec.from_layer_configs(name, entries)
    except GruServeError as exc:
        raise ConfigError("model.layers", str(exc)) from None
    if spec.takes_token_ids:
        raise ConfigError(
            "model.layers[0]",
            "an Embedding first layer needs token ids; training reads numeric CSV features",
        )
    if spec.time_major:
        raise ConfigError(
            "model.layers",
            "time_major models cannot be trained here (Keras 3 rejects them as well)",
        )
    if stateful and not spec.returns_sequences():
        raise ConfigError(
            "training.stateful",
            "needs a model whose output is a sequence "
            "(return_sequences=True on the last recurrent layer)",
        )
    if spec.output_names() != ["outputs"]:
        raise ConfigError("model.layers", "the model must have one output")
    return spec


def _stateful_bidirectional(config: dict[str, Any]) -> dict[str, Any]:
    config = dict(config)
    for key in ("layer", "backward_layer"):
        if isinstance(config.get(key), dict):
            inner = dict(config[key])
            inner["config"] = {**(inner.get("config") or {}), "stateful": True}
            config[key] = inner
    return config


def inference_spec(spec: ModelSpec) -> ModelSpec:
    """The spec to export: no stateful buffers (state is explicit), any batch, any length."""
    layers = []
    for layer in spec.layers:
        if isinstance(layer, BidirectionalSpec):
            layer = replace(
                layer,
                forward=replace(layer.forward, stateful=False),
                backward=replace(layer.backward, stateful=False),
            )
        elif isinstance(layer, RNNSpec) and layer.stateful:
            layer = replace(layer, stateful=False)
        layers.append(layer)
    shape = (None, *spec.input.shape[1:])
    return ModelSpec(
        spec.name,
        replace(spec.input, batch_size=None, shape=shape),
        tuple(layers),
        spec.keras_version,
    )
