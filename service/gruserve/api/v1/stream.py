"""NDJSON streaming of session steps: one request line in, one reply line out, as it happens.

The request body is read incrementally; every complete line is a step body
(``{"inputs": ..., "mask"?: ..., "step"?: n}``; ``step`` makes it exactly-once)
applied in order, and its reply line (``{"outputs": ..., "step": n}``) is sent at
once, before the next line is read. The first failing line is answered with an
error line (the usual error object plus ``"line"``, counting from 1) and ends the
stream, so a sequence is never applied with a step missing. Each line is limited
to ``max_request_bytes``; the stream as a whole is not.

Starlette's ``StreamingResponse`` cannot be used: it reads ``receive`` itself
to watch for disconnects, which would steal the request body this route
consumes while it answers.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gruserve.api import decode, encode
from gruserve.api._auth import caller_of
from gruserve.api.errors import counted_error
from gruserve.api.protocols._edge import SETTING
from gruserve.api.v1 import schemas as s
from gruserve.errors import GruServeError, PayloadTooLarge
from gruserve.metrics import Metrics
from gruserve.sessions.owner import ANYONE, Caller
from gruserve.sessions.service import SessionService

router = APIRouter(prefix="/v1", responses=s.ERRORS)
MEDIA_TYPE = "application/x-ndjson"


class StepStream(Response):
    """An ASGI response that consumes the NDJSON request body while it answers."""

    media_type = MEDIA_TYPE

    def __init__(
        self,
        sessions: SessionService,
        session_id: str,
        max_line_bytes: int,
        caller: Caller = ANYONE,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(status_code=200, media_type=MEDIA_TYPE)
        self._sessions, self._session_id, self._limit = sessions, session_id, max_line_bytes
        self._caller, self._metrics = caller, metrics
        self._line = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # no content-length: the server sends the body chunked, as it is produced
        headers = [(b"content-type", MEDIA_TYPE.encode()), (b"cache-control", b"no-store")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        buffer = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            buffer += message.get("body", b"")
            more = message.get("more_body", False)
            while (end := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:end])
                del buffer[: end + 1]
                if not await self._answer(line, send):
                    return await self._finish(send)
            if len(buffer) > self._limit:
                self._line += 1  # the line still being received is the one at fault
                error = PayloadTooLarge("an NDJSON line (bytes)", len(buffer), self._limit, SETTING)
                await self._send_error(error, send)
                return await self._finish(send)
        if buffer.strip():
            await self._answer(bytes(buffer), send)
        await self._finish(send)

    async def _answer(self, line: bytes, send: Send) -> bool:
        if not line.strip():
            return True
        self._line += 1
        try:
            if len(line) > self._limit:
                raise PayloadTooLarge("an NDJSON line (bytes)", len(line), self._limit, SETTING)
            inputs, mask, number, life = decode.step_message(line)
            result = await self._sessions.step(
                self._session_id, inputs, mask, number, self._caller, lifecycle=life
            )
        except GruServeError as exc:
            await self._send_error(exc, send)
            return False
        await send(
            {
                "type": "http.response.body",
                "body": encode.dumps(encode.step(result)) + b"\n",
                "more_body": True,
            }
        )
        return True

    async def _send_error(self, exc: GruServeError, send: Send) -> None:
        status, body = counted_error(exc, self._metrics)
        body["error"]["status"] = status
        body["line"] = self._line
        await send(
            {"type": "http.response.body", "body": encode.dumps(body) + b"\n", "more_body": True}
        )

    @staticmethod
    async def _finish(send: Send) -> None:
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@router.post(
    "/sessions/{session_id}/stream",
    tags=["sessions"],
    response_class=Response,
    openapi_extra=s.request_body(s.StepRequest, MEDIA_TYPE),
    responses={
        200: {
            "content": {MEDIA_TYPE: {"schema": s.StepResponse.model_json_schema()}},
            "description": "One StepResponse (or error) line per request line.",
        }
    },
)
async def stream_steps(session_id: str, request: Request) -> Response:
    """Steps as NDJSON lines in, replies as NDJSON lines out, each flushed when computed.

    With ``?model=NAME`` the session need not exist yet: its lines may create it
    (``"create"``) and end it (``"end"``)."""
    services = request.app.state.services
    caller = caller_of(request.scope)
    model = request.query_params.get("model")
    if model is None:  # a 404 now, before the 200 stream starts
        await services.sessions.get(session_id, caller)
    else:
        services.registry.get(model)
    return StepStream(
        services.sessions,
        session_id,
        services.settings.max_request_bytes,
        caller,
        services.metrics,
    )
