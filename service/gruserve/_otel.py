"""The OpenTelemetry side of :mod:`gruserve.tracing`, imported only when tracing is on.

Spans (names as a trace viewer shows them):

- ``{method} {route}`` (server): one per HTTP request, continuing the caller's
  ``traceparent`` (:mod:`gruserve.api._tracing`);
- ``gruserve.queue_wait``: child of the request, from a step's arrival at the batcher
  to the launch of the batch that runs it;
- ``gruserve.batch``: one per batched onnxruntime run, ``gruserve.batch.size`` steps,
  a root span linked to the request of every step in it (a batch serves many traces);
- ``gruserve.store.{get,create,compare_and_set,delete}`` (client): child of the request;
  a bulk request's batch pass makes one ``get_many`` and one ``compare_and_set_many``.

Nothing in the batcher or the stores imports this: the batcher calls
:meth:`Tracing.batch_ran` through its ``tracer`` attribute (one test per batch when off),
and :meth:`Tracing.instrument` wraps the store's and batchers' methods on those instances.
"""

from __future__ import annotations

import asyncio
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from gruserve import __version__
from gruserve.errors import SettingsError

STORE_CALLS = ("get", "create", "compare_and_set", "delete", "get_many", "compare_and_set_many")


def make_exporter(name: str) -> SpanExporter:
    """The exporter ``OTEL_TRACES_EXPORTER`` names (``otlp`` or ``console``)."""
    if name == "console":
        return ConsoleSpanExporter()
    try:  # the exporter package reads OTEL_EXPORTER_OTLP_* itself
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter,  # type: ignore[assignment]
            )
        except ImportError:
            raise SettingsError(
                [
                    "OTEL_TRACES_EXPORTER=otlp needs the OTLP exporter: "
                    "pip install opentelemetry-exporter-otlp (or use console or none)"
                ]
            ) from None
    return OTLPSpanExporter()


class Tracing:
    """Where gruserve's spans go.

    Args:
        provider: the SDK tracer provider (tests pass one with an in-memory exporter).
    """

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("gruserve", __version__)
        # each waiting step's future -> the context of the request that submitted it
        self._waiting: weakref.WeakKeyDictionary[asyncio.Future[Any], otel_context.Context] = (
            weakref.WeakKeyDictionary()
        )

    @classmethod
    def with_exporter(cls, exporter: SpanExporter) -> Tracing:
        """A provider configured from ``OTEL_*`` (resource, sampler, batch processor)."""
        named = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: "gruserve"}
        provider = TracerProvider(resource=Resource.create(named))
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider)

    def shutdown(self) -> None:
        self.provider.shutdown()

    def instrument(self, batchers: Iterable[Any], store: Any) -> None:
        """Trace ``batchers``' queue waits and runs, and ``store``'s reads and writes."""
        for batcher in batchers:
            batcher.submit = self._remembering(batcher.submit)
            batcher.submit_many = self._remembering_many(batcher.submit_many)
            batcher.submit_block = self._remembering_many(batcher.submit_block)
            batcher.tracer = self
        for name in STORE_CALLS:
            method = getattr(store, name, None)
            if method is not None:
                setattr(store, name, self._store_call(store.name, name, method))

    def _remembering(self, submit: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        waiting = self._waiting

        def submit_traced(*args: Any, **kwargs: Any) -> Awaitable[Any]:
            answer = submit(*args, **kwargs)
            if isinstance(answer, asyncio.Future):  # queued now (else it waits for room)
                waiting[answer] = otel_context.get_current()
            return answer

        return submit_traced

    def _remembering_many(
        self, submit_many: Callable[..., Awaitable[list[asyncio.Future[Any]]]]
    ) -> Callable[..., Awaitable[list[asyncio.Future[Any]]]]:
        waiting = self._waiting

        async def submit_many_traced(*args: Any, **kwargs: Any) -> list[asyncio.Future[Any]]:
            futures = await submit_many(*args, **kwargs)
            current = otel_context.get_current()
            for future in futures:
                waiting[future] = current
            return futures

        return submit_many_traced

    def _store_call(
        self, store: str, name: str, method: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        tracer, attributes = self.tracer, {"gruserve.store": store, "db.operation.name": name}

        async def call_traced(*args: Any, **kwargs: Any) -> Any:
            with tracer.start_as_current_span(
                f"gruserve.store.{name}", kind=SpanKind.CLIENT, attributes=attributes
            ):
                return await method(*args, **kwargs)

        return call_traced

    def batch_ran(
        self, model: str, batch: Sequence[Any], started: float | None, error: Exception | None
    ) -> None:
        """The batcher's hook (``Batcher.tracer``): a queue-wait span per step whose request
        is known, and the batch's span linked to those requests."""
        loop = asyncio.get_running_loop()
        now_loop, now_ns = loop.time(), time.time_ns()

        def ns(loop_time: float) -> int:
            return now_ns - int((now_loop - loop_time) * 1e9)

        links = []
        for item in batch:
            parent = self._waiting.pop(item.future, None)
            if parent is None:
                continue
            links.append(Link(trace.get_current_span(parent).get_span_context()))
            if started is not None:
                wait = self.tracer.start_span(
                    "gruserve.queue_wait",
                    context=parent,
                    start_time=ns(item.arrived),
                    attributes={"gruserve.model": model},
                )
                wait.end(end_time=ns(started))
        span = self.tracer.start_span(
            "gruserve.batch",
            context=otel_context.Context(),  # a root: not the request that started the task
            links=links,
            start_time=ns(started) if started is not None else now_ns,
            attributes={
                "gruserve.model": model,
                # steps, not queue entries: a block (Batcher.submit_block) is one entry of many
                "gruserve.batch.size": sum(getattr(item, "rows", 0) or 1 for item in batch),
            },
        )
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end(end_time=now_ns)
