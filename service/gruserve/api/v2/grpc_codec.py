"""The v2 gRPC messages to and from the shared request and reply forms.

A ``ModelInferRequest`` carries each input's elements either typed (``contents``, one
repeated field per datatype family) or as raw little-endian bytes in
``raw_input_contents`` (what ``tritonclient.grpc`` sends), one entry per input. Both are
turned into the entries :func:`gruserve.api.v2.tensors.decode_input` checks for HTTP,
so a tensor is validated by the same code whatever carried it, and the result is the
same :class:`~gruserve.api.v2.request.InferRequest`. Replies always carry
``raw_output_contents``, as Triton's do. Parameters (``InferParameter``, a oneof) become
plain Python values, so :mod:`gruserve.api.v2.params` reads ``sequence_id``,
``sequence_start`` and ``sequence_end`` as it does from JSON.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from gruserve.api.v2.request import InferRequest, RequestedOutput
from gruserve.api.v2.tensors import DATATYPES, MAX_RANK, Tensor, datatype_of, decode_input
from gruserve.errors import InvalidInput

# The typed ``contents`` field each datatype's elements travel in (FP16, BF16: raw only).
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_INT64_MAX = 2**63 - 1
_LITTLE = sys.byteorder == "little"


def value_of(parameter: pb.InferParameter) -> Any:
    """A parameter's value (bool, int, str or float), None when none is set."""
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def parameters_of(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """The parameters that have a value, as plain values."""
    found = {}
    for key in parameters:  # not .items(): a generator in Python over the protobuf map
        parameter = parameters[key]
        kind = parameter.WhichOneof("parameter_choice")  # value_of, inlined: every request
        if kind is not None:
            found[key] = getattr(parameter, kind)
    return found


def set_parameter(parameter: pb.InferParameter, value: Any) -> None:
    """Store ``value`` in the oneof field of its type (a uint64 past int64 as uint64)."""
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        if value > _INT64_MAX:
            parameter.uint64_param = value
        else:
            parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    else:
        parameter.string_param = str(value)


def parse(request: pb.ModelInferRequest) -> InferRequest:
    """The request's tensors decoded and checked as :mod:`~gruserve.api.v2.tensors` checks
    HTTP's.

    Raises:
        InvalidInput: naming the field, e.g. ``inputs[0].shape`` or ``raw_input_contents[1]``.
    """
    if not request.inputs:
        raise InvalidInput("inputs", "required: a non-empty list of input tensors")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            "raw_input_contents",
            f"{len(raw)} entries for {len(request.inputs)} inputs: raw contents go with every "
            "input or none",
        )
    tensors: list[Tensor] = []
    for i, tensor in enumerate(request.inputs):
        decoded = _input(i, tensor, raw[i] if raw else None)
        if any(t.name == decoded.name for t in tensors):
            raise InvalidInput(f"inputs[{i}].name", f"input {decoded.name!r} is given twice")
        tensors.append(decoded)
    outputs: list[RequestedOutput] | None = None
    if request.outputs:
        outputs = []
        for i, wanted in enumerate(request.outputs):
            if not wanted.name:
                raise InvalidInput(f"outputs[{i}].name", "expected an output name, got none")
            if any(
                k.startswith("shared_memory") or k == "classification" for k in wanted.parameters
            ):
                raise InvalidInput(
                    f"outputs[{i}].parameters", "classification and shared memory are not supported"
                )
            if any(o.name == wanted.name for o in outputs):
                raise InvalidInput(
                    f"outputs[{i}].name", f"output {wanted.name!r} is requested twice"
                )
            outputs.append(RequestedOutput(wanted.name, None))
    return InferRequest(request.id or None, tensors, outputs, parameters_of(request.parameters))


def _raw_tensor(
    field: str, tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes
) -> Tensor | None:
    """A raw-contents input that :func:`~gruserve.api.v2.tensors.decode_input` would
    accept as it is (a name, a numeric non-BOOL datatype, no tensor parameters, no
    ``contents``, a shape of at most 8 sizes >= 0 whose bytes ``raw`` holds exactly),
    decoded without building its JSON-like entry first; None for any other, which the
    general path then decodes or refuses with its own message. Every stream step takes
    this path, and the general one cost a third of a step's v2 work (bench/README.md)."""
    dtype = DATATYPES.get(tensor.datatype)
    if dtype is None or dtype.kind == "b" or not tensor.name or tensor.parameters:
        return None
    shape = tuple(tensor.shape)
    if len(shape) > MAX_RANK or min(shape, default=0) < 0:
        return None
    if math.prod(shape) * dtype.itemsize != len(raw) or tensor.HasField("contents"):
        return None
    return Tensor(tensor.name, tensor.datatype, np.frombuffer(raw, dtype).reshape(shape), field)


def _input(i: int, tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Tensor:
    field = f"inputs[{i}]"
    if raw is not None:
        fast = _raw_tensor(field, tensor, raw)
        if fast is not None:
            return fast
    entry: dict[str, Any] = {
        "name": tensor.name,
        "datatype": tensor.datatype,
        "shape": list(tensor.shape),
        "parameters": parameters_of(tensor.parameters),
    }
    given = [f.name for f, _ in tensor.contents.ListFields()]
    if raw is not None:
        if given:
            raise InvalidInput(
                f"{field}.contents", f"input {tensor.name!r} has both contents and raw contents"
            )
        entry["parameters"]["binary_data_size"] = len(raw)
        try:
            decoded, _ = decode_input(field, entry, raw, 0)
        except InvalidInput as exc:
            if exc.field != f"{field}.parameters.binary_data_size":
                raise
            dtype = DATATYPES[tensor.datatype]
            need = math.prod(tensor.shape) * (dtype.itemsize if dtype is not None else 0)
            if need == len(raw):  # the size fits: the bytes themselves are wrong (BOOL 0/1)
                raise InvalidInput(f"raw_input_contents[{i}]", exc.detail) from None
            raise InvalidInput(
                f"raw_input_contents[{i}]",
                f"input {tensor.name!r}: shape {list(tensor.shape)} of {tensor.datatype} takes "
                f"{need} bytes, got {len(raw)}",
            ) from None
        return decoded
    expected = CONTENTS.get(tensor.datatype)
    if given and given != [expected]:
        raise InvalidInput(
            f"{field}.contents",
            f"input {tensor.name!r} is {tensor.datatype}: its elements go in "
            f"{expected or 'raw_input_contents'}, got {', '.join(given)}",
        )
    if expected is not None:  # none given: an empty list, which only a 0-element shape fits
        entry["data"] = list(getattr(tensor.contents, expected))
    decoded, _ = decode_input(field, entry, b"", 0)
    return decoded


def reply(
    model: str,
    version: int,
    request_id: str | None,
    outputs: Sequence[tuple[str, np.ndarray, bool]],
    parameters: Mapping[str, Any] | None = None,
    into: pb.ModelInferResponse | None = None,
) -> pb.ModelInferResponse:
    """The inference response: each output's raw little-endian bytes.

    Args:
        into: an empty response to fill (a stream reply's ``infer_response``, which
            assigning a finished one to would copy), or None: a new one.
    """
    response = pb.ModelInferResponse() if into is None else into
    response.model_name = model
    response.model_version = str(version)
    if request_id:
        response.id = request_id
    if parameters:
        fields = response.parameters
        for key, value in parameters.items():
            set_parameter(fields[key], value)
    for name, array, _binary in outputs:
        flat = np.ascontiguousarray(array)
        dtype = flat.dtype
        if not (dtype.byteorder == "<" or (_LITTLE and dtype.byteorder in "=|")):
            flat = flat.astype(dtype.newbyteorder("<"))
        response.outputs.add(name=name, datatype=datatype_of(dtype), shape=flat.shape)
        response.raw_output_contents.append(flat.tobytes())
    return response
