"""``POST /v1/sessions/{id}/step`` without the framework: the hot REST route, in two forms.

Creating and deleting a session (``POST /v1/models/{model}/sessions``,
``DELETE /v1/sessions/{id}``) take the same path: a short-lived session costs a create,
a step and a delete, and the create and the delete must cost no more than the step.

The FastAPI routes in :mod:`gruserve.api.v1.routes` stay declared, so OpenAPI documents
them, but these requests are answered by one of these first:

- :class:`DirectStep`, under ``gruserve serve``: the HTTP protocol
  (:mod:`gruserve.api.protocols._http11`) hands it the parsed request and writes the reply
  it returns, with no ASGI cycle, task-per-message ``receive``/``send`` or middleware
  in between. It takes only requests the edge and the API-key check would pass
  through unchanged (a ``Content-Length`` within the byte limit, a valid key if keys
  are set); anything else (a chunked body, an oversized or missing key...) goes the
  ASGI way below, where those layers answer it.
- :class:`StepEndpoint`, as plain ASGI, for every other server
  (``uvicorn --factory``, the ASGI test transport): :class:`~gruserve.api.v1.hot_paths.HotPaths`
  sends matching requests to it inside :class:`~gruserve.api.protocols._edge.EdgeMiddleware` and
  the API-key check.

Both answer with :meth:`StepEndpoint.answer`: :func:`gruserve.api.decode.step_message`
for the body (step number included), one
:meth:`~gruserve.sessions.service.SessionService.step` call, :func:`gruserve.api.encode.step`
for the reply, :func:`gruserve.api.errors.counted_error` for every error (answered and counted as
the exception handlers do); a client that disconnects has its step cancelled.
Request ids and HTTP metrics are the edge's own pieces (measured in ``bench/README.md``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable
from functools import partial

from starlette.types import Message, Receive, Scope, Send

from gruserve.api import decode, encode
from gruserve.api._auth import ApiKeys, caller_of
from gruserve.api._request_id import HEADER, REQUEST_ID, chosen
from gruserve.api.errors import ClientDisconnected, counted_error
from gruserve.api.protocols._disconnect import DisconnectWatch, Watch
from gruserve.api.protocols._edge import HttpMetrics, scan_headers
from gruserve.metrics import Metrics
from gruserve.sessions.owner import ANYONE, Caller
from gruserve.sessions.service import SessionService
from gruserve.settings import Settings

_JSON = b"application/json"
# the raw path: an id with escapes (%) or non-ASCII bytes is left to the ASGI route
_STEP = re.compile(rb"/v1/sessions/([^/%\x80-\xff]+)/step")
_CREATE = re.compile(rb"/v1/models/([^/%\x80-\xff]+)/sessions")
_SESSION = re.compile(rb"/v1/sessions/([^/%\x80-\xff]+)")
STEP, CREATE, DELETE = "step", "create", "delete"
"""What a matched request does (``matched[0]``)."""
CREATE_FIELDS = frozenset({"session_id", "initial_state", "version"})
_METHODS = {STEP: "POST", CREATE: "POST", DELETE: "DELETE"}


Reply = tuple[int, list[tuple[bytes, bytes]], bytes]
"""``(status, headers, body)`` of an answer given to the HTTP protocol directly."""


class StepEndpoint:
    """ASGI app answering ``POST /v1/sessions/{session_id}/step`` (``scope["path_params"]``).

    Also answers ``POST /v1/models/{model}/sessions`` (``path_params["model"]``) and
    ``DELETE /v1/sessions/{session_id}``.

    Args:
        sessions: the session service the route calls.
        metrics: collectors; errors are counted by type as ``api/errors.py`` counts them.
        settings: the server's settings (a created session's reply shows its expiry), or
            None: defaults.
    """

    def __init__(
        self, sessions: SessionService, metrics: Metrics, settings: Settings | None = None
    ) -> None:
        self.sessions, self.metrics = sessions, metrics
        self.settings = settings if settings is not None else Settings(_env_file=None)
        self.disconnects = DisconnectWatch()
        self.taken = 0
        """Steps answered here (tests check that this path is the one taken)."""
        self.lifecycle_taken = 0
        """Creates and deletes answered here."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = scope["path_params"]
        kind = CREATE if "model" in params else DELETE if scope["method"] == "DELETE" else STEP
        if kind == STEP:
            self.taken += 1
        else:
            self.lifecycle_taken += 1
        try:
            body = await _body(receive)
        except Exception as exc:
            status, content = self.failed(exc)
        else:
            status, content = await self.dispatch(
                kind,
                params.get("model") or params["session_id"],
                body,
                partial(self.disconnects.run, receive),
                caller_of(scope),
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

    def dispatch(
        self, kind: str, key: str, body: bytes, watch: Watch, caller: Caller = ANYONE
    ) -> Awaitable[tuple[int, bytes]]:
        """The answer to a ``kind`` request; ``key``: the session id, or the model to create
        a session of."""
        if kind == STEP:
            return self.answer(key, body, watch, caller)
        if kind == CREATE:
            return self.create(key, body, caller)
        return self.delete(key, caller)

    async def create(self, model: str, body: bytes, caller: Caller = ANYONE) -> tuple[int, bytes]:
        """``(201, the session's JSON)``, as the FastAPI route answers."""
        try:
            fields = decode.json_object(body, CREATE_FIELDS)
            initial = fields.get("initial_state")
            record = await self.sessions.create(
                model,
                fields.get("session_id"),
                None if initial is None else decode.states(initial, "initial_state"),
                caller,
                version=fields.get("version"),
            )
            settings = self.settings
            info = encode.session(
                record,
                settings.session_ttl_s,
                None,
                settings.session_max_lifetime_s,
                caller.shown(record.session_id, record.owner),
            )
            return 201, encode.dumps(info)
        except Exception as exc:
            return self.failed(exc)

    async def delete(self, session_id: str, caller: Caller = ANYONE) -> tuple[int, bytes]:
        """``(204, no body)``."""
        try:
            await self.sessions.delete(session_id, caller)
            return 204, b""
        except Exception as exc:
            return self.failed(exc)

    def failed(self, exc: Exception) -> tuple[int, bytes]:
        status, payload = counted_error(exc, self.metrics)
        return status, encode.dumps(payload)


class DirectStep:
    """The step route, answered by the HTTP protocol (``app.direct_routes``, see
    :class:`~gruserve.api.protocols._http11.DirectRoutes`).

    Args:
        endpoint: the ASGI form, whose :meth:`~StepEndpoint.dispatch` this shares.
        route: the declared step route's template, the ``route`` label of the HTTP metrics
            (creates and deletes: their own routes' templates).
        max_bytes: the edge's body limit: larger bodies are left to the edge to refuse.
        keys: the API keys, if any: requests without a valid one are left to the check.
    """

    def __init__(
        self, endpoint: StepEndpoint, route: str, max_bytes: int, keys: ApiKeys | None
    ) -> None:
        self.endpoint, self.route, self.max_bytes, self.keys = endpoint, route, max_bytes, keys
        self.routes = {
            STEP: route,
            CREATE: "/v1/models/{model}/sessions",
            DELETE: "/v1/sessions/{session_id}",
        }
        self.http = HttpMetrics(endpoint.metrics)
        self.taken = 0
        """Steps answered here (tests check that this path is the one taken)."""
        self.lifecycle_taken = 0
        """Creates and deletes answered here."""

    def match(
        self, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]]
    ) -> tuple[str, str, bytes | None, Caller] | None:
        """``(kind, session id or model, X-Request-ID or None, caller)`` if this is a step,
        create or delete request the edge and the key check would let by, else None."""
        if method == b"POST":
            found = _STEP.fullmatch(path)
            kind = STEP
            if found is None:
                found, kind = _CREATE.fullmatch(path), CREATE
        elif method == b"DELETE":
            found, kind = _SESSION.fullmatch(path), DELETE
        else:
            return None
        if found is None:
            return None
        length, chunked, received_id = scan_headers(headers)
        if chunked or (length is None and kind != DELETE) or (length or 0) > self.max_bytes:
            return None
        caller = ANYONE
        if self.keys is not None:
            identified = self.keys.identify(headers)
            if not isinstance(identified, Caller):
                return None
            caller = identified
        return kind, found[1].decode("ascii"), received_id, caller

    async def answer(
        self, matched: tuple[str, str, bytes | None, Caller], body: bytes, watch: Watch
    ) -> Reply:
        """The reply to a matched request, with the request id the edge would give it."""
        started = time.perf_counter()
        kind, key, received_id, caller = matched
        if kind == STEP:
            self.taken += 1
        else:
            self.lifecycle_taken += 1
        request_id = chosen(received_id)
        token = REQUEST_ID.set(request_id.decode())
        status = 500
        try:
            status, content = await self.endpoint.dispatch(kind, key, body, watch, caller)
        finally:
            REQUEST_ID.reset(token)
            self.http.count(
                _METHODS[kind], self.routes[kind], status, time.perf_counter() - started
            )
        return status, [*_headers(content), (HEADER, request_id)], content


def _headers(content: bytes) -> list[tuple[bytes, bytes]]:
    if not content:  # 204: no body, no type
        return [(b"content-length", b"0")]
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
