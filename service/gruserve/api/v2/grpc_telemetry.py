"""Metrics and spans of gRPC calls: what the HTTP edge records for each request.

- ``gruserve_grpc_requests_total`` (``method``, ``code``) and
  ``gruserve_grpc_request_seconds`` (``method``): one update per unary RPC, and one per
  *message* of ``ModelStreamInfer`` (each request answered on a stream is a request, with
  the code it would have had as a unary call; its reply carries ``error_message``);
- with tracing on (:mod:`gruserve.tracing`), a server span per unary RPC and per stream
  message, named as OpenTelemetry's RPC conventions name them
  (``inference.GRPCInferenceService/ModelInfer``), continuing the caller's W3C
  ``traceparent`` from the call's metadata, with ``rpc.*`` attributes, the status code,
  and the model, request id and sequence id of the request. The store and queue-wait
  spans of its step are its children, as an HTTP request's are.

The service calls :meth:`GrpcTelemetry.call` around each answer (its own hook, not a grpcio
interceptor: an interceptor sees a stream as one call and would add a wrapper per message
on the streaming hot path). Off (no tracer), a call costs two clock reads and two labelled
updates, as on HTTP.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

from gruserve.metrics import Metrics

SERVICE = "inference.GRPCInferenceService"
OK = grpc.StatusCode.OK
CANCELLED = grpc.StatusCode.CANCELLED
_CARRIED = ("traceparent", "tracestate")


class GrpcTelemetry:
    """Counts, times and (when ``tracing`` is given) traces gRPC answers.

    Args:
        metrics: collectors, or None (nothing counted).
        tracing: a :class:`gruserve._otel.Tracing`, or None (no spans).
    """

    def __init__(self, metrics: Metrics | None, tracing: Any = None) -> None:
        self._metrics = metrics
        self._requests: dict[tuple[str, grpc.StatusCode], Counter] = {}
        self._seconds: dict[str, Histogram] = {}
        self._tracer = None if tracing is None else tracing.tracer
        if self._tracer is not None:
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )

            self._propagator = TraceContextTextMapPropagator()

    def call(self, method: str, context: Any, request: Any = None) -> Call:
        """A context manager around one answer of ``method`` (``"ModelInfer"``); set its
        ``code`` when the answer is an error. An exception leaving it unset (the client went
        away) counts as CANCELLED."""
        return Call(self, method, context, request)

    def count(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        if self._metrics is None:
            return
        key = (method, code)
        requests = self._requests.get(key)
        if requests is None:
            requests = self._requests[key] = self._metrics.grpc_requests.labels(method, code.name)
        timer = self._seconds.get(method)
        if timer is None:
            timer = self._seconds[method] = self._metrics.grpc_seconds.labels(method)
        requests.inc()
        timer.observe(seconds)

    def _start_span(self, method: str, context: Any, request: Any) -> Any:
        from opentelemetry.trace import SpanKind

        carrier = {k: v for k, v in context.invocation_metadata() or () if k in _CARRIED}
        attributes: dict[str, Any] = {
            "rpc.system": "grpc",
            "rpc.service": SERVICE,
            "rpc.method": method,
        }
        if request is not None:
            attributes.update(request_attributes(request))
        return self._tracer.start_as_current_span(  # type: ignore[union-attr]
            f"{SERVICE}/{method}",
            context=self._propagator.extract(carrier),
            kind=SpanKind.SERVER,
            attributes=attributes,
        )


class Call:
    """One answer being made: times it, counts it with its ``code``, holds its span."""

    __slots__ = (
        "_context",
        "_current",
        "_method",
        "_request",
        "_span",
        "_started",
        "_telemetry",
        "code",
    )

    def __init__(self, telemetry: GrpcTelemetry, method: str, context: Any, request: Any) -> None:
        self._telemetry, self._method = telemetry, method
        self._context, self._request = context, request
        self._span: Any = None
        self.code = OK

    def __enter__(self) -> Call:
        telemetry = self._telemetry
        if telemetry._tracer is not None:
            self._current = telemetry._start_span(self._method, self._context, self._request)
            self._span = self._current.__enter__()
        self._started = time.perf_counter()
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if kind is not None and self.code is OK:
            self.code = CANCELLED
        self._telemetry.count(self._method, self.code, time.perf_counter() - self._started)
        span = self._span
        if span is not None:
            from opentelemetry.trace import Status, StatusCode

            span.set_attribute("rpc.grpc.status_code", self.code.value[0])
            if self.code not in (OK, CANCELLED):
                span.set_status(Status(StatusCode.ERROR, self.code.name))
            self._current.__exit__(None, None, None)


def request_attributes(request: Any) -> dict[str, Any]:
    """``gruserve.model`` (and ``.model_version``), ``gruserve.request_id`` and
    ``gruserve.sequence_id`` of a v2 request message, the ones it carries."""
    found: dict[str, Any] = {}
    model = getattr(request, "model_name", None) or getattr(request, "name", None)
    if model:
        found["gruserve.model"] = model
    version = getattr(request, "model_version", None) or getattr(request, "version", None)
    if version:
        found["gruserve.model_version"] = version
    if getattr(request, "id", None):
        found["gruserve.request_id"] = request.id
    parameters = getattr(request, "parameters", None)
    if parameters is not None and "sequence_id" in parameters:
        given = parameters["sequence_id"]
        kind = given.WhichOneof("parameter_choice")
        if kind is not None:
            found["gruserve.sequence_id"] = str(getattr(given, kind))
    return found
