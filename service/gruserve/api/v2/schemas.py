"""Wire models of the v2 (KServe / Triton) routes, for the OpenAPI schema and the tests.

The routes decode bodies themselves (:mod:`gruserve.api.v2.tensors`), because an
inference request may be a JSON header followed by raw tensor bytes; these
models describe the JSON parts. Nothing below ``api/`` imports this module.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gruserve.api.v2.tensors import HEADER_LENGTH


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerMetadata(_Wire):
    name: str = Field(examples=["gruserve"])
    version: str
    extensions: list[str] = Field(
        examples=[["binary_tensor_data", "model_configuration", "sequence", "sequence(string_id)"]]
    )


class Live(_Wire):
    live: bool


class Ready(_Wire):
    ready: bool


class ModelReady(_Wire):
    name: str
    ready: bool


class MetadataTensor(_Wire):
    name: str
    datatype: str = Field(examples=["FP32"])
    shape: list[int] = Field(description="-1: any size.", examples=[[-1, -1, 3]])


class ModelMetadata(_Wire):
    name: str
    versions: list[str]
    platform: str = Field(examples=["onnxruntime_onnx"])
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class ModelConfig(BaseModel):
    """Triton's ``ModelConfig`` as JSON (only the main fields are described)."""

    model_config = ConfigDict(extra="allow")
    name: str
    platform: str
    max_batch_size: int
    input: list[dict[str, Any]]
    output: list[dict[str, Any]]
    sequence_batching: dict[str, Any] = Field(
        description="Declares the model stateful; `state` lists its implicit states."
    )


class RequestInput(_Wire):
    name: str = Field(examples=["inputs"])
    shape: list[int] = Field(examples=[[1, 2, 3]])
    datatype: str = Field(examples=["FP32"])
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data_size`: this tensor's bytes in the binary section."
    )
    data: list[Any] | None = Field(
        None,
        description="Row-major elements, flat or nested; omit with `binary_data_size`.",
        examples=[[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]],
    )


class RequestOutput(_Wire):
    name: str = Field(examples=["outputs"])
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data`: return this output as raw bytes."
    )


class InferRequest(_Wire):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None,
        description="`sequence_id` (uint64 or string; 0 = stateless), `sequence_start`, "
        "`sequence_end`, `sequence_step` (exactly-once: the steps of the sequence already "
        "applied, the previous reply's `step`), `binary_data_output`.",
        examples=[{"sequence_id": 42, "sequence_start": True}],
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = Field(
        None, description="Defaults to every model output; `final_state/<key>` only by name."
    )


class ResponseOutput(_Wire):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(_Wire):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="For a sequence: `sequence_id`, `session_id` (v1's id), `step`."
    )
    outputs: list[ResponseOutput]


class V2ErrorResponse(_Wire):
    """The KServe v2 error body: one message string (the v1 body is an object)."""

    error: str


INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            "JSON, or (binary tensor data extension) the JSON header followed by raw "
            f"little-endian tensor bytes, with the header's length in `{HEADER_LENGTH}`."
        ),
        "content": {
            "application/json": {"schema": InferRequest.model_json_schema()},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "parameters": [
        {
            "name": HEADER_LENGTH,
            "in": "header",
            "required": False,
            "schema": {"type": "integer", "minimum": 0},
            "description": "Length of the JSON header when binary tensor data follows it.",
        }
    ],
}

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": V2ErrorResponse, "description": text}
    for code, text in {
        401: "API key required (the server has keys).",
        403: "The API key is not valid.",
        404: "Unknown model, version, or sequence (not started / ended / expired).",
        409: "Concurrent update of a sequence, or `sequence_step` out of order.",
        413: "Too many bytes or timesteps.",
        422: "Malformed request or tensor (name, datatype, shape, byte count).",
        503: "Session store unreachable, full or refusing writes, or model not loaded.",
    }.items()
}
