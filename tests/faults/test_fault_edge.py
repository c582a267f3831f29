"""The edge against an attacker, on a real ``gruserve serve`` (issue 16's findings).

- Work: a 4 MiB binary v2 body of a million one-step sequences asking for outputs and
  both final states as JSON (a 590 MB reply, 2.8 GiB of RSS before the limits), and a
  4 MiB JSON v1 predict of 699,000 sequences with ``return_state``, are refused with 413
  naming the setting; the server keeps answering ``/healthz`` meanwhile, and its peak RSS
  (``VmHWM``) grows by far less than such replies would take.
- Retries: a resent numbered step with other inputs answers 409 ``StepMismatch``.
- Ids: ``"trail\n"`` is no session id.
- HTTP: a 100 MiB header stream is cut off with 431 while another client's steps stay
  fast; connections with unfinished headers are closed after the header deadline; past
  the connection cap, a new connection is answered 503 at once.
- WebSocket: a message in millions of tiny or empty continuation frames closes with 1008.
- Tenants: another tenant's session does not exist for a key (fast step path, WebSocket,
  listing); ``/readyz`` without a key says only whether the server is ready.

Every test ends with the server alive, answering, and having answered no 5xx.
"""

from __future__ import annotations

import contextlib
import json
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))

from deploy_helpers import free_port, server_env, start_server, stop, wait_ready

pytestmark = pytest.mark.slow

BODY_LIMIT = 4 * 1024 * 1024  # GRUSERVE_MAX_REQUEST_BYTES's default, as in the issue
PEAK_GROWTH_MIB = 400
"""Bound on the growth of the server's peak RSS over the oversized requests. Before the
limits they took it from 122 MiB to 2,876 MiB; now the v2 body is refused from its shape
(measured: +10 MiB) and the v1 one after orjson has parsed its 4 MiB into Python lists
(measured: +150 MiB, bounded by the request byte limit, not by the work asked for)."""
STALL_S = 3.0
"""Bound on any one ``/healthz`` round trip while the oversized requests are handled
(before: 6.3 s; measured now: 0.25 s, the v1 body's JSON parse)."""


class Server:
    """``gruserve serve`` on the demo model, its output drained by a thread."""

    def __init__(self, tmp: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] = start_server(self.port, server_env(**env), tmp)
        self.lines: list[str] = []
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()
        wait_ready(self.proc, self.port)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.decode(errors="replace"))

    def memory_mib(self, field: str) -> float:
        """``VmRSS`` (now) or ``VmHWM`` (peak) of the server process."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(rf"^{field}:\s+(\d+) kB", status, re.M)
        assert match, status
        return int(match.group(1)) / 1024

    def assert_healthy(self) -> None:
        assert self.proc.poll() is None, "".join(self.lines)
        assert httpx.get(f"{self.url}/healthz", timeout=10).status_code == 200
        metrics = httpx.get(f"{self.url}/metrics", timeout=10).text
        server_errors = [
            line
            for line in metrics.splitlines()
            if line.startswith("gruserve_http_requests_total{") and 'status="5' in line
        ]
        assert server_errors == []
        logged = [line for line in self.lines if "ERROR" in line or "Traceback" in line]
        assert not logged, "".join(self.lines)

    def close(self) -> None:
        stop(self.proc)
        self._drain.join(timeout=5)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("edge"))
    try:
        yield running
    finally:
        running.close()


class Prober:
    """Polls ``/healthz`` from a thread and keeps the slowest round trip."""

    def __init__(self, url: str) -> None:
        self.url, self.slowest, self.count = url, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                assert client.get(f"{self.url}/healthz").status_code == 200
                self.slowest = max(self.slowest, time.monotonic() - started)
                self.count += 1
                self._stop.wait(0.02)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def _v2_million(batch: int = 1_048_400) -> tuple[bytes, str]:
    """The issue's v2 body: ``batch`` one-step sequences as binary, every output as JSON."""
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "inputs",
                    "shape": [batch, 1, 1],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 4 * batch},
                }
            ],
            "outputs": [
                {"name": "outputs", "parameters": {"binary_data": False}},
                {"name": "final_state/gru", "parameters": {"binary_data": False}},
                {"name": "final_state/gru_1", "parameters": {"binary_data": False}},
            ],
        }
    ).encode()
    return head + np.zeros(batch, np.float32).tobytes(), str(len(head))


def test_oversized_work_is_refused_before_it_runs(server: Server) -> None:
    v2_body, header_length = _v2_million()
    v1_body = b'{"return_state": true, "inputs": [' + b",".join([b"[[0]]"] * 699_000) + b"]}"
    assert len(v2_body) <= BODY_LIMIT and len(v1_body) <= BODY_LIMIT
    peak = server.memory_mib("VmHWM")
    with Prober(server.url) as prober, httpx.Client(base_url=server.url, timeout=60) as client:
        for _ in range(3):
            r = client.post(
                "/v2/models/demo/infer",
                content=v2_body,
                headers={"Inference-Header-Content-Length": header_length},
            )
            assert r.status_code == 413, r.text[:300]
            assert "GRUSERVE_MAX_BATCH_TIMESTEPS" in r.json()["error"]
            r = client.post("/v1/models/demo/predict", content=v1_body)
            assert r.status_code == 413, r.text[:300]
            error = r.json()["error"]
            assert error["type"] == "PayloadTooLarge"
            assert "699000" in error["message"]
            assert "GRUSERVE_MAX_BATCH_TIMESTEPS" in error["message"]
    assert prober.count > 0 and prober.slowest < STALL_S, prober.slowest
    assert server.memory_mib("VmHWM") - peak < PEAK_GROWTH_MIB
    server.assert_healthy()


def test_large_accepted_batches_answer_in_full(server: Server) -> None:
    """Under both limits: 60,000 sequence-steps in 8 chunks, and a 20,000-sequence reply
    with states (980,000 values), each equal row for row to the same sequences sent alone."""
    rng = np.random.default_rng(16)
    x = rng.normal(40, 30, size=(6_000, 10, 1)).round(3)
    with httpx.Client(base_url=server.url, timeout=120) as client:
        r = client.post("/v1/models/demo/predict", json={"inputs": x.tolist()})
        assert r.status_code == 200, r.text[:300]
        outputs = np.asarray(r.json()["outputs"])
        for row in (0, 4_095, 5_999):  # first chunk, a chunk boundary, last chunk
            alone = client.post("/v1/models/demo/predict", json={"inputs": [x[row].tolist()]})
            np.testing.assert_allclose(outputs[row], alone.json()["outputs"][0], atol=1e-5)
        one_step = {"inputs": x[:, :1].tolist() * 4, "return_state": True}  # 24,000
        r = client.post("/v1/models/demo/predict", json=one_step)
        assert r.status_code == 413 and "GRUSERVE_MAX_REPLY_VALUES" in r.text, r.text[:300]
        one_step["inputs"] = one_step["inputs"][:20_000]
        r = client.post("/v1/models/demo/predict", json=one_step)
        assert r.status_code == 200, r.text[:300]
        states = r.json()["states"]
        assert [len(states["gru"]), len(states["gru"][0]), len(states["gru_1"][0])] == [
            20_000,
            32,
            16,
        ]
    server.assert_healthy()


def test_a_resend_with_other_inputs_is_refused(server: Server) -> None:
    """Finding 4: the same step number with other inputs gets 409, not the kept reply."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        sid = client.post("/v1/models/demo/sessions", json={}).json()["session_id"]
        url = f"/v1/sessions/{sid}/step"
        first = client.post(url, json={"inputs": [[5.0], [11.0]], "step": 0})
        assert first.status_code == 200, first.text
        resend = client.post(url, json={"inputs": [[5.0], [11.0]], "step": 0})
        assert resend.content == first.content
        other = client.post(url, json={"inputs": [[6.0], [11.0]], "step": 0})
        assert other.status_code == 409, other.text
        error = other.json()["error"]
        assert (error["type"], error["field"], error["current_step"]) == ("StepMismatch", "step", 1)
        assert "step=0" in error["message"]
        assert client.get(f"/v1/sessions/{sid}").json()["step"] == 1
    server.assert_healthy()


def test_ids_with_a_trailing_newline_are_refused(server: Server) -> None:
    """Finding 6: ``"trail\\n"`` is no session id (nor a cursor); a v2 sequence id with one
    is kept apart from ``"trail"`` (hashed, as every id outside the readable alphabet)."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post("/v1/models/demo/sessions", json={"session_id": "trail\n"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "session_id", r.text
        assert client.get("/v1/sessions", params={"cursor": "trail\n"}).status_code == 422
        ids = []
        for sequence_id in ("trail", "trail\n"):
            body = {
                "inputs": [{"name": "inputs", "shape": [1, 1, 1], "datatype": "FP32", "data": [1]}],
                "parameters": {"sequence_id": sequence_id, "sequence_start": True},
            }
            r = client.post("/v2/models/demo/infer", json=body)
            assert r.status_code == 200, r.text
            ids.append(r.json()["parameters"]["session_id"])
        assert ids[0] == "v2:demo:s:trail" and ids[1].startswith("v2:demo:h:"), ids
    server.assert_healthy()


# -- HTTP: header blocks and connections --------------------------------------------------------
HEADER_STREAM = 100 * 1024 * 1024
"""What the issue streamed as one header (step latency went from 2.5 ms to 4.3 s)."""


def _stream_header(port: int) -> tuple[bytes, int]:
    """Stream one endless header value until the server answers; the reply and bytes sent."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    with sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: edge\r\nX-Junk: ")
        chunk, sent = b"a" * 65536, 0
        while sent < HEADER_STREAM:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
            if select.select([sock], [], [], 0)[0]:
                break
        reply = b""
        with contextlib.suppress(ConnectionResetError):
            while data := sock.recv(65536):
                reply += data
        return reply, sent


def _step_seconds(client: httpx.Client, url: str, rounds: int) -> list[float]:
    took = []
    for _ in range(rounds):
        started = time.monotonic()
        r = client.post(url, json={"inputs": [[1.0]]})
        assert r.status_code == 200, r.text
        took.append(time.monotonic() - started)
    return took


def test_a_header_stream_is_cut_off_with_431(server: Server) -> None:
    """Finding 2: a 100 MiB header stream gets 431 after about 64 KiB (the default limit),
    and another client's steps meanwhile stay fast."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        sid = client.post("/v1/models/demo/sessions", json={}).json()["session_id"]
        url = f"/v1/sessions/{sid}/step"
        streams = []
        threads = [
            threading.Thread(target=lambda: streams.append(_stream_header(server.port)))
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        during = _step_seconds(client, url, 40)
        for thread in threads:
            thread.join(timeout=60)
    assert len(streams) == 4
    for reply, sent in streams:
        assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
        assert b"GRUSERVE_MAX_HEADER_BYTES" in reply and b"connection: close" in reply
        assert sent < 16 * 1024 * 1024, sent  # cut off early, not at the end of the stream
    assert sorted(during)[len(during) // 2] < STALL_S, during
    server.assert_healthy()


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with a short header deadline and few connections allowed."""
    running = Server(
        tmp_path_factory.mktemp("strict"),
        GRUSERVE_HEADER_TIMEOUT_S="1",
        GRUSERVE_MAX_CONNECTIONS="120",
    )
    try:
        yield running
    finally:
        running.close()


def _unfinished(port: int, count: int) -> list[socket.socket]:
    """``count`` connections that each start a request and never finish its headers."""
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: edge\r\nX-Slow: 1")
        held.append(sock)
    return held


def test_unfinished_headers_are_closed_after_the_deadline(strict: Server) -> None:
    """Finding 2: connections that never finish their headers (and one that sends nothing)
    are closed once the header deadline (1 s here) passes; nothing is answered on them."""
    held = _unfinished(strict.port, 100)
    held.append(socket.create_connection(("127.0.0.1", strict.port), timeout=30))
    try:
        for sock in held:
            assert sock.recv(1024) == b""  # closed by the server, well within the timeout
    finally:
        for sock in held:
            sock.close()
    strict.assert_healthy()


def test_connections_past_the_cap_are_refused_at_once(strict: Server) -> None:
    """Finding 2: with 120 connections open, the next is answered 503 at once, and once
    they go, the server answers again."""
    held = _unfinished(strict.port, 120)
    try:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", strict.port), timeout=30) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n")
            reply = extra.recv(65536)
        assert time.monotonic() - started < STALL_S
        assert reply.startswith(b"HTTP/1.1 503 "), reply[:200]
        assert b"TooManyConnections" in reply and b"GRUSERVE_MAX_CONNECTIONS" in reply
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10  # the server sees the closes as its loop gets to them
    while True:
        try:
            if httpx.get(f"{strict.url}/healthz", timeout=10).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not answer after the cap freed"
        time.sleep(0.1)
    strict.assert_healthy()


# -- WebSocket: continuation floods ---------------------------------------------------------------
def _websocket(port: int, path: str) -> socket.socket:
    """A raw WebSocket connection, handshake done (no extensions: plain frames)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: edge\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _close_code(sock: socket.socket) -> int:
    """The code of the close frame the server sends, after any other frames it sends first."""
    data = b""
    while True:
        received = sock.recv(65536)
        assert received, "the server closed without a close frame"
        data += received
        while len(data) >= 2:
            length, at = data[1] & 0x7F, 2
            if length == 126:
                length, at = int.from_bytes(data[2:4], "big"), 4
            elif length == 127:
                length, at = int.from_bytes(data[2:10], "big"), 10
            if len(data) < at + length:
                break
            if data[0] == 0x88:  # a final close frame
                return int.from_bytes(data[at : at + 2], "big")
            data = data[at + length :]


@pytest.mark.parametrize("payload", [b"", b"y"], ids=["empty", "one byte"])
def test_a_continuation_flood_is_cut_off(server: Server, payload: bytes) -> None:
    """Finding 3: a message sent as millions of one-byte (or empty) continuation frames is
    closed with 1008 after GRUSERVE_WS_MAX_FRAMES of them; the server stays fast and small."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        sid = client.post("/v1/models/demo/sessions", json={}).json()["session_id"]
    rss = server.memory_mib("VmRSS")
    key = b"\x11\x22\x33\x44"
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    continuation = bytes((0x00, 0x80 | len(payload))) + key + masked
    batch = continuation * 10_000
    sent = 0
    with _websocket(server.port, f"/v1/sessions/{sid}/ws") as sock:
        sock.sendall(bytes((0x02, 0x80 | len(payload))) + key + masked)  # binary, not final
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < 4_000_000 and not select.select([sock], [], [], 0)[0]:
                sock.sendall(batch)
                sent += 10_000
        assert _close_code(sock) == 1008
    assert sent < 1_000_000, sent  # cut off early (the server reads its buffer at most)
    assert server.memory_mib("VmRSS") - rss < 50
    server.assert_healthy()


# -- tenants -----------------------------------------------------------------------------------
ACME, BETA, OPS = "k-acme-5e1f", "k-beta-c40d", "k-ops-9b27"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(
        tmp_path_factory.mktemp("keyed"),
        GRUSERVE_API_KEYS=f"acme:{ACME},beta:{BETA},ops:{OPS}:admin",
    )
    try:
        yield running
    finally:
        running.close()


def test_a_tenant_cannot_see_or_drive_anothers_session(keyed: Server) -> None:
    """Finding 5 (on the server's own fast step path and its WebSocket), and finding 6's
    ``/readyz``: without a key it says ready and nothing else."""
    assert httpx.get(f"{keyed.url}/readyz", timeout=10).json() == {"status": "ready"}
    acme, beta, ops = ({"x-api-key": key} for key in (ACME, BETA, OPS))
    with httpx.Client(base_url=keyed.url, timeout=30) as client:
        r = client.post("/v1/models/demo/sessions", json={"session_id": "station-7"}, headers=acme)
        assert r.status_code == 201, r.text
        step = {"inputs": [[5.0]], "step": 0}
        r = client.post("/v1/sessions/station-7/step", json=step, headers=beta)
        assert r.status_code == 404 and r.json()["error"]["type"] == "SessionNotFound"
        with _websocket_as(keyed.port, "/v1/sessions/station-7/ws", BETA) as sock:
            assert _close_code(sock) == 4404
        assert client.get("/v1/sessions", headers=beta).json()["sessions"] == []
        r = client.post("/v1/sessions/station-7/step", json=step, headers=acme)
        assert r.status_code == 200 and r.json()["step"] == 1
        r = client.post("/v1/models/demo/sessions", json={"session_id": "station-7"}, headers=beta)
        assert r.status_code == 201  # beta's own station-7: no 409, nothing of acme's told
        listed = client.get("/v1/sessions", headers=ops).json()["sessions"]
        assert [s["session_id"] for s in listed] == ["acme~station-7", "beta~station-7"]
        assert "models" in client.get("/readyz", headers=ops).json()
    keyed.assert_healthy()


def _websocket_as(port: int, path: str, key: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: edge\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"X-API-Key: {key}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock
