"""Wire models of the v1 API (pydantic): they document every body in the OpenAPI schema.

Array payloads (inputs, masks, states) are decoded by :mod:`gruserve.api.decode`,
which names the exact offending element and is shared with the NDJSON and
WebSocket transports; these models describe the same shapes for clients and
are what the tests validate every response against. Nothing below ``api/``
imports this module.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

Numbers = list[Any]
"""A nested list of numbers: rank and sizes depend on the model (see ``GET /v1/models/{model}``)."""
States = dict[str, Numbers] | list[Numbers]
"""``{state key: values}`` (canonical), or a list with one entry per state in manifest order."""
Outputs = Numbers | dict[str, Numbers]
"""The model's output array, or ``{output name: array}`` for a model with several outputs."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictRequest(_Strict):
    inputs: Numbers = Field(
        description="[batch, timesteps, features] values, or [batch, timesteps] token ids."
    )
    mask: list[list[bool]] | None = Field(
        None, description="[batch, timesteps]; false skips a timestep."
    )
    initial_state: States | None = Field(
        None, description="Per state [batch, units]; zeros when omitted."
    )
    return_state: bool = Field(False, description="Also return the final states.")


class PredictResponse(_Strict):
    model: str
    version: int
    outputs: Outputs = Field(description="[batch, timesteps, D] per timestep, else [batch, D].")
    states: dict[str, Numbers] | None = Field(
        None, description="Final states [batch, units], if asked."
    )


class CreateSessionRequest(_Strict):
    session_id: str | None = Field(
        None,
        description="Your id (1-128 of A-Z a-z 0-9 . _ : -); a random one when omitted.",
        examples=["user-42"],
    )
    initial_state: States | None = Field(None, description="Per state [units]; zeros when omitted.")


class SessionInfo(_Strict):
    session_id: str
    model: str
    version: int
    step: int = Field(description="Steps applied since creation or the last reset.")
    timesteps: int = Field(description="Timesteps applied since creation or the last reset.")
    created_at: str
    last_used_at: str
    expires_at: str = Field(description="When the session expires unless used again (idle TTL).")
    states: dict[str, list[float]] | None = Field(None, description="With ?include_state=true.")


class StepRequest(_Strict):
    inputs: Numbers = Field(
        description="[timesteps, features], or [features] for one timestep; "
        "token ids: [timesteps] or one id.",
        examples=[[[0.1, 0.2, 0.3, 0.4]]],
    )
    mask: list[bool] | None = Field(
        None, description="[timesteps]; false leaves the state unchanged."
    )


class StepResponse(_Strict):
    outputs: Outputs = Field(
        description="[timesteps, D] ([D] for a one-timestep request without a time "
        "axis, or a model with one output per sequence)."
    )
    step: int = Field(description="Steps applied so far, this one included.")


class ResetRequest(_Strict):
    states: States | None = Field(
        None, description="New states per key, [units]; zeros when omitted."
    )


class ModelSummary(_Strict):
    name: str
    version: int | None
    provider: str | None = Field(description="cpu or cuda: where onnxruntime runs it.")
    ready: bool
    error: str | None = Field(description="Why it failed to load, if it did.")


class ModelList(_Strict):
    models: list[ModelSummary]


class ModelDescription(_Strict):
    model_config = ConfigDict(extra="allow")
    name: str
    version: int
    provider: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    features: int | None
    vocabulary: int | None
    states: list[dict[str, Any]]
    layers: list[dict[str, Any]] = Field(
        description="Keras class, config and export strategy per layer."
    )


class ErrorDetail(_Strict):
    type: str = Field(examples=["InvalidInput"])
    message: str
    field: str | None = Field(None, examples=["inputs[2][1]"])


class ErrorResponse(_Strict):
    error: ErrorDetail


def request_body(model: type[BaseModel], media_type: str = "application/json") -> dict[str, Any]:
    """``openapi_extra`` documenting a body that the route decodes itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {media_type: {"schema": model.model_json_schema()}},
        }
    }


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        404: "Unknown model or session.",
        409: "Session id taken, or concurrent update.",
        413: "Too many bytes or timesteps.",
        422: "Invalid value; `field` names it.",
        503: "Session store unreachable or model not loaded.",
    }.items()
}
