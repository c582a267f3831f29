"""Pure-ASGI middleware at the very edge: request size limit and HTTP metrics.

The byte limit is enforced while the body is being received, before anything
parses it: a ``Content-Length`` above the limit is answered 413 at once, and a
chunked body that grows past it raises :class:`~gruserve.errors.PayloadTooLarge`
from inside ``receive``. NDJSON streams are exempt as a whole (each line is
limited by the stream route instead).
"""

from __future__ import annotations

import re
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gruserve.api.errors import error_payload, json_error
from gruserve.errors import PayloadTooLarge
from gruserve.metrics import Metrics

SETTING = "GRUSERVE_MAX_REQUEST_BYTES"


class EdgeMiddleware:
    """Args: app; max_bytes: body limit; metrics; unbounded: paths whose body is a stream."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, metrics: Metrics, unbounded: re.Pattern[str]
    ) -> None:
        self.app, self.max_bytes, self.metrics, self.unbounded = app, max_bytes, metrics, unbounded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]
        limit = self.max_bytes

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.unbounded.match(scope["path"]):
                await self.app(scope, receive, send_status)
                return
            for name, value in scope["headers"]:
                if name == b"content-length" and value.isdigit() and int(value) > limit:
                    code, body = error_payload(
                        PayloadTooLarge("the request body (bytes)", int(value), limit, SETTING)
                    )
                    await json_error(code, body, {"connection": "close"})(
                        scope, receive, send_status
                    )
                    return
            received = 0

            async def limited() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise PayloadTooLarge("the request body (bytes)", received, limit, SETTING)
                return message

            await self.app(scope, limited, send_status)
        finally:
            route: Any = scope.get("route")
            name = getattr(route, "path", "unmatched")
            self.metrics.http_requests.labels(scope["method"], name, str(status[0])).inc()
            self.metrics.http_seconds.labels(name).observe(time.perf_counter() - started)
