"""gRPC calls in ``/metrics`` and in traces, as HTTP requests are.

A real ``gruserve serve`` driven by the stock ``tritonclient.grpc`` client: unary calls and
each ModelStreamInfer message are counted by method and status code, and the scrape passes
``promtool check metrics``. Spans come from the production app in this process, recorded by
the SDK's in-memory exporter, with the stock ``tritonclient.grpc.aio`` client.
"""

from __future__ import annotations

import contextlib
import queue
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

grpcclient = pytest.importorskip("tritonclient.grpc")
import tritonclient.grpc.aio as grpcaio  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from conftest import free_port, serving_settings, span_attribute, span_attributes  # noqa: E402
from test_server import BIN, _env, _start, _stop  # noqa: E402

STREAMED = 5
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def tensor(x: np.ndarray) -> Any:
    given = grpcclient.InferInput("inputs", list(x.shape), "FP32")
    given.set_data_from_numpy(x)
    return given


@pytest.fixture
def served(models_dir: Path, tiny_models: dict[str, Any], tmp_path: Path) -> Iterator[Any]:
    port, grpc_port = free_port(), free_port()
    proc = _start(
        [str(BIN / "gruserve"), "serve", "--port", str(port), "--grpc-port", str(grpc_port)],
        _env(models_dir),
        port,
        tmp_path,
    )
    try:
        yield f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
    finally:
        _stop(proc)


def _samples(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


def test_grpc_calls_and_stream_messages_are_counted(served: Any) -> None:
    http, address = served
    client = grpcclient.InferenceServerClient(address)
    x = np.ones((1, 1, 3), np.float32)
    try:
        assert client.is_server_live()
        client.infer("simple", [tensor(x)])
        with pytest.raises(InferenceServerException):
            client.infer("nope", [tensor(x)])
        answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for t in range(STREAMED):
            client.async_stream_infer("simple", [tensor(x)], sequence_id=99, sequence_start=t == 0)
        client.async_stream_infer("simple", [tensor(x)], sequence_id=12345)  # never started
        errors = [answers.get(timeout=60)[1] for _ in range(STREAMED + 1)]
        assert errors[:STREAMED] == [None] * STREAMED and errors[-1] is not None
        client.stop_stream()
    finally:
        client.close()
    exposition = httpx.get(f"{http}/metrics").text
    got = _samples(exposition)

    def requests(method: str, code: str) -> float:
        labels = (("code", code), ("method", method))
        return got.get(("gruserve_grpc_requests_total", labels), 0.0)

    assert requests("ServerLive", "OK") == 1
    assert requests("ModelInfer", "OK") == 1
    assert requests("ModelInfer", "NOT_FOUND") == 1
    assert requests("ModelStreamInfer", "OK") == STREAMED  # one per message, not per stream
    assert requests("ModelStreamInfer", "NOT_FOUND") == 1
    count = ("gruserve_grpc_request_seconds_count", (("method", "ModelStreamInfer"),))
    assert got[count] == STREAMED + 1
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    lint = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


async def test_grpc_calls_and_stream_messages_are_spans(
    models_dir: Path, tiny_models: dict[str, Any]
) -> None:
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace", reason="needs gruserve[otel]")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from gruserve._otel import Tracing
    from gruserve.api.app import create_app
    from gruserve.server import build_services

    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    grpc_port = free_port()
    settings = serving_settings(models_dir, grpc_port=grpc_port)
    app = create_app(settings, build_services(settings, tracing=Tracing(provider)))
    headers = {"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"}
    x = np.ones((1, 1, 3), np.float32)
    async with app.router.lifespan_context(app):
        client = grpcaio.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        try:
            await client.infer("simple", [tensor(x)], request_id="one", headers=headers)
            with contextlib.suppress(InferenceServerException):
                await client.infer("simple", [tensor(x)], sequence_id=404, headers=headers)

            async def requests() -> Any:
                for t in range(3):
                    yield {
                        "model_name": "simple",
                        "inputs": [tensor(x)],
                        "sequence_id": "user-7",
                        "sequence_start": t == 0,
                        "request_id": f"s{t}",
                    }

            answers = client.stream_infer(requests(), headers=headers)
            async for result, error in answers:
                assert error is None, error
                if result.get_response().id == "s2":
                    break
        finally:
            await client.close()
    spans = list(exporter.get_finished_spans())
    infer = [s for s in spans if s.name == "inference.GRPCInferenceService/ModelInfer"]
    assert len(infer) == 2
    ok, missing = sorted(infer, key=lambda s: span_attribute(s, "rpc.grpc.status_code", int))
    assert ok.context.trace_id == int(TRACE_ID, 16)
    assert ok.parent is not None and ok.parent.span_id == int(CALLER_SPAN, 16)
    assert span_attributes(ok)["gruserve.model"] == "simple"
    assert span_attributes(ok)["gruserve.request_id"] == "one"
    assert span_attributes(ok)["rpc.grpc.status_code"] == 0 and ok.status.is_ok
    assert span_attributes(missing)["rpc.grpc.status_code"] == 5  # NOT_FOUND
    assert span_attributes(missing)["gruserve.sequence_id"] == "404"
    assert not missing.status.is_ok
    streamed = [s for s in spans if s.name == "inference.GRPCInferenceService/ModelStreamInfer"]
    request_ids = sorted(span_attribute(s, "gruserve.request_id", str) for s in streamed)
    assert request_ids == ["s0", "s1", "s2"]
    assert {span_attributes(s)["gruserve.sequence_id"] for s in streamed} == {"user-7"}
    assert all(s.context.trace_id == int(TRACE_ID, 16) for s in streamed)
    # a stream message's step has its store calls and queue wait as children, as HTTP's has
    children = {
        s.name
        for s in spans
        if s.parent is not None and s.parent.span_id in {m.context.span_id for m in streamed}
    }
    assert {"gruserve.queue_wait", "gruserve.store.get"} <= children
