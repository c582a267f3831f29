"""Reduce a functional model's graph to a single chain of layers, or refuse it.

A functional config lists layers with ``inbound_nodes``: Keras 3 writes
``{"args": [{"class_name": "__keras_tensor__", "config": {"keras_history":
[layer, node, tensor]}}], "kwargs": {...}}`` per call, tf-keras writes
``[[layer, node, tensor, kwargs], ...]``. Walking back from the one output
through each layer's single input must reach the one Input; every layer must
be called once. Anything else (branches, merges, shared layers, several
inputs or outputs, extra tensor arguments such as ``initial_state``) would be
computed wrongly by a chain of specs, so it raises :class:`ConfigError`.
The only layers allowed off the chain are Keras 3's mask operations, checked
by :mod:`gruserve.keras_io.masks`. Parsing the two node formats lives in
:mod:`gruserve.keras_io.graph`.
"""

from __future__ import annotations

from typing import Any

from gruserve.errors import ConfigError
from gruserve.keras_io.graph import Call, Ref, read_calls, read_refs
from gruserve.keras_io.masks import check_side_layers
from gruserve.keras_io.serialized import entry_name, layer_entry

_LINEAR = "only single-input, single-output models whose layers form one chain are supported"


def linear_chain(
    where: str, config: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Return the chain's layer entries (InputLayer first) and all layers in tracking order."""
    items = config.get("layers")
    if not isinstance(items, list):
        raise ConfigError(where, "the functional model config has no `layers` list")
    entries: dict[str, dict[str, Any]] = {}
    calls: dict[str, list[Call]] = {}
    for item in items:
        entry = layer_entry(where, item)
        name = str(item.get("name") or entry_name(entry))
        if name in entries:
            raise ConfigError(where, f"two layers are named {name!r}")
        entries[name] = entry
        calls[name] = read_calls(where, name, item.get("inbound_nodes") or [])
    inputs = read_refs(where, config.get("input_layers"), "input_layers")
    outputs = read_refs(where, config.get("output_layers"), "output_layers")
    if len(inputs) != 1 or len(outputs) != 1:
        raise ConfigError(
            where,
            f"the model has {len(inputs)} input(s) {[r.layer for r in inputs]} and "
            f"{len(outputs)} output(s) {[r.layer for r in outputs]}; {_LINEAR}{_hint(outputs)}",
        )
    chain = _walk_back(where, entries, calls, inputs[0], outputs[0])
    check_side_layers(where, entries, calls, chain, _LINEAR)
    ordered = [entries[inputs[0].layer]] + [entries[name] for name in chain]
    tracked = [(name, entry["class_name"]) for name, entry in entries.items()]
    return ordered, tracked


def _hint(outputs: list[Ref]) -> str:
    if len(outputs) > 1 and len({ref.layer for ref in outputs}) == 1:
        return (
            f" (layer {outputs[0].layer!r} returns several tensors, as with return_state=True or "
            "merge_mode=None: save it in a Sequential model, or output one tensor)"
        )
    return ""


def _walk_back(
    where: str,
    entries: dict[str, dict[str, Any]],
    calls: dict[str, list[Call]],
    first: Ref,
    last: Ref,
) -> list[str]:
    """Layer names from the input (excluded) to the output, following single inputs."""
    chain: list[str] = []
    ref = last
    while True:
        name = ref.layer
        at = f"layer {name!r}"
        if name not in entries:
            raise ConfigError(where, f"{at} is referenced but not defined in the config")
        if entries[name]["class_name"] == "InputLayer":
            if ref != first:
                raise ConfigError(
                    where, f"{at} is an Input other than the model's input; {_LINEAR}"
                )
            break
        if name in chain:
            raise ConfigError(where, f"{at} appears twice on the path to the output; {_LINEAR}")
        layer_calls = calls[name]
        if len(layer_calls) != 1 or ref.node != 0:
            raise ConfigError(
                where,
                f"{at} is called {max(len(layer_calls), ref.node + 1)} times "
                f"(shared layers are not supported); {_LINEAR}",
            )
        if ref.index != 0:  # e.g. the state of a return_state=True GRU feeding the next layer
            raise ConfigError(where, f"{at}: its output {ref.index} is used; {_LINEAR}")
        call = layer_calls[0]
        if len(call.inputs) != 1:
            raise ConfigError(
                where,
                f"{at} ({entries[name]['class_name']}) takes {len(call.inputs)} input tensors "
                f"{[r.layer for r in call.inputs]}; {_LINEAR}",
            )
        if call.tensor_kwargs:
            raise ConfigError(
                where,
                f"{at} receives tensors as keyword argument(s) {call.tensor_kwargs}; {_LINEAR}",
            )
        chain.append(name)
        ref = call.inputs[0]
    chain.reverse()
    return chain
