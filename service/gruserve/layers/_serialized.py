"""Reading Keras's serialized objects (initializers, regularizers, constraints).

Keras 3 writes ``{"module": ..., "class_name": "GlorotUniform", "config":
{...}, "registered_name": ...}``, tf-keras writes ``{"class_name": ...,
"config": {...}}``, and both accept plain snake-case names. All three forms end
up as ``(snake_name, config)``.
"""

from __future__ import annotations

import re
from typing import Any

from gruserve.errors import InvalidArgument

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
# Class names whose snake form is not the plain conversion.
_SPECIAL = {
    "L1L2": "l1_l2",
    "NonNeg": "non_neg",
    "OrthogonalInitializer": "orthogonal",
    "IdentityInitializer": "identity",
}


def snake_name(class_name: str) -> str:
    """GlorotUniform -> glorot_uniform, with Keras's few irregular names."""
    return _SPECIAL.get(class_name) or _CAMEL.sub("_", class_name).lower()


def parse_serialized(
    identifier: Any,
    *,
    where: str,
    argument: str,
    known: dict[str, dict[str, Any]],
    aliases: dict[str, str] | None = None,
) -> tuple[str, dict[str, Any]] | None:
    """Return ``(name, config)`` with defaults filled in, or ``None`` for None.

    ``known`` maps each accepted snake name to its default config; unknown
    names and unknown config keys raise :class:`InvalidArgument` naming them.
    """
    if identifier is None:
        return None
    if isinstance(identifier, str):
        name, config = identifier, {}
    elif isinstance(identifier, dict) and "class_name" in identifier:
        name = snake_name(str(identifier["class_name"]))
        config = dict(identifier.get("config") or {})
    else:
        raise InvalidArgument(where, argument, identifier, "a name or a Keras serialized dict")
    name = (aliases or {}).get(name, name)
    if name not in known and isinstance(identifier, str):
        name = snake_name(name)  # Keras also resolves class names: "Zeros", "NonNeg"
    if name not in known:
        raise InvalidArgument(where, argument, identifier, sorted(known))
    defaults = known[name]
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise InvalidArgument(
            where, argument, identifier, f"config keys among {sorted(defaults)}; unknown {unknown}"
        )
    return name, {**defaults, **config}


def to_keras(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """Keras 3's serialized form, for ``get_config`` round trips."""
    class_name = "".join(part.capitalize() for part in name.split("_"))
    return {"class_name": class_name, "config": dict(config)}


def keras_layer_entry(class_name: str, config: dict[str, Any]) -> dict[str, Any]:
    """A serialized layer as Keras 3 writes it, ``module`` included.

    ``keras.Sequential.from_config`` finds top-level layers by class name
    alone, but a layer nested in another one's config (Bidirectional's
    ``layer``, an RNN's ``cell``, StackedRNNCells' ``cells``) is only found
    through its module.
    """
    return {
        "module": "keras.layers",
        "class_name": class_name,
        "config": config,
        "registered_name": None,
    }
