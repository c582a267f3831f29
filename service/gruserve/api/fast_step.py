"""``POST /v1/sessions/{id}/step`` without the framework: the hot REST route, in two forms.

The FastAPI route in :mod:`gruserve.api.v1` stays declared, so OpenAPI documents
it, but a step request is answered by one of these first:

- :class:`DirectStep`, under ``gruserve serve``: the HTTP protocol
  (:mod:`gruserve.api._http11`) hands it the parsed request and writes the reply
  it returns, with no ASGI cycle, task-per-message ``receive``/``send`` or middleware
  in between. It takes only requests the edge and the API-key check would pass
  through unchanged (a ``Content-Length`` within the byte limit, a valid key if keys
  are set); anything else (a chunked body, an oversized or missing key...) goes the
  ASGI way below, where those layers answer it.
- :class:`StepEndpoint`, as plain ASGI, for every other server
  (``uvicorn --factory``, the ASGI test transport): :class:`~gruserve.api.hot_paths.HotPaths`
  sends matching requests to it inside :class:`~gruserve.api._edge.EdgeMiddleware` and
  the API-key check.

Both answer with :meth:`StepEndpoint.answer`: :func:`gruserve.api.decode.step_message`
for the body (step number included), one
:meth:`~gruserve.sessions.service.SessionService.step` call, :func:`gruserve.api.encode.step`
for the reply, :func:`gruserve.api.errors.error_payload` for every error (counted like
the exception handlers count them); a client that disconnects has its step cancelled.
Request ids and HTTP metrics are the edge's own pieces (measured in ``bench/README.md``).
"""

from __future__ import annotations

import re
import time
from functools import partial

from starlette.types import Message, Receive, Scope, Send

from gruserve.api import decode, encode
from gruserve.api._auth import ApiKeys, caller_of
from gruserve.api._disconnect import DisconnectWatch, Watch
from gruserve.api._edge import HttpMetrics, scan_headers
from gruserve.api._request_id import HEADER, REQUEST_ID, chosen
from gruserve.api.errors import ClientDisconnected, error_payload
from gruserve.metrics import Metrics
from gruserve.sessions.owner import ANYONE, Caller
from gruserve.sessions.service import SessionService

_JSON = b"application/json"
# the raw path: an id with escapes (%) or non-ASCII bytes is left to the ASGI route
_STEP = re.compile(rb"/v1/sessions/([^/%\x80-\xff]+)/step")


Reply = tuple[int, list[tuple[bytes, bytes]], bytes]
"""``(status, headers, body)`` of an answer given to the HTTP protocol directly."""


class StepEndpoint:
    """ASGI app answering ``POST /v1/sessions/{session_id}/step`` (``scope["path_params"]``).

    Args:
        sessions: the session service the route calls.
        metrics: collectors; errors are counted by type as ``api/errors.py`` counts them.
    """

    def __init__(self, sessions: SessionService, metrics: Metrics) -> None:
        self.sessions, self.metrics = sessions, metrics
        self.disconnects = DisconnectWatch()
        self.taken = 0
        """Requests answered here (tests check that this path is the one taken)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.taken += 1
        try:
            body = await _body(receive)
        except Exception as exc:
            status, content = self.failed(exc)
        else:
            session_id = scope["path_params"]["session_id"]
            status, content = await self.answer(
                session_id, body, partial(self.disconnects.run, receive), caller_of(scope)
            )
        await send({"type": "http.response.start", "status": status, "headers": _headers(content)})
        await send({"type": "http.response.body", "body": content})

    async def answer(
        self, session_id: str, body: bytes, watch: Watch, caller: Caller = ANYONE
    ) -> tuple[int, bytes]:
        """``(status, JSON body)`` of one step for ``caller``; ``watch`` awaits the step,
        raising :class:`~gruserve.api.errors.ClientDisconnected` if the client leaves first."""
        try:
            inputs, mask, number, life = decode.step_message(body)
            result = await watch(
                self.sessions.step(session_id, inputs, mask, number, caller, lifecycle=life)
            )
            return 200, encode.dumps(encode.step(result))
        except Exception as exc:  # every error gets the one JSON shape, as in api/errors.py
            return self.failed(exc)

    def failed(self, exc: Exception) -> tuple[int, bytes]:
        status, payload = error_payload(exc)
        self.metrics.errors.labels(payload["error"]["type"]).inc()
        return status, encode.dumps(payload)


class DirectStep:
    """The step route, answered by the HTTP protocol (``app.direct_routes``, see
    :class:`~gruserve.api._http11.DirectRoutes`).

    Args:
        endpoint: the ASGI form, whose :meth:`~StepEndpoint.answer` this shares.
        route: the declared route's template, the ``route`` label of the HTTP metrics.
        max_bytes: the edge's body limit: larger bodies are left to the edge to refuse.
        keys: the API keys, if any: requests without a valid one are left to the check.
    """

    def __init__(
        self, endpoint: StepEndpoint, route: str, max_bytes: int, keys: ApiKeys | None
    ) -> None:
        self.endpoint, self.route, self.max_bytes, self.keys = endpoint, route, max_bytes, keys
        self.http = HttpMetrics(endpoint.metrics)
        self.taken = 0
        """Requests answered here (tests check that this path is the one taken)."""

    def match(
        self, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]]
    ) -> tuple[str, bytes | None, Caller] | None:
        """``(session id, X-Request-ID or None, caller)`` if this is a step request the edge
        and the key check would let by, else None."""
        if method != b"POST":
            return None
        found = _STEP.fullmatch(path)
        if found is None:
            return None
        length, chunked, received_id = scan_headers(headers)
        if length is None or chunked or length > self.max_bytes:
            return None
        caller = ANYONE
        if self.keys is not None:
            identified = self.keys.identify(headers)
            if not isinstance(identified, Caller):
                return None
            caller = identified
        return found[1].decode("ascii"), received_id, caller

    async def answer(
        self, matched: tuple[str, bytes | None, Caller], body: bytes, watch: Watch
    ) -> Reply:
        """The reply to a matched request, with the request id the edge would give it."""
        self.taken += 1
        started = time.perf_counter()
        session_id, received_id, caller = matched
        request_id = chosen(received_id)
        token = REQUEST_ID.set(request_id.decode())
        status = 500
        try:
            status, content = await self.endpoint.answer(session_id, body, watch, caller)
        finally:
            REQUEST_ID.reset(token)
            self.http.count("POST", self.route, status, time.perf_counter() - started)
        return status, [*_headers(content), (HEADER, request_id)], content


def _headers(content: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-length", b"%d" % len(content)), (b"content-type", _JSON)]


async def _body(receive: Receive) -> bytes:
    """The whole request body (the edge's byte limit applies inside ``receive``)."""
    message: Message = await receive()
    if message["type"] != "http.request":
        raise ClientDisconnected
    body = message.get("body", b"")
    if not message.get("more_body", False):
        return body  # type: ignore[no-any-return]
    parts = [body]
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnected
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)
