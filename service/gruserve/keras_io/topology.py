"""Turn a serialized Keras model into an ordered list of layer configs.

``ModelSpec.from_layer_configs`` wants what a Sequential config holds: an
optional InputLayer followed by the layers in call order. A Sequential config
is almost that already; a functional config is a graph that
:mod:`gruserve.keras_io.functional` reduces to the same list, refusing
anything that is not a single chain. The result also keeps every layer in the
order Keras tracks them, because ``.keras`` archives name weight groups by
that order (see :mod:`gruserve.keras_io.weights`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gruserve.errors import ConfigError
from gruserve.keras_io.functional import linear_chain
from gruserve.keras_io.serialized import entry_name, layer_entry

SEQUENTIAL = frozenset({"Sequential"})
FUNCTIONAL = frozenset({"Functional", "Model"})
# Where an input shape may already sit on a tf-keras Sequential's first layer.
_FIRST_LAYER_SHAPE_KEYS = ("batch_input_shape", "batch_shape")


@dataclass(frozen=True)
class Topology:
    """A model reduced to a chain.

    ``entries`` are ``{"class_name", "config"[, "build_config"]}`` dicts in call
    order, InputLayer first when the file has one; ``tracked`` is
    ``(layer name, class name)`` for every layer in Keras's ``model.layers``
    order, which is the order ``.keras`` archives count class names in.
    """

    model_class: str
    name: str
    entries: tuple[dict[str, Any], ...]
    tracked: tuple[tuple[str, str], ...]


def read_topology(where: str, model: Any) -> Topology:
    """From the top-level serialized model (``{"class_name", "config", ...}``)."""
    if not isinstance(model, dict):
        raise ConfigError(
            where, f"the model config must be a JSON object, got {type(model).__name__}"
        )
    class_name = model.get("class_name")
    config = model.get("config")
    if class_name in SEQUENTIAL:
        return _sequential(where, config)
    if class_name in FUNCTIONAL:
        if not isinstance(config, dict):
            raise ConfigError(where, "the functional model config must be a JSON object")
        name = str(config.get("name") or "model")
        entries, tracked = linear_chain(where, config)
        return Topology(str(class_name), name, tuple(entries), tuple(tracked))
    raise ConfigError(
        where,
        f"model class {class_name!r} is not supported: only Sequential models and functional "
        "models that form a single chain (Input -> layer -> ... -> one output) can be imported; "
        "subclassed models cannot be read without their Python code",
    )


def _sequential(where: str, config: Any) -> Topology:
    if isinstance(config, list):  # Keras <= 2.2 wrote the layer list directly
        config = {"name": "sequential", "layers": config}
    if not isinstance(config, dict) or not isinstance(config.get("layers"), list):
        raise ConfigError(where, "the Sequential config has no `layers` list")
    entries = [layer_entry(where, item) for item in config["layers"]]
    if not entries:
        raise ConfigError(where, "the Sequential model has no layers")
    has_input = any(entry["class_name"] == "InputLayer" for entry in entries)
    build_shape = config.get("build_input_shape")
    if not has_input and build_shape is not None and not _first_layer_has_shape(entries[0]):
        # Keras 3 Sequential built with model.build(shape) and no Input: the shape lives here.
        entries.insert(
            0,
            {
                "class_name": "InputLayer",
                "config": {"batch_shape": build_shape, "name": "input_layer"},
            },
        )
    tracked = tuple(
        (entry_name(e), e["class_name"]) for e in entries if e["class_name"] != "InputLayer"
    )
    name = str(config.get("name") or "sequential")
    return Topology("Sequential", name, tuple(entries), tracked)


def _first_layer_has_shape(entry: dict[str, Any]) -> bool:
    if any(entry["config"].get(key) is not None for key in _FIRST_LAYER_SHAPE_KEYS):
        return True
    return (entry.get("build_config") or {}).get("input_shape") is not None
