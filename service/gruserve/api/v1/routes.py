"""REST routes of API v1: models, stateless predict, sessions.

Each route reads and decodes its body, makes one call into the core, and
encodes the reply; errors are raised and turned into responses by
``api/errors.py``. Bodies with arrays are decoded by :mod:`gruserve.api.decode`
(documented in OpenAPI by the models in :mod:`gruserve.api.v1.schemas`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from gruserve.api import decode, encode
from gruserve.api._auth import caller_of
from gruserve.api.protocols._disconnect import unless_disconnected
from gruserve.api.v1 import schemas as s
from gruserve.errors import InvalidInput
from gruserve.services import Services
from gruserve.sessions import upgrade
from gruserve.sessions.owner import Caller
from gruserve.sessions.store import MAX_PAGE, SessionRecord

router = APIRouter(prefix="/v1", responses=s.ERRORS)


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _info(
    services: Services,
    record: SessionRecord,
    caller: Caller,
    states: dict[str, Any] | None = None,
) -> dict[str, Any]:
    settings = services.settings
    return encode.session(
        record,
        settings.session_ttl_s,
        states,
        settings.session_max_lifetime_s,
        caller.shown(record.session_id, record.owner),
    )


# -- models --------------------------------------------------------------------------------
@router.get("/models", response_model=s.ModelList, tags=["models"])
async def list_models(request: Request) -> Response:
    """Every model folder: loaded (with its provider) or failed (with the reason)."""
    statuses = _services(request).registry.statuses()
    return encode.json_response({"models": [encode.model_status(st) for st in statuses]})


@router.get("/models/{model}", response_model=s.ModelDescription, tags=["models"])
async def describe_model(model: str, request: Request) -> Response:
    """Inputs, outputs, states (units), layers with their Keras options, provider."""
    loaded = _services(request).registry.get(model)
    return encode.json_response({**loaded.signature.describe(), "provider": loaded.provider})


@router.post(
    "/models/{model}/predict",
    response_model=s.PredictResponse,
    tags=["models"],
    openapi_extra=s.request_body(s.PredictRequest),
)
async def predict(model: str, request: Request) -> Response:
    """Stateless: run whole sequences, optionally from given initial states."""
    body = decode.json_object(await request.body(), s.PredictRequest.model_fields)
    if "inputs" not in body:
        raise InvalidInput(
            "inputs", "required: [batch, timesteps, features] values or [batch, timesteps] ids"
        )
    return_state = body.get("return_state", False)
    if not isinstance(return_state, bool):
        raise InvalidInput(
            "return_state", f"expected true or false, got {decode.shown(return_state)}"
        )
    predictor, states = _services(request).predictor, None if return_state else ()
    batch, timesteps = decode.leading_sizes(body["inputs"])
    predictor.admit(model, batch, timesteps, states=states)  # before building any array
    inputs = decode.numbers(body["inputs"], "inputs")
    mask = None if body.get("mask") is None else decode.booleans(body["mask"], "mask")
    initial = (
        None
        if body.get("initial_state") is None
        else decode.states(body["initial_state"], "initial_state")
    )
    work = predictor.predict(model, inputs, mask, initial, states=states)
    result = await unless_disconnected(request, work)
    reply = {
        "model": result.model,
        "version": result.version,
        "outputs": encode.outputs(result.outputs),
    }
    if return_state:
        reply["states"] = result.states
    return encode.json_response(reply)


# -- sessions ------------------------------------------------------------------------------
@router.post(
    "/models/{model}/sessions",
    status_code=201,
    response_model=s.SessionInfo,
    tags=["sessions"],
    openapi_extra=s.request_body(s.CreateSessionRequest),
)
async def create_session(model: str, request: Request) -> Response:
    """Start a session (Keras ``stateful=True`` with an explicit id); 409 if the id exists
    (a resend of this create before the session's first step gets 201 and the same body).

    ``version`` pins the model version the session runs on for its whole life (the model's
    default version when omitted; a version on disk that is not loaded is loaded first)."""
    body = decode.json_object(await request.body(), s.CreateSessionRequest.model_fields)
    initial = body.get("initial_state")
    services = _services(request)
    record = await services.sessions.create(
        model,
        body.get("session_id"),
        None if initial is None else decode.states(initial, "initial_state"),
        caller_of(request.scope),
        version=body.get("version"),
    )
    return encode.json_response(_info(services, record, caller_of(request.scope)), status=201)


@router.post(
    "/sessions/{session_id}/step",
    response_model=s.StepResponse,
    tags=["sessions"],
    openapi_extra=s.request_body(s.StepRequest),
)
async def step(session_id: str, request: Request) -> Response:
    """Apply timesteps; the state advances exactly as a Keras stateful layer across calls.

    With ``"step": n`` (the steps already applied) the step is applied exactly once:
    resending the same ``n`` returns the same reply without applying it again, and any
    other ``n`` than the session's step count (or that count minus one) answers 409
    ``StepOutOfOrder`` with the session's ``current_step``.
    """
    inputs, mask, number, life = decode.step_message(await request.body())
    result = await unless_disconnected(
        request,
        _services(request).sessions.step(
            session_id, inputs, mask, number, caller_of(request.scope), lifecycle=life
        ),
    )
    return encode.json_response(encode.step(result))


@router.post(
    "/sessions/{session_id}/reset",
    response_model=s.SessionInfo,
    tags=["sessions"],
    openapi_extra=s.request_body(s.ResetRequest),
)
async def reset_session(session_id: str, request: Request) -> Response:
    """Zero the states, or set them (tf-keras ``reset_states(states=...)``); counters restart."""
    body = decode.json_object(await request.body(), s.ResetRequest.model_fields)
    states = None if body.get("states") is None else decode.states(body["states"], "states")
    services = _services(request)
    record = await services.sessions.reset(session_id, states, caller_of(request.scope))
    return encode.json_response(_info(services, record, caller_of(request.scope)))


@router.post(
    "/sessions/{session_id}/upgrade",
    response_model=s.UpgradeResponse,
    tags=["sessions"],
    openapi_extra=s.request_body(s.UpgradeRequest),
)
async def upgrade_session(session_id: str, request: Request) -> Response:
    """Move the session to another version of its model (the default one when ``version``
    is omitted), at the new version's zero state, or warmed by replaying its last
    ``replay`` inputs; the step count continues."""
    body = decode.json_object(await request.body(), s.UpgradeRequest.model_fields)
    services, caller = _services(request), caller_of(request.scope)
    moved = await upgrade.upgrade(
        services.sessions, session_id, body.get("version"), body.get("replay"), caller
    )
    record = moved.record
    return encode.json_response(
        {
            "session_id": caller.shown(record.session_id, record.owner),
            "model": record.model,
            "old_version": moved.old_version,
            "version": record.version,
            "step": record.step,
            "replayed": moved.replayed,
        }
    )


@router.get("/sessions", response_model=s.SessionList, tags=["sessions"])
async def list_sessions(
    request: Request,
    limit: int = Query(100, ge=1, le=MAX_PAGE, description="Most sessions in this page."),
    cursor: str | None = Query(
        None, description="`next_cursor` of the previous page; omit for the first page."
    ),
    model: str | None = Query(None, description="Only sessions of this model."),
) -> Response:
    """Every session, in session id order, a page at a time (for operators; never states).

    Follow ``next_cursor`` until it is null; a page may hold fewer than ``limit``
    sessions (with ``model``, even none) before the end. A tenant lists its own sessions;
    an admin lists every tenant's, each by the id it addresses it with (``acme~station-7``
    for tenant ``acme``'s ``station-7``, ``~id`` for the unnamed tenant's). Paging is
    stable: sessions created or deleted meanwhile never make a page repeat or skip the others.
    """
    services = _services(request)
    found = await services.sessions.page(cursor, limit, model, caller_of(request.scope))
    settings = services.settings
    return encode.json_response(
        encode.page(found, settings.session_ttl_s, settings.session_max_lifetime_s)
    )


@router.get("/sessions/{session_id}", response_model=s.SessionInfo, tags=["sessions"])
async def get_session(
    session_id: str,
    request: Request,
    include_state: bool = Query(False, description="Also return the states."),
) -> Response:
    """Model, step count, timestamps; the states with ``?include_state=true``."""
    services = _services(request)
    record = await services.sessions.get(session_id, caller_of(request.scope))
    if include_state:
        await services.sessions.model_for(record)  # loaded, if its version is on disk only
    states = services.sessions.states_of(record) if include_state else None
    return encode.json_response(_info(services, record, caller_of(request.scope), states))


@router.delete("/sessions/{session_id}", status_code=204, tags=["sessions"])
async def delete_session(session_id: str, request: Request) -> Response:
    """Forget a session and its state."""
    await _services(request).sessions.delete(session_id, caller_of(request.scope))
    return Response(status_code=204)
