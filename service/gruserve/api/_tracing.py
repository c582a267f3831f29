"""One OpenTelemetry server span per HTTP request (installed only when tracing is on).

The span continues the caller's W3C ``traceparent``/``tracestate`` and is current while
the request is answered, so the spans of its store calls and queue wait are its
children (:mod:`gruserve._otel`). Its name is ``{method} {route template}`` once the
router has matched; it records the status and the ``X-Request-ID`` answered.
WebSocket connections pass through untraced.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_CARRIED = (b"traceparent", b"tracestate")


class TracingMiddleware:
    """ASGI middleware: a server span around each HTTP request.

    Args:
        app: the rest of the stack.
        tracing: a :class:`gruserve._otel.Tracing`.
    """

    def __init__(self, app: ASGIApp, tracing: Any) -> None:
        self.app, self.tracer = app, tracing.tracer
        self.propagator = TraceContextTextMapPropagator()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in _CARRIED
        }
        method = scope["method"]
        answered: dict[str, Any] = {"status": 500}

        async def send_noting(message: Message) -> None:
            if message["type"] == "http.response.start":
                answered["status"] = message["status"]
                for name, value in message.get("headers", ()):
                    if name == b"x-request-id":
                        answered["request_id"] = value.decode("latin-1")
            await send(message)

        with self.tracer.start_as_current_span(
            method,
            context=self.propagator.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"]},
        ) as span:
            try:
                await self.app(scope, receive, send_noting)
            finally:
                template = getattr(scope.get("route"), "path", None)
                if template is not None:
                    span.update_name(f"{method} {template}")
                    span.set_attribute("http.route", template)
                span.set_attribute("http.response.status_code", answered["status"])
                if "request_id" in answered:
                    span.set_attribute("gruserve.request_id", answered["request_id"])
                if answered["status"] >= 500:
                    span.set_status(Status(StatusCode.ERROR))
