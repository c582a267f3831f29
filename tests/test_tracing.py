"""OpenTelemetry tracing (the ``otel`` extra): spans recorded by the SDK's in-memory exporter
from the production app, the OTEL_* configuration, and a real server exporting to stdout."""

from __future__ import annotations

import asyncio
import json
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from conftest import free_port, serving_settings, span_attribute, span_attributes
from gruserve.api.app import create_app
from gruserve.errors import SettingsError
from gruserve.server import build_services
from gruserve.tracing import from_environment
from test_server import BIN, _env, _start, _stop

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace", reason="needs gruserve[otel]")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

from gruserve._otel import Tracing  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
STEPS = 4


class Traced:
    def __init__(self, client: httpx.AsyncClient, exporter: InMemorySpanExporter, app: Any):
        self.client, self.exporter, self.app = client, exporter, app


async def _traced(models_dir: Path, tracing: Tracing | None) -> AsyncIterator[Any]:
    settings = serving_settings(models_dir)
    app = create_app(settings, build_services(settings, tracing=tracing))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gruserve") as client:
            yield client, app


@pytest.fixture
async def traced(models_dir: Path, tiny_models: dict[str, Any]) -> AsyncIterator[Traced]:
    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async for client, app in _traced(models_dir, Tracing(provider)):
        yield Traced(client, exporter, app)


def _children(spans: list[Any], parent: Any) -> list[Any]:
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.span_id]


async def test_a_step_continues_the_callers_trace(traced: Traced) -> None:
    sids = [
        (await traced.client.post("/v1/models/simple/sessions", json={})).json()["session_id"]
        for _ in range(STEPS)
    ]
    traced.exporter.clear()
    headers = {"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"}
    replies = await asyncio.gather(
        *(
            traced.client.post(
                f"/v1/sessions/{sid}/step", json={"inputs": [1, 2, 3]}, headers=headers
            )
            for sid in sids
        )
    )
    assert [r.status_code for r in replies] == [200] * STEPS
    spans = list(traced.exporter.get_finished_spans())
    requests = [s for s in spans if s.name == "POST /v1/sessions/{session_id}/step"]
    assert len(requests) == STEPS
    for request in requests:
        assert f"{request.context.trace_id:032x}" == TRACE_ID
        assert request.parent is not None
        assert f"{request.parent.span_id:016x}" == CALLER_SPAN and request.parent.is_remote
        assert span_attributes(request)["http.response.status_code"] == 200
        assert span_attribute(request, "url.path", str).endswith("/step")
        assert len(span_attribute(request, "gruserve.request_id", str)) == 32
        children = {s.name for s in _children(spans, request.context)}
        assert {"gruserve.queue_wait", "gruserve.store.get"} <= children
        assert "gruserve.store.compare_and_set" in children
    # every step ran in exactly one batch span, linked to its request
    batches = [s for s in spans if s.name == "gruserve.batch"]
    assert sum(span_attribute(b, "gruserve.batch.size", int) for b in batches) == STEPS
    linked = [link.context.span_id for b in batches for link in b.links]
    assert sorted(linked) == sorted(r.context.span_id for r in requests)
    assert all(
        b.parent is None and span_attributes(b)["gruserve.model"] == "simple" for b in batches
    )
    for wait in (s for s in spans if s.name == "gruserve.queue_wait"):
        assert wait.start_time is not None and wait.end_time is not None
        assert wait.start_time <= wait.end_time


async def test_a_bulk_request_traces_its_batch_pass(traced: Traced) -> None:
    """A bulk request's steps: one store read and one store write span for the batch pass,
    a queue wait per step, and the batch span linked to the request."""
    sids = [
        (await traced.client.post("/v1/models/simple/sessions", json={})).json()["session_id"]
        for _ in range(STEPS)
    ]
    traced.exporter.clear()
    steps = [{"session_id": sid, "inputs": [1, 2, 3]} for sid in sids]
    reply = await traced.client.post("/v1/models/simple/steps", json={"steps": steps})
    assert reply.status_code == 200 and all("step" in r for r in reply.json()["results"])
    spans = list(traced.exporter.get_finished_spans())
    (request,) = [s for s in spans if s.name == "POST /v1/models/{model}/steps"]
    children = [s.name for s in _children(spans, request.context)]
    assert children.count("gruserve.store.get_many") == 1
    assert children.count("gruserve.store.compare_and_set_many") == 1
    assert children.count("gruserve.queue_wait") == STEPS
    batches = [s for s in spans if s.name == "gruserve.batch"]
    assert sum(span_attribute(b, "gruserve.batch.size", int) for b in batches) == STEPS
    assert {link.context.span_id for b in batches for link in b.links} == {request.context.span_id}


async def test_a_binary_bulk_traces_its_block(traced: Traced) -> None:
    """A binary bulk request's plain steps run as one block: one store read and one store
    write span, one queue wait for the block's run (not one per step), and the batch span
    counts the block's steps."""
    sids = [
        (await traced.client.post("/v1/models/simple/sessions", json={})).json()["session_id"]
        for _ in range(STEPS)
    ]
    traced.exporter.clear()
    head = json.dumps({"steps": [{"session_id": sid, "timesteps": 1} for sid in sids]}).encode()
    values = np.ones((STEPS, 3), "<f4").tobytes()
    reply = await traced.client.post(
        "/v1/models/simple/steps",
        content=struct.pack("<I", len(head)) + head + values,
        headers={"content-type": "application/x-gruserve-steps"},
    )
    assert reply.status_code == 200
    spans = list(traced.exporter.get_finished_spans())
    (request,) = [s for s in spans if s.name == "POST /v1/models/{model}/steps"]
    children = [s.name for s in _children(spans, request.context)]
    assert children.count("gruserve.store.get_many") == 1
    assert children.count("gruserve.store.compare_and_set_many") == 1
    assert children.count("gruserve.queue_wait") == 1
    batches = [s for s in spans if s.name == "gruserve.batch"]
    assert [span_attributes(b)["gruserve.batch.size"] for b in batches] == [STEPS]
    assert {link.context.span_id for b in batches for link in b.links} == {request.context.span_id}


async def test_routed_requests_are_named_by_their_route(traced: Traced) -> None:
    created = await traced.client.post("/v1/models/simple/sessions", json={})
    missing = await traced.client.get("/v1/sessions/nobody")
    assert (created.status_code, missing.status_code) == (201, 404)
    spans = traced.exporter.get_finished_spans()
    names = {s.name: s for s in spans if s.kind.name == "SERVER"}
    assert span_attributes(names["POST /v1/models/{model}/sessions"])["http.route"] == (
        "/v1/models/{model}/sessions"
    )
    assert (
        span_attributes(names["GET /v1/sessions/{session_id}"])["http.response.status_code"] == 404
    )
    create = names["POST /v1/models/{model}/sessions"]
    assert "gruserve.store.create" in {s.name for s in _children(list(spans), create.context)}
    # no traceparent: a new trace, not a child
    assert create.parent is None


async def test_off_means_nothing_is_wrapped(models_dir: Path, tiny_models: dict[str, Any]) -> None:
    async for _client, app in _traced(models_dir, None):
        services = app.state.services
        assert all(b.tracer is None and "submit" not in vars(b) for b in services.batchers.values())
        assert not set(vars(services.store)) & {"get", "create", "compare_and_set", "delete"}
        assert not {"get_many", "compare_and_set_many"} & set(vars(services.store))
        assert all("submit_many" not in vars(b) for b in services.batchers.values())
        assert app.direct_routes is not None  # the HTTP protocol's own step path stays


def test_the_otel_variables_choose() -> None:
    assert from_environment({}) is None
    assert from_environment({"OTEL_TRACES_EXPORTER": "none"}) is None
    assert (
        from_environment({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}) is None
    )
    with pytest.raises(SettingsError, match="OTEL_TRACES_EXPORTER='zipkin'"):
        from_environment({"OTEL_TRACES_EXPORTER": "zipkin"})
    tracing = from_environment({"OTEL_TRACES_EXPORTER": "console"})
    assert isinstance(tracing, Tracing)
    tracing.shutdown()


@pytest.mark.slow
def test_a_real_server_exports_what_the_variables_say(
    models_dir: Path, tiny_models: dict[str, Any], tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **_env(models_dir),
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_SERVICE_NAME": "gruserve-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    proc = _start([str(BIN / "gruserve"), "serve", "--port", str(port)], env, port, tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        sid = httpx.post(f"{base}/v1/models/simple/sessions", json={}).json()["session_id"]
        headers = {"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"}
        reply = httpx.post(
            f"{base}/v1/sessions/{sid}/step", json={"inputs": [1, 2, 3]}, headers=headers
        )
        assert reply.status_code == 200
    finally:
        proc.terminate()  # the spans still buffered are exported at shutdown
        proc.wait(timeout=30)
        output = proc.stdout.read().decode() if proc.stdout else ""
        _stop(proc)
    decoder, spans, at = json.JSONDecoder(), [], output.find("{")
    while at != -1:  # ConsoleSpanExporter prints indented JSON objects among the log lines
        try:
            span, end = decoder.raw_decode(output, at)
        except json.JSONDecodeError:
            at = output.find("{", at + 1)
            continue
        spans.append(span)
        at = output.find("{", end)
    ours = [s for s in spans if s.get("context", {}).get("trace_id") == f"0x{TRACE_ID}"]
    names = {s["name"] for s in ours}
    assert {
        "POST /v1/sessions/{session_id}/step",
        "gruserve.queue_wait",
        "gruserve.store.get",
    } <= names
    assert all(s["resource"]["attributes"]["service.name"] == "gruserve-test" for s in ours)
    assert os.environ.get("OTEL_TRACES_EXPORTER") is None  # the test's own process untouched
