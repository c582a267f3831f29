"""One serialized layer entry, as both Sequential and functional configs hold it.

Keras 3 adds ``module``, ``registered_name`` and ``build_config`` around the
``class_name``/``config`` pair tf-keras writes; the specs need only the latter
(plus ``build_config``, where a Keras 3 first layer may record its input shape).
"""

from __future__ import annotations

from typing import Any

from gruserve.errors import ConfigError, UnsupportedLayer
from gruserve.layers.model import supported_layers


def layer_entry(where: str, item: Any) -> dict[str, Any]:
    """The parts of one serialized layer the specs read, after basic checks."""
    if not isinstance(item, dict) or not isinstance(item.get("class_name"), str):
        raise ConfigError(
            where, f"a layer entry must be an object with a `class_name`, got {item!r:.80}"
        )
    config = item.get("config")
    if not isinstance(config, dict):
        raise ConfigError(where, f"layer entry {item['class_name']!r} has no `config` object")
    class_name = item["class_name"]
    registered = item.get("registered_name")
    name = str(config.get("name") or item.get("name") or "?")
    if isinstance(registered, str) and registered not in (class_name, ""):
        # A class registered with keras.saving.register_keras_serializable: custom code,
        # even when its class name shadows a built-in layer.
        raise UnsupportedLayer(name, registered, supported_layers())
    entry: dict[str, Any] = {"class_name": class_name, "config": config}
    if isinstance(item.get("build_config"), dict):
        entry["build_config"] = item["build_config"]
    return entry


def entry_name(entry: dict[str, Any]) -> str:
    return str(entry["config"].get("name") or "")
