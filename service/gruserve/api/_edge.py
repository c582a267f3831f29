"""Pure-ASGI middleware at the very edge: request size limit and HTTP metrics.

The byte limit is enforced while the body is being received, before anything
parses it: a ``Content-Length`` above the limit is answered 413 at once, and a
chunked body that grows past it raises :class:`~gruserve.errors.PayloadTooLarge`
from inside ``receive`` (a body with an acceptable ``Content-Length`` cannot grow:
the server reads exactly that many bytes, so its ``receive`` is passed through
unwrapped). NDJSON streams are exempt as a whole (each line is limited by the
stream route instead).

This runs on every request, so the labelled metric children are looked up once
per (method, route, status) and kept, instead of calling ``labels()`` each time.
"""

from __future__ import annotations

import re
import time
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gruserve.api.errors import error_payload, json_error, shaped_for
from gruserve.errors import PayloadTooLarge
from gruserve.metrics import Metrics

SETTING = "GRUSERVE_MAX_REQUEST_BYTES"


class EdgeMiddleware:
    """Args: app; max_bytes: body limit; metrics; unbounded: paths whose body is a stream."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, metrics: Metrics, unbounded: re.Pattern[str]
    ) -> None:
        self.app, self.max_bytes, self.metrics, self.unbounded = app, max_bytes, metrics, unbounded
        self._requests: dict[tuple[str, str, int], Counter] = {}
        self._seconds: dict[str, Histogram] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.unbounded.match(scope["path"]):
                await self.app(scope, receive, send_status)
                return
            length, chunked = _declared_length(scope["headers"])
            if length is not None and length > self.max_bytes:
                error = PayloadTooLarge("the request body (bytes)", length, self.max_bytes, SETTING)
                code, body = error_payload(error)
                body = shaped_for(scope["path"], body)  # /v2 answers in the protocol's shape
                await json_error(code, body, {"connection": "close"})(scope, receive, send_status)
                return
            if length is None or chunked:
                receive = self._limited(receive)
            await self.app(scope, receive, send_status)
        finally:
            self._count(scope, status, time.perf_counter() - started)

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

    def _count(self, scope: Scope, status: int, seconds: float) -> None:
        route: Any = scope.get("route")
        name = getattr(route, "path", "unmatched")
        key = (scope["method"], name, status)
        requests = self._requests.get(key)
        if requests is None:
            requests = self._requests[key] = self.metrics.http_requests.labels(
                key[0], name, str(status)
            )
        timer = self._seconds.get(name)
        if timer is None:
            timer = self._seconds[name] = self.metrics.http_seconds.labels(name)
        requests.inc()
        timer.observe(seconds)


def _declared_length(headers: list[tuple[bytes, bytes]]) -> tuple[int | None, bool]:
    """``(Content-Length or None, whether Transfer-Encoding is set)`` from raw ASGI headers."""
    length, chunked = None, False
    for name, value in headers:
        if name == b"content-length" and value.isdigit():
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = True
    return length, chunked
