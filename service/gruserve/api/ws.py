"""WebSocket steps: every message on ``/v1/sessions/{id}/ws`` is one step of that session.

- text message: a JSON step body, answered with ``{"outputs": ..., "step": n}``;
- binary message: raw little-endian float32 values, (T x F) row-major (int64
  ids for a token model), answered with the outputs' raw float32 bytes
  (every output in order, each (T x D), or (D) for a one-output-per-sequence model).

Messages are applied in the order they arrive. A bad message is answered with
the usual error object (as text, plus ``"status"``) and the connection stays
open; a session that disappears closes it with code 4404.

This is the leanest path in the server, so it is a plain ASGI app that
:class:`SocketDispatch` hands WebSocket connections to before the framework's
per-message wrappers (which only matter for HTTP responses): no pydantic,
numpy views over the received bytes, one orjson call per JSON reply.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from gruserve.api import decode, encode
from gruserve.api._edge import SETTING
from gruserve.api.errors import error_payload
from gruserve.errors import GruServeError, PayloadTooLarge, SessionModelMismatch, SessionNotFound
from gruserve.services import Services

PATH = re.compile(r"^/v1/sessions/(?P<session_id>[^/]+)/ws$")
CLOSE_NOT_FOUND = 4404


def _error(exc: GruServeError) -> dict[str, Any]:
    status, body = error_payload(exc)
    body["error"]["status"] = status
    return {"type": "websocket.send", "text": encode.dumps(body).decode()}


class SessionSockets:
    """The ASGI app of one WebSocket connection to a session."""

    def __init__(self, services: Services) -> None:
        self.services = services
        counted = services.metrics.ws_messages
        self._binary, self._text = counted.labels("binary"), counted.labels("text")

    async def __call__(self, scope: Scope, receive: Receive, send: Send, session_id: str) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        sessions, limit = self.services.sessions, self.services.settings.max_request_bytes
        await send({"type": "websocket.accept"})
        try:
            features = sessions.model_of(await sessions.get(session_id)).signature.features
        except GruServeError as exc:
            await send(_error(exc))
            await send(
                {"type": "websocket.close", "code": CLOSE_NOT_FOUND, "reason": "session not found"}
            )
            return
        step, binary_count, text_count = sessions.step, self._binary, self._text
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                return
            data = message.get("bytes")
            try:
                if data is not None:
                    if len(data) > limit:
                        raise PayloadTooLarge(
                            "a WebSocket message (bytes)", len(data), limit, SETTING
                        )
                    result = await step(session_id, decode.float32_bytes(data, features), None)
                    await send({"type": "websocket.send", "bytes": encode.outputs_bytes(result)})
                    binary_count.inc()
                else:
                    text = message.get("text") or ""
                    if len(text) > limit:
                        raise PayloadTooLarge(
                            "a WebSocket message (bytes)", len(text), limit, SETTING
                        )
                    inputs, mask = decode.step_message(text)
                    result = await step(session_id, inputs, mask)
                    await send(
                        {
                            "type": "websocket.send",
                            "text": encode.dumps(encode.step(result)).decode(),
                        }
                    )
                    text_count.inc()
            except (SessionNotFound, SessionModelMismatch) as exc:
                await send(_error(exc))
                await send(
                    {
                        "type": "websocket.close",
                        "code": CLOSE_NOT_FOUND,
                        "reason": "session not found",
                    }
                )
                return
            except GruServeError as exc:
                await send(_error(exc))


class SocketDispatch:
    """Middleware: WebSockets to ``/v1/sessions/{id}/ws`` go straight to :class:`SessionSockets`."""

    def __init__(self, app: ASGIApp, sockets: SessionSockets) -> None:
        self.app, self.sockets = app, sockets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            match = PATH.match(scope["path"])
            if match is not None:
                await self.sockets(scope, receive, send, match["session_id"])
                return
        await self.app(scope, receive, send)
