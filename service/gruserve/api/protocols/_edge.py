"""Pure-ASGI middleware at the very edge: request ids, request size limit, HTTP metrics.

Outermost of gruserve's middleware on both ways in (:mod:`gruserve.api.app`): around
FastAPI's routes, and around the per-step REST and WebSocket handlers that
:mod:`gruserve.api.v1.hot_paths` dispatches before the framework, with the API-key check
inside it in both. So every request is covered:

- request ids (:mod:`gruserve.api._request_id`): every HTTP response carries the
  request's ``X-Request-ID``; a WebSocket handshake gets one from
  :class:`~gruserve.api.v1.ws.SessionSockets`, which reads it from
  :data:`~gruserve.api._request_id.REQUEST_ID`, set here for both;
- the byte limit is enforced while the body is being received, before anything
  parses it: a ``Content-Length`` above the limit is answered 413 at once, and a
  chunked body that grows past it raises :class:`~gruserve.errors.PayloadTooLarge`
  from inside ``receive`` (a body with an acceptable ``Content-Length`` cannot grow:
  the server reads exactly that many bytes, so its ``receive`` is passed through
  unwrapped). NDJSON streams are exempt as a whole (each line is limited by the
  stream route instead);
- HTTP metrics, for every answer including the 401/403 of missing or wrong API keys.

WebSocket connections are passed on with their ``receive`` and ``send`` untouched, so
their messages pay for no wrapper. This runs on every request, so the labelled metric
children are looked up once per (method, route, status) and kept (:class:`HttpMetrics`),
instead of calling ``labels()`` each time.

The step route answered by the HTTP protocol itself (:class:`gruserve.api.v1.fast_step.DirectStep`)
takes only requests this layer would pass through unchanged (a ``Content-Length`` within
the limit), and uses the same pieces: :func:`scan_headers`, the request id and
:class:`HttpMetrics`.
"""

from __future__ import annotations

import re
import time
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gruserve.api._request_id import HEADER, REQUEST_ID, chosen
from gruserve.api.errors import counted_error, json_error, shaped_for
from gruserve.errors import PayloadTooLarge
from gruserve.metrics import Metrics

SETTING = "GRUSERVE_MAX_REQUEST_BYTES"


class EdgeMiddleware:
    """Args: app; max_bytes: body limit; metrics; unbounded: paths whose body is a stream."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, metrics: Metrics, unbounded: re.Pattern[str]
    ) -> None:
        self.app, self.max_bytes, self.metrics, self.unbounded = app, max_bytes, metrics, unbounded
        self.http = HttpMetrics(metrics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "websocket":
                REQUEST_ID.set(chosen(_header(scope["headers"], HEADER)).decode())
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0
        length, chunked, received_id = scan_headers(scope["headers"])
        request_id = chosen(received_id)
        token = REQUEST_ID.set(request_id.decode())

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (HEADER, request_id)]
            await send(message)

        try:
            if self.unbounded.fullmatch(scope["path"]):
                pass
            elif length is not None and length > self.max_bytes:
                error = PayloadTooLarge("the request body (bytes)", length, self.max_bytes, SETTING)
                await self._answer(error, scope, receive, send_status, {"connection": "close"})
                return
            elif length is None or chunked:
                receive = self._limited(receive)
            await self.app(scope, receive, send_status)
        except Exception as exc:  # a bug below: answered here, so it carries the request id
            if status:
                raise
            await self._answer(exc, scope, receive, send_status)
        finally:
            REQUEST_ID.reset(token)
            route: Any = scope.get("route")
            self.http.count(
                scope["method"],
                getattr(route, "path", "unmatched"),
                status or 500,
                time.perf_counter() - started,
            )

    async def _answer(
        self,
        exc: Exception,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[str, str] | None = None,
    ) -> None:
        code, body = counted_error(exc, self.metrics)  # logs an unexpected one, with its id
        body = shaped_for(scope["path"], body)  # /v2 answers in the protocol's shape
        await json_error(code, body, headers)(scope, receive, send)

    def _limited(self, receive: Receive) -> Receive:
        """``receive`` raising PayloadTooLarge once the body passes the limit."""
        limit, received = self.max_bytes, 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge("the request body (bytes)", received, limit, SETTING)
            return message

        return limited


class HttpMetrics:
    """``gruserve_http_requests_total`` and ``gruserve_http_request_seconds``, one update each
    per request, with the labelled children looked up once per (method, route, status)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._requests: dict[tuple[str, str, int], Counter] = {}
        self._seconds: dict[str, Histogram] = {}

    def count(self, method: str, route: str, status: int, seconds: float) -> None:
        """One answered request; ``route`` is the route's template (``"unmatched"``: none)."""
        key = (method, route, status)
        requests = self._requests.get(key)
        if requests is None:
            requests = self._requests[key] = self.metrics.http_requests.labels(
                method, route, str(status)
            )
        timer = self._seconds.get(route)
        if timer is None:
            timer = self._seconds[route] = self.metrics.http_seconds.labels(route)
        requests.inc()
        timer.observe(seconds)


def scan_headers(headers: list[tuple[bytes, bytes]]) -> tuple[int | None, bool, bytes | None]:
    """``(Content-Length or None, whether Transfer-Encoding is set, X-Request-ID or None)``
    from raw ASGI headers, in one pass."""
    length, chunked, request_id = None, False, None
    for name, value in headers:
        if name == b"content-length" and value.isdigit():
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = True
        elif name == HEADER:
            request_id = value
    return length, chunked, request_id


def _header(headers: list[tuple[bytes, bytes]], wanted: bytes) -> bytes | None:
    for name, value in headers:
        if name == wanted:
            return value
    return None
