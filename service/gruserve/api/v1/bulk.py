"""Bulk steps: many sessions of one model stepped by one request or one WebSocket message.

``POST /v1/models/{model}/steps`` takes JSON or, with ``Content-Type:
application/x-gruserve-steps``, the binary form (both in :mod:`gruserve.api.v1.bulk_codec`),
and answers 200 with one result per step in request order, in the form it was sent.
``/v1/models/{model}/ws`` takes the same requests as messages (text: JSON, binary: the
binary form) and answers each with a message of the same kind; a message that fails as a
whole is answered with the usual error object (text, with ``"status"``) and the
connection stays open. An unknown model answers 404 (the WebSocket: the error, then
close code 4404).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gruserve.api import encode
from gruserve.api._auth import caller_of
from gruserve.api._request_id import HEADER, REQUEST_ID
from gruserve.api.errors import count_answered, counted_error
from gruserve.api.protocols._disconnect import DisconnectWatch, unless_disconnected
from gruserve.api.protocols._edge import SETTING
from gruserve.api.v1 import bulk_codec
from gruserve.api.v1 import schemas as s
from gruserve.api.v1.fast_step import _body
from gruserve.api.v1.ws import CLOSE_NOT_FOUND
from gruserve.errors import GruServeError, PayloadTooLarge
from gruserve.metrics import Metrics
from gruserve.services import Services
from gruserve.sessions.bulk import BlockAnswer, step_bulk
from gruserve.sessions.owner import Caller

router = APIRouter(prefix="/v1", responses=s.ERRORS)
_JSON = b"application/json"
_BINARY = bulk_codec.MEDIA_TYPE.encode()

_BINARY_SCHEMA = {"type": "string", "format": "binary", "description": bulk_codec.__doc__}
_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": s.BulkStepsRequest.model_json_schema()},
            bulk_codec.MEDIA_TYPE: {"schema": _BINARY_SCHEMA},
        },
    },
    "responses": {"200": {"content": {bulk_codec.MEDIA_TYPE: {"schema": _BINARY_SCHEMA}}}},
}


async def _run(
    services: Services, model: str, data: bytes | str, binary: bool, caller: Caller
) -> tuple[bulk_codec.BulkRequest, list[Any], BlockAnswer | None]:
    """Decode a bulk request, apply its steps; whole-request faults raise."""
    features = services.registry.get(model).signature.features
    limit = services.settings.max_bulk_steps
    decoded = (
        bulk_codec.binary_request(data, features, limit, model)  # type: ignore[arg-type]
        if binary
        else bulk_codec.json_request(data, limit, model)
    )
    outcomes, answer = await step_bulk(
        services.sessions, model, decoded.steps, caller, decoded.block
    )
    count_answered(services.metrics, outcomes)
    return decoded, outcomes, answer


def _binary_reply(decoded: bulk_codec.BulkRequest, outcomes: list[Any], answer: Any) -> bytes:
    return bulk_codec.binary_reply(decoded.ids, outcomes, decoded.block, answer)


@router.post(
    "/models/{model}/steps",
    response_model=s.BulkStepsResponse,
    tags=["sessions"],
    openapi_extra=_OPENAPI,
)
async def bulk_steps(model: str, request: Request) -> Response:
    """Step many sessions of ``model`` at once; one result per step, in request order.

    Each step is what ``POST /v1/sessions/{id}/step`` would do with it (limits and
    exactly-once numbers included); a failing step is that step's ``error`` and the
    others still apply. Steps of one session apply in request order. JSON, or the
    binary form with ``Content-Type: application/x-gruserve-steps`` (answered in kind).
    The same requests go as messages over the WebSocket ``/v1/models/{model}/ws`` (text:
    JSON, binary: the binary form), answered one by one in arrival order.
    """
    services: Services = request.app.state.services
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    binary = media == bulk_codec.MEDIA_TYPE
    decoded, outcomes, answer = await unless_disconnected(
        request, _run(services, model, await request.body(), binary, caller_of(request.scope))
    )
    if binary:
        reply = _binary_reply(decoded, outcomes, answer)
        return Response(reply, media_type=bulk_codec.MEDIA_TYPE)
    return Response(bulk_codec.json_reply(decoded.ids, outcomes), media_type="application/json")


class BulkEndpoint:
    """ASGI app answering ``POST /v1/models/{model}/steps`` (``scope["path_params"]``) without
    the framework's layers: :class:`~gruserve.api.v1.hot_paths.HotPaths` sends it the requests
    it matches, inside the edge and the API-key check, as it does single steps.

    A bulk request's own work is a few microseconds per step; FastAPI's layers around it
    (error handling, telemetry, a body limit, routing) were about a fifth of the server's
    time on it (bench/README.md). The reply and every error are those of :func:`bulk_steps`
    (the route stays declared for OpenAPI and for paths this does not match).

    Args:
        services: the services the route calls.
    """

    def __init__(self, services: Services) -> None:
        self.services = services
        self.disconnects = DisconnectWatch()
        self.taken = 0
        """Requests answered here (tests check that this path is the one taken)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.taken += 1
        media = _JSON
        for name, value in scope["headers"]:
            if name == b"content-type":
                media = value.partition(b";")[0].strip().lower()
                break
        binary = media == _BINARY
        kind = _BINARY if binary else _JSON
        try:
            body = await _body(receive)
            model, caller = scope["path_params"]["model"], caller_of(scope)
            decoded, outcomes, answer = await self.disconnects.run(
                receive, _run(self.services, model, body, binary, caller)
            )
            status = 200
            if binary:
                content = _binary_reply(decoded, outcomes, answer)
            else:
                content = bulk_codec.json_reply(decoded.ids, outcomes)
        except Exception as exc:  # every error gets the one JSON shape, as in api/errors.py
            status, payload = counted_error(exc, self.services.metrics)
            content, kind = encode.dumps(payload), _JSON
        headers = [(b"content-length", b"%d" % len(content)), (b"content-type", kind)]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})


def _error_text(exc: GruServeError, metrics: Metrics) -> str:
    status, body = counted_error(exc, metrics)
    body["error"]["status"] = status
    return encode.dumps(body).decode()


@router.websocket("/models/{model}/ws")
async def bulk_socket(websocket: WebSocket, model: str) -> None:
    """Bulk steps as WebSocket messages, answered one by one in arrival order."""
    services: Services = websocket.app.state.services
    limit = services.settings.max_request_bytes
    await websocket.accept(headers=[(HEADER, REQUEST_ID.get().encode())])
    try:
        services.registry.get(model)
    except GruServeError as exc:
        await websocket.send_text(_error_text(exc, services.metrics))
        await websocket.close(CLOSE_NOT_FOUND, "model not found")
        return
    while True:
        message = await websocket.receive()
        if message["type"] != "websocket.receive":
            return
        data: bytes | None = message.get("bytes")
        binary = data is not None
        payload: bytes | str = data if data is not None else (message.get("text") or "")
        try:
            if len(payload) > limit:
                raise PayloadTooLarge("a WebSocket message (bytes)", len(payload), limit, SETTING)
            decoded, outcomes, answer = await _run(
                services, model, payload, binary, caller_of(websocket.scope)
            )
        except GruServeError as exc:
            await websocket.send_text(_error_text(exc, services.metrics))
            continue
        try:
            if binary:
                await websocket.send_bytes(_binary_reply(decoded, outcomes, answer))
            else:
                await websocket.send_text(bulk_codec.json_reply(decoded.ids, outcomes).decode())
        except WebSocketDisconnect:  # the client left before its reply: nobody to answer
            return
