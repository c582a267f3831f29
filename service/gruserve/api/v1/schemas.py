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
Outputs = Numbers | dict[str, Numbers]
"""The model's output array, or ``{output name: array}`` for a model with several outputs."""
# Request arrays, by rank: sizes depend on the model (features, units, vocabulary).
StepInputs = list[list[float]] | list[float] | float
"""[timesteps, features], [features] (one timestep), [timesteps] ids or one id."""
BatchInputs = list[list[list[float]]] | list[list[int]]
"""[batch, timesteps, features] values, or [batch, timesteps] token ids."""
States = dict[str, list[float]] | list[list[float]] | list[float]
"""Per state [units]: ``{state key: values}`` (canonical), a list in manifest order, or the
values of a one-state model."""
BatchStates = dict[str, list[list[float]]] | list[list[list[float]]] | list[list[float]]
"""Per state [batch, units], keyed or listed as :data:`States`."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictRequest(_Strict):
    inputs: BatchInputs = Field(
        description="[batch, timesteps, features] values, or [batch, timesteps] token ids.",
        examples=[[[[0.5, -0.1, 0.2], [0.3, 0.0, -0.4]]], [[1, 2, 3]]],
    )
    mask: list[list[bool]] | None = Field(
        None, description="[batch, timesteps]; false skips a timestep."
    )
    initial_state: BatchStates | None = Field(
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
    version: int | None = Field(
        None,
        description="The model version the session runs on for its whole life; the model's "
        "default version when omitted.",
    )


class SessionInfo(_Strict):
    session_id: str
    tenant: str = Field(
        description='The API key name that owns the session ("" without named keys). '
        "An admin addresses another tenant's session as `{tenant}~{session_id}`."
    )
    model: str
    version: int
    step: int = Field(description="Steps applied since creation or the last reset.")
    timesteps: int = Field(description="Timesteps applied since creation or the last reset.")
    created_at: str
    last_used_at: str
    expires_at: str = Field(
        description="When the session expires unless used again (idle TTL), or at the end "
        "of its maximum lifetime if that comes first."
    )
    states: dict[str, list[float]] | None = Field(None, description="With ?include_state=true.")


class StepRequest(_Strict):
    inputs: StepInputs = Field(
        description="[timesteps, features], or [features] for one timestep; "
        "token ids: [timesteps] or one id.",
        examples=[[[40.5], [60.1]]],
    )
    mask: list[bool] | None = Field(
        None, description="[timesteps]; false leaves the state unchanged."
    )
    step: int | None = Field(
        None,
        ge=0,
        lt=2**63,
        description="Exactly-once: the steps already applied (the previous reply's `step`). "
        "Resending the same value returns the same reply without applying it again; "
        "another value answers 409 StepOutOfOrder. Omit for at-least-once.",
        examples=[0],
    )
    create: dict[str, Any] | None = Field(
        None,
        description='`{"model": name, "initial_state"?: states}`: create the session first if '
        "it does not exist (your session on this model: an ordinary step; a taken id: 409 "
        "SessionExists).",
        examples=[{"model": "demo"}],
    )
    end: bool | dict[str, bool] | None = Field(
        None,
        description='`true`, or `{"return_state": true}` to get its final `states`: delete '
        "the session after this step (the reply still has its outputs).",
    )


class StepResponse(_Strict):
    outputs: Outputs = Field(
        description="[timesteps, D] ([D] for a one-timestep request without a time "
        "axis, or a model with one output per sequence)."
    )
    step: int = Field(description="Steps applied so far, this one included.")
    states: dict[str, list[float]] | None = Field(
        None, description='Per state [units]: the state an `"end"` step ended in, if asked.'
    )
    version: int = Field(description="The model version that computed this step.")


class SessionSummary(_Strict):
    session_id: str
    tenant: str = Field(
        description='The API key name that owns the session ("" without named keys). '
        "An admin addresses another tenant's session as `{tenant}~{session_id}`."
    )
    model: str
    version: int
    step: int
    timesteps: int
    created_at: str
    last_used_at: str
    expires_at: str


class SessionList(_Strict):
    sessions: list[SessionSummary] = Field(description="In session id order.")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )


class ResetRequest(_Strict):
    states: States | None = Field(
        None, description="New states per key, [units]; zeros when omitted."
    )


class UpgradeRequest(_Strict):
    version: int | None = Field(
        None, ge=1, description="The version to move to; the model's default when omitted."
    )
    replay: int | None = Field(
        None,
        ge=0,
        description="Start from the state the new version computes over the session's last "
        "this many inputs (kept when GRUSERVE_SESSION_HISTORY is at least this); zero state "
        "when omitted or 0.",
    )


class UpgradeResponse(_Strict):
    session_id: str
    model: str
    old_version: int
    version: int = Field(description="The version the session is on now.")
    step: int = Field(description="Steps applied so far (an upgrade does not change it).")
    replayed: int = Field(description="Timesteps the new version ran over to make the state.")


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
    current_step: int | None = Field(
        None, description="StepOutOfOrder only: the steps the session has applied."
    )


class ErrorResponse(_Strict):
    error: ErrorDetail


class BulkStep(_Strict):
    session_id: str = Field(description="A session of the model in the URL.")
    inputs: StepInputs = Field(description="As `inputs` of a single step.")
    mask: list[bool] | None = Field(None, description="As `mask` of a single step.")
    step: int | None = Field(
        None, ge=0, lt=2**63, description="As `step` of a single step (exactly-once)."
    )
    create: bool | dict[str, Any] | None = Field(
        None,
        description="Create the session on the URL's model if it does not exist: `true`, or "
        '`{"initial_state": ...}`.',
    )
    end: bool | dict[str, bool] | None = Field(None, description="As `end` of a single step.")


class BulkStepsRequest(_Strict):
    steps: list[BulkStep] = Field(
        description="Steps of any sessions of this model (at most GRUSERVE_MAX_BULK_STEPS); "
        "steps of one session apply in this order."
    )


class BulkError(ErrorDetail):
    status: int = Field(description="The status a single step would have answered.")


class BulkResult(_Strict):
    session_id: str | None = Field(description="As sent (null if it was not a string).")
    outputs: Outputs | None = Field(None, description="As a single step's reply.")
    step: int | None = Field(None, description="Steps applied so far, this one included.")
    version: int | None = Field(None, description="The model version that computed this step.")
    error: BulkError | None = Field(None, description="Instead of outputs: why this step failed.")
    states: dict[str, list[float]] | None = Field(
        None, description='As `states` of a single step (an `"end"` step that asked for it).'
    )


class BulkStepsResponse(_Strict):
    results: list[BulkResult] = Field(description="One per step, in request order.")


def request_body(model: type[BaseModel], media_type: str = "application/json") -> dict[str, Any]:
    """``openapi_extra`` documenting a body that the route decodes itself.

    The body is marked required only when ``model`` has a required field: a route whose
    fields are all optional accepts no body at all (``json_object`` reads it as ``{}``).
    """
    return {
        "requestBody": {
            "required": any(field.is_required() for field in model.model_fields.values()),
            "content": {media_type: {"schema": model.model_json_schema()}},
        }
    }


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        401: "API key required (the server has keys): `Authorization: Bearer` or `X-API-Key`.",
        403: "The API key is not valid.",
        404: "Unknown model or session.",
        409: "Session id taken, concurrent update, or a step number out of order "
        "(`StepOutOfOrder`, with `current_step`).",
        413: "Too many bytes or timesteps.",
        422: "Invalid value; `field` names it.",
        429: "The session limit is reached (`GRUSERVE_SESSION_EVICTION=reject`).",
        503: "Session store unreachable, full or refusing writes, or model not loaded.",
    }.items()
}
