"""The KServe v2 gRPC front-end, driven by the stock ``tritonclient.grpc`` clients.

A real ``gruserve serve`` process (one per module) serves HTTP and gRPC on the same
models, one of them imported from a real Keras model. Every number is checked against
the v1 API of that server (a v1 session stepped alike, a full-sequence predict) and,
for the Keras model, against ``keras`` itself, to 1e-5. Each error class a client can
provoke is provoked for real and must come back with its status code.
"""

from __future__ import annotations

import contextlib
import queue
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from v1_helpers import v1_predict, v1_session_outputs

grpcclient = pytest.importorskip("tritonclient.grpc")
import grpc  # noqa: E402
import tritonclient.grpc.aio as grpcaio  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from conftest import free_port  # noqa: E402
from gruserve.cli import app  # noqa: E402
from keras_helpers import keras, randomize, to_numpy  # noqa: E402
from test_server import BIN, _env, _start, _stop  # noqa: E402

ATOL = 1e-5
STEPS = 50
F = 3


class Server:
    def __init__(self, http: str, grpc_address: str, proc: subprocess.Popen[bytes]) -> None:
        self.http, self.grpc, self.proc = http, grpc_address, proc


def start_server(models: Path, cwd: Path, store: str = "memory", **env: str) -> Server:
    port, grpc_port = free_port(), free_port()
    proc = _start(
        [str(BIN / "gruserve"), "serve", "--port", str(port), "--grpc-port", str(grpc_port)],
        _env(models, store, **env),
        port,
        cwd,
    )
    return Server(f"127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", proc)


@pytest.fixture(scope="module")
def keras_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    model = keras.Sequential(
        [
            keras.Input((None, F)),
            keras.layers.GRU(6, return_sequences=True),
            keras.layers.GRU(4, return_sequences=True, reset_after=False),
            keras.layers.Dense(2),
        ]
    )
    randomize(model, np.random.default_rng(17))
    return model


@pytest.fixture(scope="module")
def grpc_models(
    models_dir: Path, tiny_models: dict[str, Any], keras_model: Any, tmp_path_factory: Any
) -> Path:
    """The tiny models, and ``kgru`` imported from the Keras model by ``gruserve import-keras``."""
    root = tmp_path_factory.mktemp("grpc-models")
    models = root / "models"
    shutil.copytree(models_dir, models)
    source = root / "kgru.keras"
    keras_model.save(source)
    result = CliRunner().invoke(
        app, ["import-keras", str(source), "--name", "kgru", "--models-dir", str(models)]
    )
    assert result.exit_code == 0, result.output
    return models


@pytest.fixture(scope="module")
def server(grpc_models: Path, tmp_path_factory: Any) -> Iterator[Server]:
    served = start_server(grpc_models, tmp_path_factory.mktemp("grpc-server"))
    yield served
    _stop(served.proc)


@pytest.fixture
def triton(server: Server) -> Iterator[Any]:
    client = grpcclient.InferenceServerClient(server.grpc)
    yield client
    client.close()


def tensor(name: str, x: np.ndarray, datatype: str = "FP32") -> Any:
    given = grpcclient.InferInput(name, list(x.shape), datatype)
    given.set_data_from_numpy(x)
    return given


def code_of(info: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(info.value.status())


# -- metadata, health, reflection ------------------------------------------------------------
def test_metadata_config_health_and_reflection(triton: Any, server: Server) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata(as_json=True)
    assert meta["name"] == "gruserve"
    assert {"sequence", "sequence(string_id)"} <= set(meta["extensions"])
    model = triton.get_model_metadata("stacked", as_json=True)
    assert model["versions"] == ["1"] and model["platform"] == "onnxruntime_onnx"
    assert [(t["name"], t["datatype"], t["shape"]) for t in model["inputs"]] == [
        ("inputs", "FP32", ["-1", "-1", "3"]),
        ("mask", "BOOL", ["-1", "-1"]),
    ]
    assert triton.is_model_ready("stacked") and triton.is_model_ready("stacked", "1")
    config = triton.get_model_config("stacked").config
    assert config.max_batch_size == 64 and list(config.input[0].dims) == [-1, 3]
    assert [
        (s.input_name, s.output_name, list(s.dims)) for s in config.sequence_batching.state
    ] == [
        ("initial_state/gru_a", "final_state/gru_a", [6]),
        ("initial_state/gru_b", "final_state/gru_b", [5]),
    ]
    with grpc.insecure_channel(server.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="nope"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        asked = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="inference.GRPCInferenceService"
            ),
        ]
        listed, described = list(reflect.ServerReflectionInfo(iter(asked)))
        names = {s.name for s in listed.list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
        assert described.file_descriptor_response.file_descriptor_proto  # the .proto, served


# -- inference -------------------------------------------------------------------------------
def test_infer_raw_contents(
    triton: Any, server: Server, tiny_models: dict[str, Any], rng: np.random.Generator
) -> None:
    x = rng.normal(size=(3, 7, 3)).astype(np.float32)
    wanted = [grpcclient.InferRequestedOutput(n) for n in ("outputs", "final_state/gru")]
    result = triton.infer("simple", [tensor("inputs", x)], outputs=wanted)
    expected = v1_predict(server.http, "simple", x, return_state=True)
    np.testing.assert_allclose(result.as_numpy("outputs"), expected["outputs"], atol=ATOL)
    np.testing.assert_allclose(
        result.as_numpy("final_state/gru"), expected["states"]["gru"], atol=ATOL
    )
    reference, _ = tiny_models["simple"].reference(x)
    np.testing.assert_allclose(result.as_numpy("outputs"), reference[0], atol=ATOL)
    # no outputs named: the model's outputs; a mask by name, as BOOL
    mask = np.ones((3, 7), bool)
    mask[1, 5:] = False
    masked = triton.infer("simple", [tensor("inputs", x), tensor("mask", mask, "BOOL")])
    assert [o.name for o in masked.get_response().outputs] == ["outputs"]
    reference, _ = tiny_models["simple"].reference(x, mask=mask)
    np.testing.assert_allclose(masked.as_numpy("outputs"), reference[0], atol=ATOL)


def test_infer_typed_contents_and_a_uint64_id(
    server: Server, tiny_models: dict[str, Any], rng: np.random.Generator
) -> None:
    """Typed ``contents`` through the protocol's own stub, and a sequence id past int64
    (``uint64_param``), which tritonclient cannot send."""
    x = rng.normal(size=(1, 4, 3)).astype(np.float32)
    with grpc.insecure_channel(server.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        outputs = []
        for t in range(4):
            request = pb.ModelInferRequest(model_name="simple", id=f"r{t}")
            given = request.inputs.add(name="inputs", datatype="FP32", shape=[1, 1, 3])
            given.contents.fp32_contents.extend(x[0, t].tolist())
            request.parameters["sequence_id"].uint64_param = 2**64 - 1
            request.parameters["sequence_start"].bool_param = t == 0
            request.parameters["sequence_end"].bool_param = t == 3
            reply = stub.ModelInfer(request)
            assert reply.id == f"r{t}" and reply.parameters["step"].int64_param == t + 1
            assert reply.parameters["sequence_id"].uint64_param == 2**64 - 1
            assert reply.parameters["session_id"].string_param == f"v2:simple:{2**64 - 1}"
            outputs.append(np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(1, 1, -1))
    reference, _ = tiny_models["simple"].reference(x)
    np.testing.assert_allclose(np.concatenate(outputs, axis=1), reference[0], atol=ATOL)


def _stream(triton: Any, model: str, x: np.ndarray, sequence_id: int | str) -> np.ndarray:
    """``x`` (1, T, F) stepped one timestep per request over one stream."""
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    triton.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        steps = x.shape[1]
        for t in range(steps):
            triton.async_stream_infer(
                model,
                [tensor("inputs", x[:, t : t + 1])],
                sequence_id=sequence_id,
                sequence_start=t == 0,
                sequence_end=t == steps - 1,
                request_id=str(t),
            )
        got = []
        for t in range(steps):  # answered in the order sent
            result, error = answers.get(timeout=60)
            assert error is None, error
            assert result.get_response().id == str(t)
            got.append(result.as_numpy("outputs"))
    finally:
        triton.stop_stream()
    return np.concatenate(got, axis=1)


@pytest.mark.parametrize("sequence_id", [4242, "user-7"], ids=["uint64", "string"])
def test_stream_50_steps_equals_v1_sessions_and_keras(
    triton: Any, server: Server, keras_model: Any, rng: np.random.Generator, sequence_id: Any
) -> None:
    x = rng.normal(size=(1, STEPS, F)).astype(np.float32)
    streamed = _stream(triton, "kgru", x, sequence_id)
    assert streamed.shape == (1, STEPS, 2)
    by_v1 = v1_session_outputs(server.http, "kgru", x[0])
    np.testing.assert_allclose(streamed[0], by_v1, atol=ATOL)
    np.testing.assert_allclose(streamed, to_numpy(keras_model(x)), atol=ATOL)
    # the end deleted the sequence's session
    session = "v2:kgru:4242" if sequence_id == 4242 else "v2:kgru:s:user-7"
    assert httpx.get(f"http://{server.http}/v1/sessions/{session}").status_code == 404


async def test_aio_client_infer_and_stream(
    server: Server, tiny_models: dict[str, Any], rng: np.random.Generator
) -> None:
    x = rng.normal(size=(2, 6, 3)).astype(np.float32)
    reference, _ = tiny_models["stacked"].reference(x)
    client = grpcaio.InferenceServerClient(server.grpc)
    try:
        assert await client.is_server_ready()
        given = grpcaio.InferInput("inputs", list(x.shape), "FP32")
        given.set_data_from_numpy(x)
        result = await client.infer("stacked", [given])
        np.testing.assert_allclose(result.as_numpy("outputs"), reference[0], atol=ATOL)

        async def requests() -> Any:
            for t in range(x.shape[1]):
                step = grpcaio.InferInput("inputs", [1, 1, 3], "FP32")
                step.set_data_from_numpy(x[1:2, t : t + 1])
                yield {
                    "model_name": "stacked",
                    "inputs": [step],
                    "sequence_id": "aio-1",
                    "sequence_start": t == 0,
                    "sequence_end": t == x.shape[1] - 1,
                }

        got = []
        async for result, error in client.stream_infer(requests()):
            assert error is None, error
            got.append(result.as_numpy("outputs"))
        np.testing.assert_allclose(np.concatenate(got, axis=1)[0], reference[0][1], atol=ATOL)
    finally:
        await client.close()


def test_a_sequence_moves_between_grpc_and_http(
    triton: Any, server: Server, tiny_models: dict[str, Any], rng: np.random.Generator
) -> None:
    """One sequence id, one session: started over gRPC, continued over HTTP v2, ended on gRPC."""
    x = rng.normal(size=(1, 3, 3)).astype(np.float32)
    first = triton.infer(
        "simple", [tensor("inputs", x[:, :1])], sequence_id=77, sequence_start=True
    ).as_numpy("outputs")
    body = {
        "inputs": [
            {"name": "inputs", "datatype": "FP32", "shape": [1, 1, 3], "data": x[0, 1].tolist()}
        ],
        "parameters": {"sequence_id": 77},
    }
    second = httpx.post(f"http://{server.http}/v2/models/simple/infer", json=body).json()
    third = triton.infer(
        "simple", [tensor("inputs", x[:, 2:])], sequence_id=77, sequence_end=True
    ).as_numpy("outputs")
    got = np.concatenate(
        [first, np.asarray(second["outputs"][0]["data"], np.float32).reshape(1, 1, -1), third],
        axis=1,
    )
    reference, _ = tiny_models["simple"].reference(x)
    np.testing.assert_allclose(got, reference[0], atol=ATOL)


# -- errors ----------------------------------------------------------------------------------
def test_each_error_class_has_its_status_code(
    triton: Any, server: Server, rng: np.random.Generator
) -> None:
    x = rng.normal(size=(1, 1, 3)).astype(np.float32)
    cases: list[tuple[Any, str, str]] = [
        # bad input, naming the field
        (
            lambda: triton.infer("simple", [tensor("inputs", x[..., :2])]),
            "INVALID_ARGUMENT",
            "inputs[0].shape",
        ),
        (
            lambda: triton.infer("simple", [tensor("inputs", x.astype(np.float64), "FP64")]),
            "INVALID_ARGUMENT",
            "inputs[0].datatype",
        ),
        (lambda: triton.infer("simple", [tensor("nope", x)]), "INVALID_ARGUMENT", "inputs[0].name"),
        # unknown model, version, sequence
        (lambda: triton.infer("nope", [tensor("inputs", x)]), "NOT_FOUND", "'nope'"),
        (lambda: triton.get_model_metadata("simple", "9"), "NOT_FOUND", "version"),
        (
            lambda: triton.infer("simple", [tensor("inputs", x)], sequence_id=999),
            "NOT_FOUND",
            "sequence_start=true",
        ),
    ]
    for call, code, text in cases:
        with pytest.raises(InferenceServerException) as info:
            call()
        assert code_of(info) == f"StatusCode.{code}", info.value
        assert text in info.value.message(), info.value
    # a sequence conflict: a step number that is not the next one
    triton.infer("simple", [tensor("inputs", x)], sequence_id=555, sequence_start=True)
    with pytest.raises(InferenceServerException) as info:
        triton.infer(
            "simple", [tensor("inputs", x)], sequence_id=555, parameters={"sequence_step": 7}
        )
    assert code_of(info) == "StatusCode.FAILED_PRECONDITION", info.value
    assert "step" in info.value.message()
    # over the request size limit (GRUSERVE_MAX_REQUEST_BYTES, 4 MiB here)
    big = np.zeros((1, 400_000, 3), np.float32)
    with pytest.raises(InferenceServerException) as info:
        triton.infer("simple", [tensor("inputs", big)])
    assert code_of(info) == "StatusCode.RESOURCE_EXHAUSTED", info.value


def test_every_error_http_maps_has_a_grpc_code() -> None:
    """A core error given an HTTP status must get a gRPC code too (not INTERNAL)."""
    from gruserve.api import errors
    from gruserve.api.v2 import grpc_status

    assert set(errors.STATUS) <= set(grpc_status.STATUS)
    assert grpc.StatusCode.INTERNAL not in grpc_status.STATUS.values()


def test_malformed_messages_name_the_field(server: Server) -> None:
    """What tritonclient never sends, through the protocol's own stub."""

    def request(**fields: Any) -> Any:
        made = pb.ModelInferRequest(model_name="simple", **fields)
        return made

    raw = np.zeros(3, np.float32).tobytes()
    one = pb.ModelInferRequest.InferInputTensor(name="inputs", datatype="FP32", shape=[1, 1, 3])
    typed_wrong = pb.ModelInferRequest.InferInputTensor(
        name="inputs", datatype="FP32", shape=[1, 1, 3]
    )
    typed_wrong.contents.int64_contents.extend([1, 2, 3])
    short = pb.ModelInferRequest.InferInputTensor(name="inputs", datatype="FP32", shape=[1, 1, 3])
    short.contents.fp32_contents.extend([1.0, 2.0])
    cases = [
        (request(), "inputs"),
        (request(inputs=[one], raw_input_contents=[raw, raw]), "raw_input_contents"),
        (request(inputs=[one], raw_input_contents=[raw[:8]]), "raw_input_contents[0]"),
        (request(inputs=[typed_wrong]), "inputs[0].contents"),
        (request(inputs=[short]), "inputs[0].data"),
        (request(inputs=[one], raw_input_contents=[raw], model_version="x"), "version"),
    ]
    with grpc.insecure_channel(server.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for message, field in cases:
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(message)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
            assert info.value.details().startswith(f"{field}: "), info.value.details()


def test_a_failed_request_in_a_stream_is_answered_and_the_stream_goes_on(
    triton: Any, rng: np.random.Generator
) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    triton.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        x = rng.normal(size=(1, 1, 3)).astype(np.float32)
        triton.async_stream_infer("simple", [tensor("inputs", x)], sequence_id=31337)
        triton.async_stream_infer(
            "simple", [tensor("inputs", x)], sequence_id=31337, sequence_start=True
        )
        result, error = answers.get(timeout=60)
        assert result is None and "sequence_start=true" in error.message()
        result, error = answers.get(timeout=60)
        assert error is None and result.as_numpy("outputs").shape[:2] == (1, 1)
    finally:
        triton.stop_stream()


KILLED_CLIENT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import tritonclient.grpc as g

    answered = []

    def note(result, error):
        answered.append(error)
        if len(answered) == 3:  # the rest are on their way or being stepped: kill me now
            print("answered", flush=True)

    client = g.InferenceServerClient(sys.argv[1])
    client.start_stream(callback=note)
    for t in range(400):
        x = np.full((1, 1, 3), t, np.float32)
        step = g.InferInput("inputs", [1, 1, 3], "FP32")
        step.set_data_from_numpy(x)
        client.async_stream_infer("simple", [step], sequence_id=8080, sequence_start=t == 0)
    time.sleep(60)
    """
)


def test_a_client_killed_mid_stream_leaves_no_stuck_session(
    triton: Any, server: Server, tmp_path: Path
) -> None:
    script = tmp_path / "client.py"
    script.write_text(KILLED_CLIENT)
    proc = subprocess.Popen(
        [sys.executable, str(script), server.grpc], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "answered"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    # whatever the server had applied when the client died, the sequence takes the next step
    # at once, exactly once (its step number), over a new connection
    base = f"http://{server.http}/v1/sessions/v2:simple:8080"
    seen = httpx.get(base).json()
    applied = seen["step"]
    assert 3 <= applied <= 400
    x = np.zeros((1, 1, 3), np.float32)
    for _ in range(2):  # the same step twice: applied once
        result = triton.infer(
            "simple",
            [tensor("inputs", x)],
            sequence_id=8080,
            parameters={"sequence_step": httpx.get(base).json()["step"]},
            client_timeout=30,
        )
        assert result.get_response().parameters["step"].int64_param >= applied + 1
    assert httpx.delete(base).status_code == 204


# -- API keys, limits, outages ---------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(grpc_models: Path, tmp_path_factory: Any) -> Iterator[Server]:
    """A server with named API keys and a small session limit."""
    served = start_server(
        grpc_models,
        tmp_path_factory.mktemp("grpc-keyed"),
        GRUSERVE_API_KEYS="acme:k-acme,globex:k-globex",
        GRUSERVE_MAX_SESSIONS="2",
        GRUSERVE_SESSION_EVICTION="reject",
    )
    yield served
    _stop(served.proc)


def test_api_keys_tenants_and_session_limit(keyed: Server, rng: np.random.Generator) -> None:
    client = grpcclient.InferenceServerClient(keyed.grpc)
    x = rng.normal(size=(1, 1, 3)).astype(np.float32)
    try:
        assert client.is_server_live() and client.is_server_ready()  # probes need no key
        for headers in ({}, {"authorization": "Bearer wrong"}, {"x-api-key": "k-acmeX"}):
            with pytest.raises(InferenceServerException) as info:
                client.infer("simple", [tensor("inputs", x)], headers=headers)
            assert code_of(info) == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as info:
            client.get_server_metadata(headers={})
        assert code_of(info) == "StatusCode.UNAUTHENTICATED"
        acme, globex = {"authorization": "Bearer k-acme"}, {"x-api-key": "k-globex"}

        def step(headers: dict[str, str], **flags: Any) -> dict[str, Any]:
            answer = client.infer(
                "simple", [tensor("inputs", x)], sequence_id=5, headers=headers, **flags
            )
            parameters = answer.get_response().parameters
            return {"session_id": parameters["session_id"].string_param,
                    "step": parameters["step"].int64_param}  # fmt: skip

        assert step(acme, sequence_start=True) == {"session_id": "v2:simple:5", "step": 1}
        # the same id is another tenant's other sequence: globex has none yet
        with pytest.raises(InferenceServerException) as info:
            client.infer("simple", [tensor("inputs", x)], sequence_id=5, headers=globex)
        assert code_of(info) == "StatusCode.NOT_FOUND"
        assert step(acme)["step"] == 2
        assert step(globex, sequence_start=True) == {"session_id": "v2:simple:5", "step": 1}
        assert step(acme)["step"] == 3  # globex's start started its own, not acme's over
        r = httpx.get(f"http://{keyed.http}/v1/sessions/v2:simple:5", headers=globex)
        assert r.status_code == 200 and r.json()["step"] == 1  # v1 sees globex's own
        with pytest.raises(InferenceServerException) as info:  # the third session: over 2
            client.infer(
                "simple", [tensor("inputs", x)], sequence_id=7, sequence_start=True, headers=acme
            )
        assert code_of(info) == "StatusCode.RESOURCE_EXHAUSTED", info.value
        # a stream without a key ends at once with the status
        answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        # the stream may have ended already; then this raises and the callback has why
        with contextlib.suppress(InferenceServerException):
            client.async_stream_infer("simple", [tensor("inputs", x)])
        result, error = answers.get(timeout=60)
        assert result is None and error.status() == "StatusCode.UNAUTHENTICATED"
        client.stop_stream()
    finally:
        client.close()
    with grpc.insecure_channel(keyed.grpc) as channel:  # health needs no key either
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_a_store_outage_is_unavailable(
    grpc_models: Path, tmp_path: Path, rng: np.random.Generator
) -> None:
    """Redis gone: a sequence step answers UNAVAILABLE and health says NOT_SERVING."""
    redis_port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    served = None
    try:
        served = start_server(
            grpc_models,
            tmp_path,
            f"redis://127.0.0.1:{redis_port}/0",
            GRUSERVE_STORE_TIMEOUT_S="1",
        )
        client = grpcclient.InferenceServerClient(served.grpc)
        x = rng.normal(size=(1, 1, 3)).astype(np.float32)
        client.infer("simple", [tensor("inputs", x)], sequence_id=1, sequence_start=True)
        redis.terminate()
        redis.wait()
        with pytest.raises(InferenceServerException) as info:
            client.infer("simple", [tensor("inputs", x)], sequence_id=1)
        assert code_of(info) == "StatusCode.UNAVAILABLE", info.value
        assert not client.is_server_ready()
        with grpc.insecure_channel(served.grpc) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
        client.close()
    finally:
        if served is not None:
            _stop(served.proc)
        if redis.poll() is None:
            redis.kill()
            redis.wait()


def test_shutdown_ends_a_stream_with_unavailable(
    grpc_models: Path, tmp_path: Path, rng: np.random.Generator
) -> None:
    served = start_server(grpc_models, tmp_path)
    client = grpcclient.InferenceServerClient(served.grpc)
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        x = rng.normal(size=(1, 1, 3)).astype(np.float32)
        client.async_stream_infer(
            "simple", [tensor("inputs", x)], sequence_id=3, sequence_start=True
        )
        result, error = answers.get(timeout=60)
        assert error is None
        served.proc.send_signal(signal.SIGTERM)
        result, error = answers.get(timeout=60)  # the open, idle stream is ended, with a word
        assert result is None and error.status() == "StatusCode.UNAVAILABLE"
        assert "shutting down" in error.message()
        assert served.proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises it
    finally:
        client.stop_stream()
        client.close()
        _stop(served.proc)


def test_repository_rpcs_take_only_the_one_unnamed_repository(server: Server) -> None:
    """The empty ``repository_name`` (Triton's one-repository answer) is this server's
    repository; any other name is INVALID_ARGUMENT naming the field, over gRPC and on
    Triton's ``/v2/repository/{repository_name}/...`` routes, and changes nothing."""
    with grpc.insecure_channel(server.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(repository_name="", ready=True))
        assert "simple" in {m.name for m in index.models}
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="simple"))
        refused = [
            lambda: stub.RepositoryIndex(pb.RepositoryIndexRequest(repository_name="models")),
            lambda: stub.RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(repository_name="other", model_name="simple")
            ),
            lambda: stub.RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(repository_name="other", model_name="simple")
            ),
        ]
        for call in refused:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details().startswith("repository_name: "), info.value.details()
        assert stub.ModelReady(pb.ModelReadyRequest(name="simple")).ready  # not unloaded
    for path in ("models/index", "other/models/simple/load", "other/models/simple/unload"):
        r = httpx.post(f"http://{server.http}/v2/repository/{path}", timeout=30)
        assert r.status_code == 422, (path, r.text)
        assert r.json()["error"].startswith("repository_name: "), r.text  # v2's error shape
    assert httpx.get(f"http://{server.http}/v2/models/simple/ready", timeout=30).status_code == 200
