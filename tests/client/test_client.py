"""gruserve.client against real ``gruserve serve`` processes (the demo model).

The client is checked with stock httpx calls (the server's own view: step counts, states,
one ``predict`` over the whole sequence), never with itself. Faults are real: a proxy
that loses every 5th reply after the server applied the request, one that holds replies
past the client's timeout, and a replica on Redis killed with ``kill -9`` mid-stream.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any, assert_type

import httpx
import numpy as np
import pytest
from client_helpers import Failover, ReplyDropper, array, with_states

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))

from fault_helpers import (
    free_port,
    replicas,
    running_redis,
    server_env,
    serving,
)

from gruserve.client import (
    ApiError,
    AsyncClient,
    Client,
    ConnectionLost,
    InvalidInput,
    ModelNotFound,
    Outputs,
    Session,
    SessionExists,
    SessionNotFound,
    StepOutOfOrder,
)
from gruserve.client import errors as client_errors

KEY = "client-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
ATOL = RTOL = 1e-5  # demo outputs are in raw sunspot units (tens): float32 holds ~7 digits


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One ``gruserve serve`` (memory store) with an API key, for the module."""
    yield from serving(server_env(GRUSERVE_API_KEYS=KEY), tmp_path_factory.mktemp("client"))


def _chunks(rng: np.random.Generator, steps: int) -> list[np.ndarray]:
    """``steps`` chunks of 1-3 timesteps of demo inputs ([t, 1], the sunspot range)."""
    return [
        rng.uniform(0, 200, size=(int(rng.integers(1, 4)), 1)).astype(np.float32)
        for _ in range(steps)
    ]


def _predict(url: str, x: np.ndarray, headers: dict[str, str] | None = AUTH) -> Any:
    reply = httpx.post(
        f"{url}/v1/models/demo/predict",
        json={"inputs": [x.tolist()], "return_state": True},
        headers=headers,
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


def _info(url: str, session_id: str, headers: dict[str, str] | None = AUTH) -> Any:
    reply = httpx.get(
        f"{url}/v1/sessions/{session_id}",
        params={"include_state": "true"},
        headers=headers,
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


def _replays(url: str, headers: dict[str, str] | None = AUTH) -> float:
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    prefix = "gruserve_step_replays_total "
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def _assert_applied_once(
    url: str,
    session_id: str,
    chunks: list[np.ndarray],
    outputs: list[np.ndarray],
    headers: dict[str, str] | None = AUTH,
) -> None:
    """The server applied exactly ``chunks``, in order, each once, and the client was given
    the outputs of one predict call over their concatenation."""
    x = np.concatenate(chunks)
    expected = _predict(url, x, headers)
    info = _info(url, session_id, headers)
    assert (info["step"], info["timesteps"]) == (len(chunks), len(x))
    for key, value in expected["states"].items():
        np.testing.assert_allclose(info["states"][key], value[0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        np.concatenate(outputs), expected["outputs"][0], rtol=RTOL, atol=ATOL
    )


# -- the API ---------------------------------------------------------------------------------
def test_the_client_needs_only_the_base_install() -> None:
    """Importing it loads no training stack and not the server: a client machine needs
    neither."""
    probe = (
        "import sys, gruserve.client; "
        "print(sorted(m for m in ('torch', 'keras', 'onnx', 'fastapi', 'uvicorn') "
        "if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_a_session_steps_streams_resets_and_deletes(server: str) -> None:
    rng = np.random.default_rng(1)
    chunks = _chunks(rng, 12)
    with Client(server, api_key=KEY) as c:
        s = c.create_session("demo", session_id="api-1")
        assert (s.session_id, s.model, s.version, s.step_number) == ("api-1", "demo", 1, 0)
        outputs = [array(s.step(x)) for x in chunks[:4]]
        assert s.step_number == 4
        outputs += [array(y) for y in s.stream(chunks[4:8])]  # one WebSocket, binary frames
        assert s.step_number == 8
        outputs += [array(s.step(x)) for x in chunks[8:]]  # numbering carries over
        assert all(
            o.dtype == np.float32 and o.shape == x.shape
            for o, x in zip(outputs, chunks, strict=True)
        )
        _assert_applied_once(server, "api-1", chunks, outputs)

        one = array(s.step(np.array([95.0])))  # [features] in, [D] out, as the server answers
        assert one.shape == (1,)
        (streamed,) = s.stream([np.array([95.0], np.float32)])
        assert array(streamed).shape == (1,) and s.step_number == 14

        info = s.info(include_state=True)
        assert info["step"] == 14 and set(info["states"]) == {"gru", "gru_1"}
        assert s.reset()["step"] == 0 and s.step_number == 0
        np.testing.assert_allclose(_info(server, "api-1")["states"]["gru"], 0.0)
        s.step(chunks[0])
        assert _info(server, "api-1")["step"] == 1
        s.delete()
        assert httpx.get(f"{server}/v1/sessions/api-1", headers=AUTH).status_code == 404


def test_attach_reads_the_step_count_and_continues(server: str) -> None:
    chunks = _chunks(np.random.default_rng(2), 6)
    with Client(server, api_key=KEY) as c:
        first = c.create_session("demo")  # an id made by the client
        outputs = [array(first.step(x)) for x in chunks[:3]]
        attached = c.session(first.session_id)
        assert attached.step_number == 3
        outputs += [array(attached.step(x)) for x in chunks[3:]]
        _assert_applied_once(server, first.session_id, chunks, outputs)
        with pytest.raises(StepOutOfOrder) as stale:  # the first object missed 3 steps
            first.step(chunks[0])
        assert stale.value.current_step == 6 and stale.value.status == 409
        first.delete()


def test_initial_state_and_predict_with_states(server: str) -> None:
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 200, size=(5, 1)).astype(np.float32)
    initial = {"gru": rng.normal(size=32), "gru_1": rng.normal(size=16)}
    with Client(server, api_key=KEY) as c:
        s = c.create_session("demo", initial_state=initial)
        # the return types follow return_state and end (the suite's mypy checks these)
        stepped = array(assert_type(s.step(x), Outputs))
        answered = c.predict(
            "demo",
            x[None],
            initial_state={k: v[None] for k, v in initial.items()},
            return_state=True,
        )
        outputs, states = with_states(assert_type(answered, tuple[Outputs, dict[str, np.ndarray]]))
        plain = array(assert_type(c.predict("demo", np.stack([x, x])), Outputs))
        s.delete()
    raw = httpx.post(
        f"{server}/v1/models/demo/predict",
        json={
            "inputs": [x.tolist()],
            "initial_state": {k: [v.astype(np.float32).tolist()] for k, v in initial.items()},
            "return_state": True,
        },
        headers=AUTH,
    ).json()
    np.testing.assert_allclose(outputs[0], raw["outputs"][0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(stepped, raw["outputs"][0], rtol=RTOL, atol=ATOL)
    for key in initial:
        np.testing.assert_allclose(states[key], raw["states"][key], rtol=RTOL, atol=ATOL)
    assert plain.shape == (2, 5, 1)
    np.testing.assert_allclose(plain[1], _predict(server, x)["outputs"][0], rtol=RTOL, atol=ATOL)


def test_errors_are_typed_with_the_servers_type_and_message(server: str) -> None:
    with Client(server, api_key=KEY, retries=0) as c:
        with pytest.raises(ModelNotFound) as unknown:
            c.create_session("no-such-model")
        assert unknown.value.status == 404 and "no-such-model" in unknown.value.message
        s = c.create_session("demo", session_id="typed-1")
        assert c.create_session("demo", session_id="typed-1").step_number == 0  # a resend
        c.create_session("demo", session_id="typed-2").step([[1.0]])
        with pytest.raises(SessionExists):  # stepped: no longer what this create made
            c.create_session("demo", session_id="typed-2")
        with pytest.raises(InvalidInput) as bad:
            s.step([[1.0, 2.0]])
        assert bad.value.field == "inputs" and bad.value.status == 422
        assert "1 features per timestep" in bad.value.message
        with pytest.raises(InvalidInput) as nan:
            s.step([[float("nan")]])
        assert nan.value.field == "inputs[0][0]"
        assert s.step_number == 0 and _info(server, "typed-1")["step"] == 0  # nothing applied
        with pytest.raises(ValueError, match="1 features per timestep"):
            next(s.stream([np.zeros((1, 2))]))  # caught before it is sent
        s.delete()
        with pytest.raises(SessionNotFound) as gone:
            s.step([[1.0]])
        assert gone.value.type == "SessionNotFound" and gone.value.status == 404
        with pytest.raises(SessionNotFound):
            c.session("typed-1")
        with pytest.raises(SessionNotFound):  # the WebSocket's error message, then 4404
            list(s.stream([[1.0]]))
    with Client(server, retries=0) as anonymous, pytest.raises(client_errors.MissingApiKey):
        anonymous.predict("demo", [[[1.0]]])
    with Client(server, api_key=KEY) as c:
        described = c.create_session("demo").info()
    with Client(server, api_key="wrong", retries=0) as c:
        with pytest.raises(client_errors.InvalidApiKey) as refused:
            c.predict("demo", [[[1.0]]])
        assert isinstance(refused.value, ApiError) and refused.value.status == 403
        wrong_key = Session(c, described)
        with pytest.raises(client_errors.InvalidApiKey):  # the refused WebSocket handshake
            list(wrong_key.stream([[1.0]]))


@pytest.mark.parametrize(
    "body", [b"<html>502 Bad Gateway</html>", bytearray(b"<html>502 Bad Gateway</html>")]
)
def test_a_reply_that_is_not_gruserves_error_is_an_http_error_with_its_text(
    body: bytes | bytearray,
) -> None:
    """A proxy's page in front of the server (the WebSocket client hands a refused
    handshake's body over as a bytearray): its text, not its bytes, is the message."""
    error = client_errors.api_error(502, body)
    assert type(error) is ApiError and error.type == "HTTPError" and error.status == 502
    assert error.message == "<html>502 Bad Gateway</html>"


def test_no_server_raises_connection_lost_after_the_retries() -> None:
    port = free_port()  # nothing listens there
    with Client(f"http://127.0.0.1:{port}", retries=2) as c:
        with pytest.raises(ConnectionLost) as lost:
            c.create_session("demo")
        assert lost.value.attempts == 3
        assert isinstance(lost.value.__cause__, httpx.ConnectError)


# -- faults ----------------------------------------------------------------------------------
@pytest.mark.parametrize("hold", [False, True], ids=["dropped", "timed-out"])
def test_100_steps_through_a_proxy_losing_every_5th_reply_apply_once(
    server: str, hold: bool
) -> None:
    chunks = _chunks(np.random.default_rng(4), 100 if not hold else 25)
    replays_before = _replays(server)
    with closing(ReplyDropper(int(server.rsplit(":", 1)[1]), every=5, hold=hold)) as proxy:
        with Client(proxy.url, api_key=KEY, timeout=1.5 if hold else 5.0, retries=8) as c:
            s = c.create_session("demo", session_id=f"dropped-{hold}")
            outputs = [array(s.step(x)) for x in chunks]
        assert s.step_number == len(chunks)
        assert proxy.dropped >= len(chunks) // 5
    _assert_applied_once(server, s.session_id, chunks, outputs)
    # the steps whose replies were lost had been applied: their resends were replays
    assert _replays(server) - replays_before >= len(chunks) // 5 - 1


def test_async_client_through_a_proxy_losing_every_5th_reply(server: str) -> None:
    chunks = _chunks(np.random.default_rng(5), 40)

    async def run(url: str) -> tuple[str, list[np.ndarray], list[np.ndarray]]:
        async with AsyncClient(url, api_key=KEY, timeout=5.0, retries=5) as c:
            s = await c.create_session("demo")
            outputs = [array(assert_type(await s.step(x), Outputs)) for x in chunks[:30]]
            streamed = [array(y) async for y in s.stream(chunks[30:])]
            assert s.step_number == 40 and (await s.info())["step"] == 40
            attached = await c.session(s.session_id)
            assert attached.step_number == 40
            with pytest.raises(InvalidInput):
                await s.step([[1.0, 2.0]])
            with pytest.raises(ModelNotFound):
                await c.predict("nope", [[[1.0]]])
            return s.session_id, outputs, streamed

    with closing(ReplyDropper(int(server.rsplit(":", 1)[1]), every=5)) as proxy:
        # the stream goes through the proxy's HTTP parser too: only its handshake is HTTP
        session_id, outputs, streamed = asyncio.run(run(proxy.url))
        assert proxy.dropped >= 6
    _assert_applied_once(server, session_id, chunks, outputs + streamed)


@pytest.mark.slow
def test_a_stream_resumes_on_another_replica_after_kill_9(tmp_path: Path) -> None:
    """Two replicas on one Redis behind a failover proxy; the one serving the stream's
    WebSocket is killed mid-stream; the stream reconnects (to the survivor) and resumes."""
    chunks = _chunks(np.random.default_rng(6), 60)
    with (
        running_redis(tmp_path / "redis", durable=True) as redis,
        replicas(1, server_env(redis.url), tmp_path) as [victim],
        replicas(1, server_env(redis.url), tmp_path) as [survivor],
        closing(Failover([victim.port, survivor.port])) as proxy,
        Client(proxy.url, timeout=5.0, retries=6) as c,
    ):
        s = c.create_session("demo", session_id="kill-stream")
        outputs = []
        for i, y in enumerate(s.stream(chunks)):
            outputs.append(array(y))
            if i == 19:
                victim.kill()
        assert s.step_number == 60
        assert proxy.connections[survivor.port] >= 1
        _assert_applied_once(survivor.url, "kill-stream", chunks, outputs, headers=None)

        async def resume_async() -> list[np.ndarray]:  # the async stream, same failover
            async with AsyncClient(proxy.url, retries=6) as ac:
                again = await ac.session("kill-stream")
                return [array(y) async for y in again.stream(chunks[:5])]

        more = asyncio.run(resume_async())
        assert _info(survivor.url, "kill-stream", None)["step"] == 65
        assert len(more) == 5
