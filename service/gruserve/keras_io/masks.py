"""Check the mask operations Keras 3 records in functional configs.

A Keras 3 ``Masking`` layer's mask appears in the graph as ``NotEqual`` ->
``Any`` operations and an ``Embedding(mask_zero=True)``'s as ``NotEqual``,
handed to later layers as their ``mask`` keyword. The specs propagate those
masks implicitly, so such operations are accepted only where they recompute
exactly the mask a Masking/Embedding layer of the chain produces (same input,
same masked value); any other mask would be silently dropped, so it is refused.
"""

from __future__ import annotations

import math
from typing import Any

from gruserve.errors import ConfigError
from gruserve.keras_io.graph import Call, Ref

MASK_OPS = frozenset({"NotEqual", "Any"})
_UNEXPLAINED = (
    "computes a mask that no Masking or Embedding(mask_zero=True) layer of the chain explains; "
    "explicit masks are not supported"
)


def check_side_layers(
    where: str,
    entries: dict[str, dict[str, Any]],
    calls: dict[str, list[Call]],
    chain: list[str],
    linear: str,
) -> None:
    """Every layer off the chain must be a mask operation that recomputes a chain layer's mask."""
    # (tensor a mask-producing chain layer reads, the value it masks, its class)
    sources: list[tuple[str, float, str]] = []
    for name in chain:
        call = calls[name][0]
        if call.mask is not None:
            _check_mask_use(where, name, call.mask, entries, calls, sources)
        masked = _masked_value(entries[name])
        if masked is not None:
            sources.append((call.inputs[0].layer, masked, entries[name]["class_name"]))
    on_chain = set(chain)
    for name, entry in entries.items():
        if name in on_chain or entry["class_name"] == "InputLayer":
            continue
        if entry["class_name"] not in MASK_OPS:
            raise ConfigError(
                where,
                f"layer {name!r} ({entry['class_name']}) is not on the path from the input "
                f"to the output; {linear}",
            )
        if _mask_kind(entries, calls, name, sources) is None:
            raise ConfigError(where, f"layer {name!r} ({entry['class_name']}) {_UNEXPLAINED}")


def _check_mask_use(
    where: str,
    name: str,
    mask: Ref,
    entries: dict[str, dict[str, Any]],
    calls: dict[str, list[Call]],
    sources: list[tuple[str, float, str]],
) -> None:
    """A chain layer's ``mask`` argument must be a mask an earlier chain layer produced."""
    kind = _mask_kind(entries, calls, mask.layer, sources) if mask.layer in entries else None
    # Masking's mask is Any(NotEqual(x)); Embedding's is NotEqual(ids) itself.
    producer = str(entries.get(mask.layer, {}).get("class_name"))
    expected = {"Any": "Masking", "NotEqual": "Embedding"}.get(producer)
    if kind is None or kind != expected or mask.node != 0 or mask.index != 0:
        raise ConfigError(
            where, f"layer {name!r} is given the mask {mask.layer!r}, which {_UNEXPLAINED}"
        )


def _mask_kind(
    entries: dict[str, dict[str, Any]],
    calls: dict[str, list[Call]],
    name: str,
    sources: list[tuple[str, float, str]],
) -> str | None:
    """Which chain layer class ("Masking"/"Embedding") mask op ``name`` recomputes, if any."""
    entry = entries[name]
    layer_calls = calls.get(name) or []
    if (
        entry["class_name"] not in MASK_OPS
        or len(layer_calls) != 1
        or len(layer_calls[0].inputs) != 1
    ):
        return None
    call = layer_calls[0]
    source = call.inputs[0]
    if entry["class_name"] == "NotEqual":
        value = call.constants[0] if len(call.constants) == 1 else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or source.index != 0:
            return None
        matches = [
            kind for src, masked, kind in sources if src == source.layer and float(value) == masked
        ]
        return matches[0] if matches else None
    config = entry["config"]
    reduces_features = config.get("axis") in (-1, [-1]) and not config.get("keepdims", False)
    if not reduces_features or source.layer not in entries:
        return None
    if entries[source.layer]["class_name"] != "NotEqual":
        return None
    return "Masking" if _mask_kind(entries, calls, source.layer, sources) == "Masking" else None


def _masked_value(entry: dict[str, Any]) -> float | None:
    """The value a chain layer masks on (Masking's mask_value, 0 for Embedding(mask_zero))."""
    config = entry["config"]
    if entry["class_name"] == "Masking":
        value = config.get("mask_value", 0.0)
        return float(value) if isinstance(value, (int, float)) else math.nan
    if entry["class_name"] == "Embedding" and config.get("mask_zero") is True:
        return 0.0
    return None
