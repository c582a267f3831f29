"""Parse the ``inbound_nodes`` of a functional config into calls and tensor references.

Keras 3 writes one ``{"args": [...], "kwargs": {...}}`` per call, tensors being
``{"class_name": "__keras_tensor__", "config": {"keras_history": [layer, node,
index]}}``; tf-keras writes ``[[layer, node, index, kwargs], ...]`` per call.
Both become :class:`Call` objects so the graph checks need not know the format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gruserve.errors import ConfigError


@dataclass(frozen=True)
class Ref:
    """One tensor: output ``index`` of call ``node`` of layer ``layer``."""

    layer: str
    node: int = 0
    index: int = 0


@dataclass
class Call:
    """One call of a layer: its tensor inputs, the mask it was given, constant arguments."""

    inputs: list[Ref] = field(default_factory=list)
    mask: Ref | None = None
    constants: list[Any] = field(default_factory=list)
    tensor_kwargs: list[str] = field(default_factory=list)


def read_refs(where: str, value: Any, key: str) -> list[Ref]:
    """``input_layers``/``output_layers``: one ``[name, node, index]`` or a nest of them."""
    ref = _as_ref(value)
    if ref is not None:
        return [ref]
    if isinstance(value, dict):
        value = list(value.values())
    if not isinstance(value, list):
        raise ConfigError(
            where, f"`{key}` must list [layer, node, index] triples, got {value!r:.80}"
        )
    return [r for item in value for r in read_refs(where, item, key)]


def _as_ref(value: Any) -> Ref | None:
    """``[name, node, index]`` (tf-keras may add a kwargs dict) as a :class:`Ref`."""
    if (
        isinstance(value, (list, tuple))
        and len(value) in (3, 4)
        and isinstance(value[0], str)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value[1:3])
    ):
        return Ref(value[0], value[1], value[2])
    return None


def _keras3_tensor(value: Any) -> Ref | None:
    if isinstance(value, dict) and value.get("class_name") == "__keras_tensor__":
        history = (value.get("config") or {}).get("keras_history")
        return _as_ref(history)
    return None


def _tensors_in(value: Any, tf_keras: bool) -> list[Ref]:
    """All tensor references nested anywhere in ``value``."""
    ref = _as_ref(value) if tf_keras else _keras3_tensor(value)
    if ref is not None:
        return [ref]
    if isinstance(value, dict):
        return [r for v in value.values() for r in _tensors_in(v, tf_keras)]
    if isinstance(value, (list, tuple)):
        return [r for v in value for r in _tensors_in(v, tf_keras)]
    return []


def _read_kwargs(call: Call, kwargs: Any, tf_keras: bool) -> None:
    if not isinstance(kwargs, dict):
        return
    for key, value in kwargs.items():
        tensors = _tensors_in(value, tf_keras)
        if key == "mask" and len(tensors) == 1 and call.mask is None:
            call.mask = tensors[0]
        elif tensors:
            call.tensor_kwargs.append(key)


def read_calls(where: str, name: str, nodes: Any) -> list[Call]:
    """Parse ``inbound_nodes`` in either Keras 3 or tf-keras format."""
    if not isinstance(nodes, list):
        raise ConfigError(where, f"layer {name!r} has malformed `inbound_nodes`")
    calls = []
    for node in nodes:
        call = Call()
        if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
            for arg in node.get("args") or []:
                tensors = _tensors_in(arg, tf_keras=False)
                if tensors:
                    call.inputs.extend(tensors)
                else:
                    call.constants.append(arg)
            _read_kwargs(call, node.get("kwargs"), tf_keras=False)
        elif isinstance(node, list):  # tf-keras: [[name, node, index, kwargs], ...]
            for inbound in node:
                ref = _as_ref(inbound)
                if ref is None:
                    raise ConfigError(
                        where, f"layer {name!r} has a malformed inbound node {inbound!r:.80}"
                    )
                call.inputs.append(ref)
                if len(inbound) == 4:
                    _read_kwargs(call, inbound[3], tf_keras=True)
        else:
            raise ConfigError(where, f"layer {name!r} has a malformed inbound node {node!r:.80}")
        calls.append(call)
    return calls
