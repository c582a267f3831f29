"""WebSocket steps: every message on ``/v1/sessions/{id}/ws`` is one step of that session.

- text message: a JSON step body (``"step": n`` for exactly-once, as on REST), answered
  with ``{"outputs": ..., "step": n}``;
- binary message: raw little-endian float32 values, (T x F) row-major (int64 ids for a
  token model), answered with the outputs' raw float32 bytes (every output in order,
  each (T x D), or (D) for a one-output-per-sequence model).

Binary frames carry step numbers when the client asks for the ``gruserve-step``
subprotocol (``Sec-WebSocket-Protocol: gruserve-step``): every binary message then
starts with 8 bytes, the step number as a little-endian u64 (2**64 - 1: none, applied
at least once), and every binary reply starts with 8 bytes too, the steps applied
after it (the ``"step"`` of a JSON reply). Text messages are the same either way.

Each connection is logged at info when it opens and when it closes (with the session,
the request id, how it ended and how long it lasted).

Messages are applied in the order they arrive. A bad message is answered with
the usual error object (as text, plus ``"status"``; a ``StepOutOfOrder`` error has
``"current_step"``) and the connection stays open; a session that disappears closes
it with code 4404.

This is the leanest path in the server, so it is a plain ASGI app that
:class:`~gruserve.api.v1.hot_paths.HotPaths` hands WebSocket connections to before the
framework's layers: no pydantic, numpy views over the received bytes, one orjson
call per JSON reply.
"""

from __future__ import annotations

import logging
import struct
import time
from functools import partial
from typing import Any
from urllib.parse import parse_qs

from starlette.types import Receive, Scope, Send

from gruserve.api import decode, encode
from gruserve.api._auth import caller_of
from gruserve.api._request_id import HEADER, REQUEST_ID
from gruserve.api.errors import counted_error
from gruserve.api.protocols._edge import SETTING
from gruserve.errors import (
    GruServeError,
    InvalidInput,
    PayloadTooLarge,
    SessionModelMismatch,
    SessionNotFound,
)
from gruserve.metrics import Metrics
from gruserve.services import Services
from gruserve.sessions.owner import ANYONE, Caller
from gruserve.sessions.service import SessionService

log = logging.getLogger(__name__)
CLOSE_NOT_FOUND = 4404
SUBPROTOCOL = "gruserve-step"
NUMBER = struct.Struct("<Q")
NO_NUMBER = 2**64 - 1


def _error(exc: GruServeError, metrics: Metrics) -> dict[str, Any]:
    status, body = counted_error(exc, metrics)
    body["error"]["status"] = status
    return {"type": "websocket.send", "text": encode.dumps(body).decode()}


class SessionSockets:
    """ASGI app serving WebSocket connections to sessions (``scope["path_params"]``)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        counted = services.metrics.ws_messages
        self._binary, self._text = counted.labels("binary"), counted.labels("text")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        session_id: str = scope["path_params"]["session_id"]
        request_id, opened = REQUEST_ID.get(), time.monotonic()
        log.info(
            "WebSocket open: session %s (request %s)",
            session_id,
            request_id,
            extra={"request_id": request_id},
        )
        ended = "the server stopped it"
        try:
            ended = await self._serve(scope, receive, send, session_id)
        finally:
            log.info(
                "WebSocket closed: session %s (request %s), %s, after %.1f s",
                session_id,
                request_id,
                ended,
                time.monotonic() - opened,
                extra={"request_id": request_id},
            )

    async def _serve(self, scope: Scope, receive: Receive, send: Send, session_id: str) -> str:
        """Answer the connection's messages; returns how it ended, for the log."""
        caller = caller_of(scope)
        sessions, limit = self.services.sessions, self.services.settings.max_request_bytes
        numbered = SUBPROTOCOL in scope.get("subprotocols", ())
        await send(
            {
                "type": "websocket.accept",
                "subprotocol": SUBPROTOCOL if numbered else None,
                "headers": [(HEADER, REQUEST_ID.get().encode())],
            }
        )
        try:
            features = await _features(sessions, session_id, caller, scope)
        except GruServeError as exc:
            await send(_error(exc, self.services.metrics))
            await send(
                {"type": "websocket.close", "code": CLOSE_NOT_FOUND, "reason": "session not found"}
            )
            return f"closed {CLOSE_NOT_FOUND} (no such session)"
        step = sessions.step if caller is ANYONE else partial(sessions.step, caller=caller)
        binary_count, text_count = self._binary, self._text
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                return f"client closed {message.get('code', 1005)}"
            data = message.get("bytes")
            try:
                if data is not None:
                    if len(data) > limit:
                        raise PayloadTooLarge(
                            "a WebSocket message (bytes)", len(data), limit, SETTING
                        )
                    if numbered:
                        number, data = _numbered(data)
                        inputs = decode.float32_bytes(data, features)
                        result = await step(session_id, inputs, None, number)
                        reply = encode.numbered_outputs_bytes(result)
                    else:
                        result = await step(session_id, decode.float32_bytes(data, features), None)
                        reply = encode.outputs_bytes(result)
                    await send({"type": "websocket.send", "bytes": reply})
                    binary_count.inc()
                else:
                    text = message.get("text") or ""
                    if len(text) > limit:
                        raise PayloadTooLarge(
                            "a WebSocket message (bytes)", len(text), limit, SETTING
                        )
                    inputs, mask, number, life = decode.step_message(text)
                    result = await step(session_id, inputs, mask, number, lifecycle=life)
                    await send(
                        {
                            "type": "websocket.send",
                            "text": encode.dumps(encode.step(result)).decode(),
                        }
                    )
                    text_count.inc()
            except (SessionNotFound, SessionModelMismatch) as exc:
                await send(_error(exc, self.services.metrics))
                await send(
                    {
                        "type": "websocket.close",
                        "code": CLOSE_NOT_FOUND,
                        "reason": "session not found",
                    }
                )
                return f"closed {CLOSE_NOT_FOUND} ({type(exc).__name__})"
            except GruServeError as exc:
                await send(_error(exc, self.services.metrics))


async def _features(
    sessions: SessionService, session_id: str, caller: Caller, scope: Scope
) -> int | None:
    """The input features of the session's model; a socket opened with ``?model=NAME`` may
    name a session that does not exist yet (its messages create it: ``"create"``)."""
    try:
        record = await sessions.get(session_id, caller)
        return (await sessions.model_for(record)).signature.features
    except SessionNotFound:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if "model" not in query:
            raise
        return sessions.registry.get(query["model"][-1]).signature.features


def _numbered(data: bytes) -> tuple[int | None, bytes]:
    """A ``gruserve-step`` binary message: its step number (None: none) and the values."""
    if len(data) < NUMBER.size:
        raise InvalidInput(
            "message",
            f"{len(data)} bytes: a {SUBPROTOCOL} binary message starts with an 8-byte step number",
        )
    (number,) = NUMBER.unpack_from(data)
    if number == NO_NUMBER:
        return None, data[NUMBER.size :]
    return decode.step_number(number), data[NUMBER.size :]
