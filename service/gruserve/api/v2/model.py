"""A served model as the v2 protocol sees it: named tensors, and requests bound to them.

Every v2 tensor is batch-major whatever the graph's layout (the runtime
transposes time-major graphs), with -1 for sizes a request chooses:

- ``inputs``: FP32 ``[-1, -1, features]``, or INT64 token ids ``[-1, -1]``;
- ``mask``: BOOL ``[-1, -1]``, optional (false skips a timestep);
- ``initial_state/<key>``: FP32 ``[-1, units]`` per recurrent state, optional;
- the graph outputs (``outputs``): FP32 ``[-1, -1, D]``, or ``[-1, D]`` for a model
  with one output per sequence;
- ``final_state/<key>``: FP32 ``[-1, units]``, returned only when asked for by name.

The state tensors are what Triton calls implicit state (the model config
declares them under ``sequence_batching.state``): within a sequence the server
carries them, and a client may still ask for ``final_state/<key>``. Names come
from the model's manifest, so they are the ONNX graph's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from weakref import WeakKeyDictionary

import numpy as np

from gruserve.api.v2.request import InferRequest
from gruserve.errors import InvalidInput
from gruserve.runtime.model import LoadedModel
from gruserve.runtime.signature import ModelSignature
from gruserve.sessions.service import StepResult

Produced = list[tuple[str, np.ndarray, bool]]
"""Reply outputs: ``(name, array, binary)``."""


@dataclass(frozen=True)
class TensorSpec:
    """``shape`` is batch-major with -1 for any size; ``key`` is the state key, if a state."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    key: str | None = None

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class WireModel:
    """The tensors of one served model version."""

    name: str
    version: int
    values: TensorSpec
    mask: TensorSpec
    outputs: tuple[TensorSpec, ...]
    initial_states: tuple[TensorSpec, ...]
    final_states: tuple[TensorSpec, ...]

    @cached_property
    def input_specs(self) -> dict[str, TensorSpec]:
        """Every input a request may carry, by name (made once: each request binds by it)."""
        return {t.name: t for t in (self.values, self.mask, *self.initial_states)}

    def metadata(self, platform: str) -> dict[str, Any]:
        """``GET /v2/models/{m}``: what the config declares as inputs and outputs."""
        return {
            "name": self.name,
            "versions": [str(self.version)],
            "platform": platform,
            "inputs": [self.values.metadata(), self.mask.metadata()],
            "outputs": [o.metadata() for o in self.outputs],
        }


_WIRE: WeakKeyDictionary[LoadedModel, WireModel] = WeakKeyDictionary()


def wire_model(model: LoadedModel) -> WireModel:
    """The model's v2 tensors (computed once per loaded model)."""
    wire = _WIRE.get(model)
    if wire is None:
        wire = _WIRE[model] = _describe(model)
    return wire


def _describe(model: LoadedModel) -> WireModel:
    sig, manifest = model.signature, model.signature.manifest
    if sig.takes_token_ids:
        values = TensorSpec(manifest.input.name, "INT64", (-1, -1))
    else:
        values = TensorSpec(manifest.input.name, "FP32", (-1, -1, sig.features or 0))
    width = sig.output_width
    out_shape = (-1, -1, width) if sig.per_timestep else (-1, width)
    return WireModel(
        model.name,
        model.version,
        values,
        TensorSpec(manifest.mask.name, "BOOL", (-1, -1)),
        tuple(TensorSpec(n, "FP32", out_shape) for n in sig.output_names),
        tuple(TensorSpec(s.input, "FP32", (-1, s.units), s.key) for s in manifest.states),
        tuple(TensorSpec(s.output, "FP32", (-1, s.units), s.key) for s in manifest.states),
    )


@dataclass(frozen=True)
class Call:
    """A request bound to a model: what the predictor or the session service needs."""

    inputs: np.ndarray
    mask: np.ndarray | None
    states: dict[str, np.ndarray] | None  # by state key
    outputs: list[tuple[str, bool]]  # (output name, binary)

    def wanted(self, wire: WireModel) -> tuple[list[str], list[str]]:
        """The requested graph outputs by name and final states by state key (what the
        predictor keeps and counts against the reply limit)."""
        chosen = {name for name, _ in self.outputs}
        names = [o.name for o in wire.outputs if o.name in chosen]
        keys = [s.key or s.name for s in wire.final_states if s.name in chosen]
        return names, keys

    def one_sequence(self) -> Call:
        """The single sequence of a sequence request, batch axis dropped."""
        if self.inputs.shape[0] != 1:
            raise InvalidInput(
                "inputs",
                f"a sequence request carries one sequence, batch size 1: got shape "
                f"{list(self.inputs.shape)}",
            )
        states = None if self.states is None else {k: v[0] for k, v in self.states.items()}
        return Call(
            self.inputs[0], None if self.mask is None else self.mask[0], states, self.outputs
        )


def _check(spec: TensorSpec, array: np.ndarray, datatype: str, field: str, model: str) -> None:
    if datatype != spec.datatype:
        raise InvalidInput(
            f"{field}.datatype",
            f"input {spec.name!r} of model {model!r} is {spec.datatype}, got {datatype}",
        )
    shape = array.shape
    if len(shape) != len(spec.shape) or any(
        want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
    ):
        raise InvalidInput(
            f"{field}.shape",
            f"input {spec.name!r} of model {model!r} has shape {list(spec.shape)} (-1: any "
            f"size), got {list(shape)}",
        )


def bind(wire: WireModel, request: InferRequest, binary_default: bool) -> Call:
    """Match the request's tensors and requested outputs to the model's, by name."""
    specs = wire.input_specs
    inputs = mask = None
    given: dict[str, np.ndarray] = {}
    for tensor in request.inputs:
        spec = specs.get(tensor.name)
        if spec is None:
            raise InvalidInput(
                f"{tensor.field}.name",
                f"model {wire.name!r} has no input {tensor.name!r}; its inputs are {list(specs)}",
            )
        _check(spec, tensor.array, tensor.datatype, tensor.field, wire.name)
        if spec is wire.values:
            inputs = tensor.array
        elif spec is wire.mask:
            mask = tensor.array
        else:
            given[spec.key or spec.name] = tensor.array
    if inputs is None:
        raise InvalidInput("inputs", f"required input {wire.values.name!r} is missing")
    return Call(inputs, mask, given or None, _requested(wire, request, binary_default))


def _requested(
    wire: WireModel, request: InferRequest, binary_default: bool
) -> list[tuple[str, bool]]:
    if request.outputs is None:
        return [(o.name, binary_default) for o in wire.outputs]
    names = [o.name for o in wire.outputs + wire.final_states]
    chosen = []
    for i, output in enumerate(request.outputs):
        if output.name not in names:
            raise InvalidInput(
                f"outputs[{i}].name",
                f"model {wire.name!r} has no output {output.name!r}; its outputs are {names}",
            )
        chosen.append((output.name, binary_default if output.binary is None else output.binary))
    return chosen


def produced(
    wire: WireModel,
    call: Call,
    outputs: Mapping[str, np.ndarray],
    states: Mapping[str, np.ndarray],
) -> Produced:
    """The requested outputs, from model outputs by name and final states by state key
    (``outputs`` and ``states`` need hold only the requested ones)."""
    by_name = dict(outputs)
    for spec in wire.final_states:
        key = spec.key or spec.name
        if key in states:
            by_name[spec.name] = states[key]
    return [(name, by_name[name], binary) for name, binary in call.outputs]


def sequence_outputs(
    wire: WireModel, call: Call, step: StepResult, signature: ModelSignature
) -> Produced:
    """A sequence step's requested outputs, with the batch axis (of 1) the request had.

    Only the requested ones are sliced (a step asks for its outputs, rarely its state)."""
    wanted = {name for name, _ in call.outputs}
    outputs = {name: array[np.newaxis] for name, array in step.outputs.items() if name in wanted}
    states: dict[str, np.ndarray] = {}
    if any(spec.name in wanted for spec in wire.final_states):
        split = signature.split_state(step.record.state)
        states = {key: array[np.newaxis] for key, array in split.items()}
    return produced(wire, call, outputs, states)
