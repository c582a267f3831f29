"""A v2 inference request body: framing, the request object, and its requested outputs.

The body is JSON, or, with the binary tensor data extension, a JSON header
followed by the binary inputs' bytes; the ``Inference-Header-Content-Length``
HTTP header then gives the JSON part's length. tritonclient may also gzip or
deflate the whole body (``Content-Encoding``). :func:`parse` undoes the framing,
checks the request object (``id``, ``parameters``, ``inputs``, ``outputs``) and
has :mod:`gruserve.api.v2.tensors` decode each input, so that every body byte is
accounted for: a byte count that does not add up is an error, never a guess.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

from gruserve.api import decode
from gruserve.api.v2.tensors import HEADER_LENGTH, Tensor, decode_input, json_object, show
from gruserve.errors import InvalidInput, PayloadTooLarge

REQUEST_KEYS = frozenset({"id", "parameters", "inputs", "outputs"})


@dataclass(frozen=True)
class RequestedOutput:
    """An entry of ``outputs``; ``binary`` None follows the request's ``binary_data_output``."""

    name: str
    binary: bool | None


@dataclass(frozen=True)
class InferRequest:
    """A parsed request: decoded inputs, requested outputs, request-level parameters."""

    id: str | None
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None  # None: every output of the model
    parameters: dict[str, Any]


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding: gzip | deflate`` (tritonclient's request compression).

    The inflated size is bounded by ``limit`` too, so a small compressed body cannot
    expand past the request size limit.
    """
    if not encoding or encoding.strip().lower() == "identity":
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding.strip().lower())
    if wbits is None:
        raise InvalidInput("Content-Encoding", f"expected gzip or deflate, got {encoding!r}")
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput("body", f"cannot inflate the {encoding} body: {exc}") from None
    if len(data) > limit:
        raise PayloadTooLarge(
            "the inflated request body (bytes)", len(data), limit, "GRUSERVE_MAX_REQUEST_BYTES"
        )
    if not inflater.eof:  # zlib hands back what it has of a cut-off stream without a word
        raise InvalidInput("body", f"the {encoding} body is truncated")
    return data


def split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary section that follows it."""
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()):
        raise InvalidInput(HEADER_LENGTH, f"expected a length in bytes, got {header_length!r}")
    length = int(text) if len(text) <= 19 else len(body) + 1  # int() refuses huge strings
    if length > len(body):
        raise InvalidInput(
            HEADER_LENGTH, f"{text} is more than the {len(body)} bytes of the request body"
        )
    return body[:length], body[length:]


def parse(body: bytes, header_length: str | None) -> InferRequest:
    """A v2 inference request, tensors decoded and sized against their shapes."""
    header, binary = split(body, header_length)
    if not header:
        raise InvalidInput("body", 'expected a JSON object {"inputs": [...]}, got nothing')
    request = json_object(decode.loads(header), "body", REQUEST_KEYS)
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("id", f"expected a string, got {show(request_id)}")
    parameters = request.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidInput("parameters", f"expected a JSON object, got {show(parameters)}")
    entries = request.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise InvalidInput("inputs", "required: a non-empty list of input tensors")
    tensors: list[Tensor] = []
    offset = 0
    for i, entry in enumerate(entries):
        tensor, offset = decode_input(f"inputs[{i}]", entry, binary, offset)
        if any(t.name == tensor.name for t in tensors):
            raise InvalidInput(f"inputs[{i}].name", f"input {tensor.name!r} is given twice")
        tensors.append(tensor)
    if offset != len(binary):
        raise InvalidInput(
            "body",
            f"{len(binary)} bytes follow the JSON header, but the inputs' binary_data_size "
            f"add up to {offset}",
        )
    return InferRequest(request_id, tensors, _outputs(request.get("outputs")), parameters)


def _outputs(value: Any) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidInput("outputs", f"expected a list of outputs, got {show(value)}")
    requested: list[RequestedOutput] = []
    for i, entry in enumerate(value):
        field = f"outputs[{i}]"
        entry = json_object(entry, field, frozenset({"name", "parameters"}))
        name, parameters = entry.get("name"), entry.get("parameters") or {}
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"{field}.name", f"expected an output name, got {show(name)}")
        if not isinstance(parameters, dict):
            raise InvalidInput(f"{field}.parameters", f"expected an object, got {show(parameters)}")
        if any(k.startswith("shared_memory") or k == "classification" for k in parameters):
            raise InvalidInput(
                f"{field}.parameters", "classification and shared memory are not supported"
            )
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise InvalidInput(
                f"{field}.parameters.binary_data", f"expected true or false, got {show(binary)}"
            )
        if any(r.name == name for r in requested):
            raise InvalidInput(f"{field}.name", f"output {name!r} is requested twice")
        requested.append(RequestedOutput(name, binary))
    return requested
