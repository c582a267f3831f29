"""The v2 tensor codec: one tensor's JSON or binary form to numpy, named arrays to a reply.

The KServe v2 inference protocol (Triton's HTTP API) describes a tensor by
``name``, ``shape`` and ``datatype`` plus its elements: in JSON as ``data``
(row-major, flat or nested), or, with the binary tensor data extension, as raw
little-endian bytes after the JSON header, ``parameters.binary_data_size`` of
them. The stock ``tritonclient`` sends binary by default, so both forms are first
class, in requests and in replies.

This module knows nothing about models: it checks that a tensor is well-formed
(a known datatype, a shape of non-negative integers, exactly as many elements or
bytes as the shape needs) and leaves "does it fit this model" to
:mod:`gruserve.api.v2.model`. The request around the tensors is
:mod:`gruserve.api.v2.request`. Each fault raises
:class:`~gruserve.errors.InvalidInput` naming the field, e.g. ``inputs[1].shape``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from starlette.responses import Response

from gruserve.api import decode, encode
from gruserve.errors import InvalidInput

HEADER_LENGTH = "Inference-Header-Content-Length"
TENSOR_KEYS = frozenset({"name", "shape", "datatype", "parameters", "data"})
# Every datatype of the protocol. BF16 and BYTES are valid on the wire but no gruserve model
# takes them, so they are recognised (a clear "wrong datatype" error) and never decoded.
DATATYPES: dict[str, np.dtype[Any] | None] = {
    "BOOL": np.dtype(np.bool_),
    **{f"UINT{8 * n}": np.dtype(f"<u{n}") for n in (1, 2, 4, 8)},
    **{f"INT{8 * n}": np.dtype(f"<i{n}") for n in (1, 2, 4, 8)},
    **{f"FP{8 * n}": np.dtype(f"<f{n}") for n in (2, 4, 8)},
    "BF16": None,
    "BYTES": None,
}
_BY_DTYPE = {(d.kind, d.itemsize): name for name, d in DATATYPES.items() if d is not None}
_JSON_LEAVES: dict[str, tuple[type, ...]] = {
    "b": (bool,),
    "u": (int,),
    "i": (int,),
    "f": (int, float),
}
_LEAF_WORDS = {"b": "true or false", "u": "an integer", "i": "an integer", "f": "a number"}
MAX_RANK = 8


@dataclass(frozen=True)
class Tensor:
    """One request input: ``array`` has the declared shape and the datatype's dtype."""

    name: str
    datatype: str
    array: np.ndarray
    field: str  # where it sits in the request, ``inputs[i]``


def datatype_of(dtype: np.dtype[Any]) -> str:
    return _BY_DTYPE[(dtype.kind, dtype.itemsize)]


def json_object(value: Any, field: str, allowed: frozenset[str]) -> dict[str, Any]:
    """``value`` as a JSON object whose keys are all ``allowed``."""
    if not isinstance(value, dict):
        raise InvalidInput(field, f"expected a JSON object, got {show(value)}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise InvalidInput(
            f"{field}.{unknown[0]}", f"unknown field; expected some of {sorted(allowed)}"
        )
    return value


def show(value: Any) -> str:
    """A received value as an error message quotes it (short; NaN literals by their text)."""
    if type(value) is float and not math.isfinite(value):  # orjson would write null
        return decode.shown(value)
    try:
        text = orjson.dumps(value).decode()
    except TypeError:  # a NaN / Infinity literal, or nested past orjson's 255 levels
        text = decode.shown(value)
    return text if len(text) <= 60 else text[:57] + "..."


def decode_input(field: str, entry: Any, binary: bytes, offset: int) -> tuple[Tensor, int]:
    """One ``inputs`` entry; binary data starts at ``offset`` of ``binary``. Returns the
    tensor and where the next binary input starts."""
    entry = json_object(entry, field, TENSOR_KEYS)
    name, datatype = entry.get("name"), entry.get("datatype")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{field}.name", f"expected the input's name, got {show(name)}")
    if not isinstance(datatype, str) or datatype not in DATATYPES:  # a list: unhashable
        raise InvalidInput(
            f"{field}.datatype",
            f"input {name!r}: unknown datatype {show(datatype)}; v2 datatypes are "
            + ", ".join(DATATYPES),
        )
    dtype = DATATYPES[datatype]
    if dtype is None:
        raise InvalidInput(f"{field}.datatype", f"input {name!r}: gruserve takes no {datatype}")
    shape = _shape(entry.get("shape"), f"{field}.shape", name)
    parameters = entry.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput(f"{field}.parameters", f"expected an object, got {show(parameters)}")
    if any(key.startswith("shared_memory") for key in parameters):
        raise InvalidInput(f"{field}.parameters", "shared memory is not supported; send data")
    size = parameters.get("binary_data_size")
    if size is not None:
        if "data" in entry:
            raise InvalidInput(f"{field}.data", f"input {name!r} has both data and binary data")
        array = _from_bytes(
            f"{field}.parameters.binary_data_size", name, size, shape, dtype, binary, offset
        )
        return Tensor(name, datatype, array, field), offset + size
    if "data" not in entry:
        raise InvalidInput(f"{field}.data", f"input {name!r} has no data (nor binary_data_size)")
    array = _from_json(f"{field}.data", name, entry["data"], shape, dtype, datatype)
    return Tensor(name, datatype, array, field), offset


def _shape(value: Any, field: str, name: str) -> tuple[int, ...]:
    ok = isinstance(value, list) and len(value) <= MAX_RANK
    if not ok or any(type(d) is not int or d < 0 for d in value):
        raise InvalidInput(
            field, f"input {name!r}: expected a list of sizes >= 0, got {show(value)}"
        )
    return tuple(value)


def _from_bytes(
    field: str,
    name: str,
    size: Any,
    shape: tuple[int, ...],
    dtype: np.dtype[Any],
    binary: bytes,
    offset: int,
) -> np.ndarray:
    need = math.prod(shape) * dtype.itemsize
    if type(size) is not int or size != need:
        raise InvalidInput(
            field,
            f"input {name!r}: shape {list(shape)} of {datatype_of(dtype)} takes {need} bytes, "
            f"got binary_data_size={show(size)}",
        )
    if offset + size > len(binary):
        hint = "" if binary else f" (is the {HEADER_LENGTH} header missing?)"
        raise InvalidInput(
            "body",
            f"input {name!r} needs bytes {offset}..{offset + size} of the binary data, "
            f"but only {len(binary)} follow the JSON header{hint}",
        )
    chunk = binary[offset : offset + size]
    if dtype.kind == "b":
        raw = np.frombuffer(chunk, np.uint8)
        if (raw > 1).any():
            raise InvalidInput(field, f"input {name!r}: BOOL bytes must be 0 or 1")
        return raw.view(np.bool_).reshape(shape)
    return np.frombuffer(chunk, dtype).reshape(shape)


def _flatten(data: Any, field: str) -> tuple[list[Any], tuple[int, ...]]:
    """Row-major elements of flat or rectangular nested lists, and the nesting's shape."""
    if type(data) is not list:
        raise InvalidInput(field, f"expected a JSON array of elements, got {show(data)}")
    level, shape = data, [len(data)]
    while level and type(level[0]) is list:
        width = len(level[0])
        if any(type(row) is not list or len(row) != width for row in level):
            raise InvalidInput(field, "nested arrays must be rectangular")
        shape.append(width)
        level = [x for row in level for x in row]
    return level, tuple(shape)


def _from_json(
    field: str, name: str, data: Any, shape: tuple[int, ...], dtype: np.dtype[Any], datatype: str
) -> np.ndarray:
    flat, nested = _flatten(data, field)
    if len(nested) > 1 and nested != shape:
        raise InvalidInput(
            field,
            f"input {name!r}: nested data of shape {list(nested)}, but shape is {list(shape)}",
        )
    if len(flat) != math.prod(shape):
        raise InvalidInput(
            field,
            f"input {name!r}: shape {list(shape)} has {math.prod(shape)} elements, "
            f"data has {len(flat)}",
        )
    kind = dtype.kind
    leaves = _JSON_LEAVES[kind]
    if not set(map(type, flat)) <= set(leaves):
        i = next(i for i, v in enumerate(flat) if type(v) not in leaves)
        raise InvalidInput(
            f"{field}[{i}]",
            f"input {name!r} is {datatype}: expected {_LEAF_WORDS[kind]}, got {show(flat[i])}",
        )
    if kind == "b":
        return np.array(flat, np.bool_).reshape(shape)
    wide_type = {"u": np.uint64, "i": np.int64, "f": np.float64}[kind]
    limits = np.iinfo(dtype) if kind in "iu" else np.finfo(dtype)
    try:
        wide = np.array(flat, wide_type)
    except OverflowError:
        wide = None
    if wide is None or (wide.size and (wide.min() < limits.min or wide.max() > limits.max)):
        raise InvalidInput(field, f"input {name!r}: a value is out of range for {datatype}")
    return wide.astype(dtype).reshape(shape)


def reply(
    model: str,
    version: int,
    request_id: str | None,
    outputs: Sequence[tuple[str, np.ndarray, bool]],
    parameters: Mapping[str, Any] | None = None,
) -> Response:
    """The inference response: ``(name, array, binary)`` per output, JSON or JSON + bytes."""
    described, chunks = [], []
    for name, array, binary in outputs:
        flat = np.ascontiguousarray(array).reshape(-1)
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(array.dtype),
            "shape": list(array.shape),
        }
        if binary:
            data = flat.astype(flat.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = flat
        described.append(entry)
    head: dict[str, Any] = {"model_name": model, "model_version": str(version)}
    if request_id is not None:
        head["id"] = request_id
    if parameters:
        head["parameters"] = dict(parameters)
    head["outputs"] = described
    text = encode.dumps(head)
    if not chunks:
        return Response(text, media_type="application/json")
    return Response(
        text + b"".join(chunks),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(text))},
    )
