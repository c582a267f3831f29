"""Hostile input against a real ``gruserve serve``: every kind of bad request, on every
transport, answered with the right 4xx and a JSON error naming the field, never a 5xx,
the process staying up and its memory bounded.

One server (the repository's ``demo`` model, 1 feature) runs with a 256 KiB body limit
and 1000 timesteps, so every case fits in a short run:

- size: bodies over ``GRUSERVE_MAX_REQUEST_BYTES`` (with a ``Content-Length``, and chunked
  without one, 200 MB of them) answer 413 before the server has read them; requests over
  ``GRUSERVE_MAX_TIMESTEPS`` answer 413;
- values: ``NaN`` / ``Infinity`` / ``-Infinity`` literals, numbers beyond float32 (and beyond
  float64, and integers of thousands of digits), strings, booleans, objects and nulls where
  numbers go, 100k levels of nesting, and 1000 levels (which the JSON parser accepts but
  ``json.dumps``/``repr`` cannot print) answer 422 naming the offending field;
- transports: predict, session create and step (REST), the NDJSON stream (an error line:
  ``{"error": {..., "status"}, "line": n}``, then the stream ends), the WebSocket (an error
  message with ``"status"``, the connection staying open; close 1009 for an oversized
  message, 4404 for a session that does not exist), v2 infer in JSON and with binary tensors
  (wrong ``Inference-Header-Content-Length``, wrong sizes);
- memory: hundreds of rounds of the barrage after a warm-up move the server's RSS by less
  than 30 MiB (measured: a few), and 200 MB bodies do not move it.

Every test ends by checking that the server answers and has answered no 5xx at all
(``gruserve_http_requests_total``) nor logged an error.
"""

from __future__ import annotations

import gzip
import json
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))

from deploy_helpers import free_port, server_env, start_server, stop, wait_ready

pytestmark = pytest.mark.slow

LIMIT = 256 * 1024
MAX_TIMESTEPS = 1000
HUGE = 200 * 1024 * 1024
"""A body far over the limit: were it buffered, RSS would jump by about this much."""
EARLY = HUGE // 8
"""A 413 must come before the client has sent this much of ``HUGE`` (loopback socket
buffers hold a few MB, far less than this; measured: 1-3.5 MB sent when the 413 arrives)."""
RSS_GROWTH_MIB = 30
"""Bound on RSS growth over the measured rounds, after the warm-up: 100 KiB a round. A round
sends the server about 3 MiB (oversized, deep and bad bodies, most up to the 256 KiB limit),
so keeping any one of its bodies, or one WebSocket connection's state, per round would
pass it; what is left is allocator noise (measured: 1500 rounds after the warm-up plateau
stay within +-5 MiB)."""
WARMUP_ROUNDS = 400
"""Rounds before RSS is first read. The WebSocket client negotiates permessage-deflate (as
browsers do), so every connection allocates zlib state and inflates its messages; glibc
keeps the freed memory in its heap, and RSS climbs 55-60 MiB over the first ~400 rounds,
then stays flat (measured over 1500 rounds; with compression off it grows under 2 MiB).
The warm-up is that plateau: about 7 s."""
ROUNDS = 300
DEEP = b"[" * 100_000  # 100k levels: orjson stops at 1024, the fallback parser must not crash
TOO_MANY = [[0.5]] * (MAX_TIMESTEPS + 1)
HUGE_INT = b"1" + b"0" * 5000  # past float64, and past int()'s 4300-digit limit


def _nested(levels: int) -> bytes:
    """A value nested ``levels`` deep: orjson parses it, json.dumps and repr cannot print it."""
    return b"[" * levels + b"0" + b"]" * levels


DEEP_VALUE = _nested(1000)


# -- the server --------------------------------------------------------------------------------
class Server:
    """``gruserve serve`` with its output drained by a thread (a full pipe would block it)."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = server_env(
            GRUSERVE_MAX_REQUEST_BYTES=str(LIMIT),
            GRUSERVE_MAX_TIMESTEPS=str(MAX_TIMESTEPS),
        )
        self.proc: subprocess.Popen[bytes] = start_server(self.port, env, tmp)
        self.lines: list[str] = []
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()
        wait_ready(self.proc, self.port)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.decode(errors="replace"))

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        assert match, status
        return int(match.group(1)) / 1024

    def server_errors(self) -> dict[str, float]:
        """``gruserve_http_requests_total`` samples with a 5xx status."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        found = {}
        for line in text.splitlines():
            if line.startswith("gruserve_http_requests_total{") and 'status="5' in line:
                found[line.rsplit(" ", 1)[0]] = float(line.rsplit(" ", 1)[1])
        return found

    def assert_healthy(self) -> None:
        assert self.proc.poll() is None, "".join(self.lines)
        assert httpx.get(f"{self.url}/healthz", timeout=10).status_code == 200
        assert self.server_errors() == {}
        logged = [line for line in self.lines if "ERROR" in line or "Traceback" in line]
        assert not logged, "".join(self.lines)

    def close(self) -> None:
        stop(self.proc)  # the drain thread owns stdout: stop finds it read to its end
        self._drain.join(timeout=5)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("bad-input"))
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c
    server.assert_healthy()


def _session(client: httpx.Client) -> str:
    r = client.post("/v1/models/demo/sessions", json={})
    assert r.status_code == 201, r.text
    return str(r.json()["session_id"])


def _assert_error(r: httpx.Response, status: int, field: str | None, v2: bool = False) -> None:
    """A JSON error of ``status`` naming ``field`` (v2: the protocol's ``{"error": message}``,
    the message starting with the field)."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    if v2:
        assert isinstance(body["error"], str), body
        if field is not None:
            assert body["error"].startswith(f"{field}:"), (field, body)
        return
    error = body["error"]
    assert error["field"] == field, (field, error)
    kind = {413: "PayloadTooLarge", 422: "InvalidInput"}[status]
    assert error["type"] == kind and error["message"], error


# -- raw HTTP: bodies sent while the reply is watched for ---------------------------------------
class Pushed:
    """What :func:`push` saw: the reply and how much of the body had gone out by then."""

    def __init__(self, reply: bytes, sent: int) -> None:
        head, _, self.body = reply.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {
            k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])
        }
        self.sent = sent

    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


def push(
    port: int,
    path: str,
    size: int,
    chunked: bool,
    content_type: str = "application/json",
    done: Callable[[bytes], bool] | None = None,
) -> Pushed:
    """POST ``size`` bytes of ``[`` (chunked, or with a ``Content-Length`` of ``size``),
    writing only while the socket takes more and stopping as soon as the reply is complete
    (``done``; default: headers plus ``Content-Length`` bytes of body)."""
    if done is None:
        done = _complete
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setblocking(False)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    pending = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"{framing}\r\n\r\n"
    ).encode()
    piece = b"[" * 65536
    frame = b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
    sent, reply, writing = 0, b"", True
    deadline = time.monotonic() + 30
    try:
        while not done(reply):
            assert time.monotonic() < deadline, (sent, reply[:300])
            wanted = [sock] if writing and sent < size else []
            readable, writable, _ = select.select([sock], wanted, [], 1)
            if readable:  # reading first: the reply is what the test is about
                data = sock.recv(1 << 16)
                assert data, f"connection closed after {sent} bytes, reply {reply[:300]!r}"
                reply += data
            elif writable:
                if not pending:
                    pending = frame
                try:
                    n = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    writing = False  # the server stopped reading: read what it answered
                    continue
                pending = pending[n:]
                sent += n
    finally:
        sock.close()
    return Pushed(reply, sent)


def _complete(reply: bytes) -> bool:
    head, sep, body = reply.partition(b"\r\n\r\n")
    if not sep:
        return False
    match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    return match is not None and len(body) >= int(match.group(1))


def _ndjson_error_line(reply: bytes) -> bool:
    return b'"line"' in reply


def _ndjson_error(pushed: Pushed) -> dict[str, Any]:
    """The error line of a chunked NDJSON reply."""
    for line in re.split(rb"\r\n", pushed.body):
        if line.startswith(b"{"):
            parsed = json.loads(line)
            if "error" in parsed:
                return dict(parsed)
    raise AssertionError(pushed.body[:500])


# -- size ---------------------------------------------------------------------------------------
ROUTES = [
    "/v1/models/demo/predict",
    "/v1/models/demo/sessions",
    "/v1/sessions/{sid}/step",
    "/v1/sessions/{sid}/reset",
    "/v2/models/demo/infer",
]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_bodies_answer_413_before_they_are_read(
    server: Server, client: httpx.Client, chunked: bool
) -> None:
    sid = _session(client)
    before = server.rss_mib()
    for route in ROUTES:
        pushed = push(server.port, route.format(sid=sid), HUGE, chunked)
        assert pushed.status == 413, (route, pushed.body)
        assert pushed.headers["content-type"] == "application/json"
        assert pushed.sent < EARLY, (route, pushed.sent)  # answered long before the end
        message = pushed.json()["error"]
        if route.startswith("/v2"):
            assert "GRUSERVE_MAX_REQUEST_BYTES" in message
        else:
            assert message["type"] == "PayloadTooLarge", message
            assert "GRUSERVE_MAX_REQUEST_BYTES" in message["message"]
        if not chunked:  # refused from the header alone: the connection is not kept
            assert pushed.headers["connection"] == "close"
    # a stream has no overall limit, but a line over the limit ends it with a 413 line
    pushed = push(
        server.port,
        f"/v1/sessions/{sid}/stream",
        HUGE,
        chunked,
        content_type="application/x-ndjson",
        done=_ndjson_error_line,
    )
    assert pushed.status == 200 and pushed.sent < EARLY, pushed.sent
    error = _ndjson_error(pushed)
    assert error["line"] == 1 and error["error"]["status"] == 413, error
    assert server.rss_mib() - before < 16  # 200 MB bodies, six times: none of it kept


def test_a_body_of_just_the_limit_is_read(client: httpx.Client) -> None:
    """The limit is the limit: a padded body of exactly LIMIT bytes is parsed (and valid)."""
    body = b'{"inputs": [[[0.5]]]}'
    r = client.post(
        "/v1/models/demo/predict",
        content=body + b" " * (LIMIT - len(body)),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 200, r.text
    r = client.post(
        "/v1/models/demo/predict",
        content=body + b" " * (LIMIT + 1 - len(body)),
        headers={"content-type": "application/json"},
    )
    _assert_error(r, 413, None)


def test_a_compressed_v2_body_is_limited_once_inflated(client: httpx.Client) -> None:
    """tritonclient may gzip a request: 64 MiB of zeros in 64 KiB of gzip answers 413."""
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < LIMIT
    r = client.post(
        "/v2/models/demo/infer",
        content=bomb,
        headers={"content-encoding": "gzip", "content-type": "application/json"},
    )
    _assert_error(r, 413, None, v2=True)
    assert "inflated" in r.json()["error"]
    r = client.post(
        "/v2/models/demo/infer",
        content=bomb[: len(bomb) // 2],
        headers={"content-encoding": "gzip", "content-type": "application/json"},
    )
    _assert_error(r, 413, None, v2=True)  # the first half inflates past the limit too


# -- values -------------------------------------------------------------------------------------
# (name, body, status, field): a predict body is [batch][timesteps][features]
PREDICT = [
    ("nan", b'{"inputs": [[[0.5], [NaN]]]}', 422, "inputs[0][1][0]"),
    ("infinity", b'{"inputs": [[[0.5], [Infinity]]]}', 422, "inputs[0][1][0]"),
    ("-infinity", b'{"inputs": [[[-Infinity], [0.5]]]}', 422, "inputs[0][0][0]"),
    ("beyond float32", b'{"inputs": [[[0.5], [3.5e38]]]}', 422, "inputs[0][1][0]"),
    ("beyond -float32", b'{"inputs": [[[-1e39]]]}', 422, "inputs[0][0][0]"),
    ("beyond float64", b'{"inputs": [[[0.5], [1e400]]]}', 422, "inputs[0][1][0]"),
    ("5001-digit integer", b'{"inputs": [[[' + HUGE_INT + b"]]]}", 422, "inputs[0][0][0]"),
    ("string", b'{"inputs": [[[0.5], ["1"]]]}', 422, "inputs[0][1][0]"),
    ("bool", b'{"inputs": [[[true]]]}', 422, "inputs[0][0][0]"),
    ("object", b'{"inputs": [[[0.5], {"a": 1}]]}', 422, "inputs[0][1]"),
    ("null", b'{"inputs": [[[null]]]}', 422, "inputs[0][0][0]"),
    ("inputs a string", b'{"inputs": "[[[0.5]]]"}', 422, "inputs"),
    ("nested 100k", DEEP, 422, "body"),
    ("value nested 1000", b'{"inputs": {"a": ' + DEEP_VALUE + b"}}", 422, "inputs"),
    ("arrays 9 deep", b'{"inputs": ' + _nested(9) + b"}", 422, "inputs" + "[0]" * 8),
    ("timesteps", json.dumps({"inputs": [TOO_MANY]}).encode(), 413, None),
    ("mask string", b'{"inputs": [[[0.5]]], "mask": [["1"]]}', 422, "mask[0][0]"),
    (
        "return_state",
        b'{"inputs": [[[0.5]]], "return_state": ' + DEEP_VALUE + b"}",
        422,
        "return_state",
    ),
    (
        "state nan",
        b'{"inputs": [[[0.5]]], "initial_state": {"gru": [[NaN]]}}',
        422,
        "initial_state.gru[0][0]",
    ),
    ("unknown field", b'{"inputs": [[[0.5]]], "input": 1}', 422, "input"),
    ("not json", b"{inputs: 1}", 422, "body"),
    ("not utf-8", b'{"inputs": "\xff\xfe"}', 422, "body"),
]
# a step body is [timesteps][features] (or [features])
STEP = [
    ("nan", b'{"inputs": [[0.5], [NaN]]}', 422, "inputs[1][0]"),
    ("infinity", b'{"inputs": [Infinity]}', 422, "inputs[0]"),
    ("-infinity", b'{"inputs": [[-Infinity]]}', 422, "inputs[0][0]"),
    ("beyond float32", b'{"inputs": [[3.5e38]]}', 422, "inputs[0][0]"),
    ("beyond float64", b'{"inputs": [[-1e400]]}', 422, "inputs[0][0]"),
    ("5001-digit integer", b'{"inputs": [[' + HUGE_INT + b"]]}", 422, "inputs[0][0]"),
    ("string", b'{"inputs": [["0.5"]]}', 422, "inputs[0][0]"),
    ("bool", b'{"inputs": [[false]]}', 422, "inputs[0][0]"),
    ("object", b'{"inputs": [{"a": 1}]}', 422, "inputs[0]"),
    ("nested 100k", b'{"inputs": ' + DEEP, 422, "body"),
    ("value nested 1000", b'{"inputs": [[0.5]], "mask": {"a": ' + DEEP_VALUE + b"}}", 422, "mask"),
    ("timesteps", json.dumps({"inputs": TOO_MANY}).encode(), 413, None),
    ("step nan", b'{"inputs": [[0.5]], "step": NaN}', 422, "step"),
    ("step negative", b'{"inputs": [[0.5]], "step": -1}', 422, "step"),
    ("step string", b'{"inputs": [[0.5]], "step": "0"}', 422, "step"),
    ("step huge", b'{"inputs": [[0.5]], "step": ' + HUGE_INT + b"}", 422, "step"),
    ("step nested 1000", b'{"inputs": [[0.5]], "step": ' + DEEP_VALUE + b"}", 422, "step"),
    ("mask string", b'{"inputs": [[0.5]], "mask": ["x"]}', 422, "mask[0]"),
    ("body a list", b"[[0.5]]", 422, "body"),
]
CREATE = [
    ("id nested 1000", b'{"session_id": ' + DEEP_VALUE + b"}", 422, "session_id"),
    ("id a number", b'{"session_id": 42}', 422, "session_id"),
    ("state nan", b'{"initial_state": {"gru": [NaN]}}', 422, "initial_state.gru[0]"),
    (
        "state object",
        b'{"initial_state": {"gru": {"x": ' + DEEP_VALUE + b"}}}",
        422,
        "initial_state.gru",
    ),
]


def _v2(
    data: bytes,
    shape: bytes = b"[1, 1, 1]",
    datatype: bytes = b'"FP32"',
    parameters: bytes = b"{}",
    extra: bytes = b"",
) -> bytes:
    return (
        b'{"parameters": '
        + parameters
        + extra
        + b', "inputs": [{"name": "inputs", "shape": '
        + shape
        + b', "datatype": '
        + datatype
        + b', "data": '
        + data
        + b"}]}"
    )


V2 = [
    ("nan", _v2(b"[NaN]"), 422, "inputs[0].data[0]"),
    ("infinity", _v2(b"[0.5, Infinity]", b"[1, 2, 1]"), 422, "inputs[0].data[1]"),
    ("-infinity", _v2(b"[-Infinity]"), 422, "inputs[0].data[0]"),
    ("beyond float32", _v2(b"[3.5e38]"), 422, "inputs[0].data"),
    ("beyond float64", _v2(b"[1e400]"), 422, "inputs[0].data"),
    ("5001-digit integer", _v2(b"[" + HUGE_INT + b"]"), 422, "inputs[0].data"),
    ("string", _v2(b'["0.5"]'), 422, "inputs[0].data[0]"),
    ("bool", _v2(b"[true]"), 422, "inputs[0].data[0]"),
    ("object", _v2(b'[{"a": 1}]'), 422, "inputs[0].data[0]"),
    ("nested 100k", DEEP, 422, "body"),
    ("value nested 1000", _v2(b"[" + DEEP_VALUE + b"]"), 422, "inputs[0].data"),
    ("shape nested 1000", _v2(b"[0.5]", DEEP_VALUE), 422, "inputs[0].shape"),
    ("shape string", _v2(b"[0.5]", b'"1x1x1"'), 422, "inputs[0].shape"),
    ("datatype a list", _v2(b"[0.5]", datatype=b'["FP32"]'), 422, "inputs[0].datatype"),
    (
        "sequence_id nested 1000",
        _v2(b"[0.5]", parameters=b'{"sequence_id": ' + DEEP_VALUE + b"}"),
        422,
        "parameters.sequence_id",
    ),
    (
        "sequence_id a float",
        _v2(b"[0.5]", parameters=b'{"sequence_id": 1.5}'),
        422,
        "parameters.sequence_id",
    ),
    (
        "sequence_step nan",
        _v2(b"[0.5]", parameters=b'{"sequence_id": 7, "sequence_step": NaN}'),
        422,
        "parameters.sequence_step",
    ),
    ("id a number", _v2(b"[0.5]", extra=b', "id": 5'), 422, "id"),
    (
        "timesteps",
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "inputs",
                        "shape": [1, MAX_TIMESTEPS + 1, 1],
                        "datatype": "FP32",
                        "data": [0.5] * (MAX_TIMESTEPS + 1),
                    }
                ]
            }
        ).encode(),
        413,
        None,
    ),
]


@pytest.mark.parametrize(("name", "body", "status", "field"), PREDICT, ids=[c[0] for c in PREDICT])
def test_predict_rejects(
    client: httpx.Client, name: str, body: bytes, status: int, field: str | None
) -> None:
    r = client.post(
        "/v1/models/demo/predict", content=body, headers={"content-type": "application/json"}
    )
    _assert_error(r, status, field)


@pytest.mark.parametrize(("name", "body", "status", "field"), STEP, ids=[c[0] for c in STEP])
def test_step_rejects_and_leaves_the_session_as_it_was(
    client: httpx.Client, name: str, body: bytes, status: int, field: str | None
) -> None:
    sid = _session(client)
    r = client.post(
        f"/v1/sessions/{sid}/step", content=body, headers={"content-type": "application/json"}
    )
    _assert_error(r, status, field)
    assert client.get(f"/v1/sessions/{sid}").json()["step"] == 0
    assert client.post(f"/v1/sessions/{sid}/step", json={"inputs": [[0.5]]}).status_code == 200


@pytest.mark.parametrize(("name", "body", "status", "field"), CREATE, ids=[c[0] for c in CREATE])
def test_create_session_rejects(
    client: httpx.Client, name: str, body: bytes, status: int, field: str | None
) -> None:
    r = client.post(
        "/v1/models/demo/sessions", content=body, headers={"content-type": "application/json"}
    )
    _assert_error(r, status, field)


@pytest.mark.parametrize(("name", "body", "status", "field"), V2, ids=[c[0] for c in V2])
def test_v2_infer_rejects(
    client: httpx.Client, name: str, body: bytes, status: int, field: str | None
) -> None:
    r = client.post(
        "/v2/models/demo/infer", content=body, headers={"content-type": "application/json"}
    )
    _assert_error(r, status, field, v2=True)


def _binary_request(values: np.ndarray, size: int | None = None) -> tuple[bytes, bytes]:
    data = values.astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "inputs",
                    "shape": [1, values.size, 1],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(data) if size is None else size},
                }
            ]
        }
    ).encode()
    return header, data


def test_v2_binary_tensors_with_wrong_framing(client: httpx.Client) -> None:
    header, data = _binary_request(np.array([0.5, -0.5]))

    def infer(length: str, body: bytes = header + data) -> httpx.Response:
        return client.post(
            "/v2/models/demo/infer",
            content=body,
            headers={
                "Inference-Header-Content-Length": length,
                "content-type": "application/octet-stream",
            },
        )

    assert infer(str(len(header))).status_code == 200  # the framing right: it works
    hcl = "Inference-Header-Content-Length"
    _assert_error(infer(str(len(header) + len(data) + 1)), 422, hcl, v2=True)  # past the end
    _assert_error(infer("9" * 40), 422, hcl, v2=True)  # a number no int64 holds
    _assert_error(infer("-1"), 422, hcl, v2=True)
    _assert_error(infer("0x10"), 422, hcl, v2=True)
    _assert_error(infer(str(len(header) - 3)), 422, "body", v2=True)  # cuts the JSON short
    _assert_error(infer(str(len(header)), header + data + b"\0"), 422, "body", v2=True)  # extra
    _assert_error(infer(str(len(header)), header + data[:-1]), 422, "body", v2=True)  # short
    header4, _ = _binary_request(np.array([0.5, -0.5]), size=4)  # says 4 bytes for 2 floats
    field = "inputs[0].parameters.binary_data_size"
    _assert_error(infer(str(len(header4)), header4 + data), 422, field, v2=True)
    nan_header, nan_data = _binary_request(np.array([0.5, np.inf]))
    r = infer(str(len(nan_header)), nan_header + nan_data)
    _assert_error(r, 422, "inputs[0][1][0]", v2=True)
    many_header, many = _binary_request(np.zeros(MAX_TIMESTEPS + 1))
    _assert_error(infer(str(len(many_header)), many_header + many), 413, None, v2=True)


# -- NDJSON -------------------------------------------------------------------------------------
def test_ndjson_stream_answers_the_first_bad_line_and_stops(client: httpx.Client) -> None:
    sid = _session(client)
    good = b'{"inputs": [[0.5]]}\n'
    path = f"/v1/sessions/{sid}/stream"
    headers = {"content-type": "application/x-ndjson"}
    applied = 0
    for name, line, status, field in [*STEP, ("oversized", b"[" * (LIMIT + 10), 413, None)]:
        body = good + line.replace(b"\n", b" ") + b"\n" + good
        r = client.post(path, content=body, headers=headers)
        assert r.status_code == 200, (name, r.text)
        replies = [json.loads(x) for x in r.text.splitlines()]
        applied += 1
        assert len(replies) == 2 and replies[0]["step"] == applied, (name, replies)
        error = replies[1]
        assert error["line"] == 2, (name, error)  # the oversized line too: it is line 2
        assert (error["error"]["status"], error["error"]["field"]) == (status, field), (
            name,
            error,
        )
    assert client.get(f"/v1/sessions/{sid}").json()["step"] == applied  # nothing after an error


# -- WebSocket ----------------------------------------------------------------------------------
def _ws(server: Server, sid: str, numbered: bool = False) -> ClientConnection:
    protocols = ["gruserve-step"] if numbered else None
    return connect(
        f"ws://127.0.0.1:{server.port}/v1/sessions/{sid}/ws",
        subprotocols=protocols,  # type: ignore[arg-type]
        max_size=None,
        open_timeout=10,
    )


def _ws_error(ws: ClientConnection, message: str | bytes) -> dict[str, Any]:
    ws.send(message)
    reply = ws.recv(timeout=10)
    assert isinstance(reply, str), reply
    return dict(json.loads(reply)["error"])


BINARY = [
    ("3 bytes", b"\0\0\0", 422, "message"),
    ("empty", b"", 422, "message"),
    ("5 bytes", b"\0" * 5, 422, "message"),
    ("nan", np.array([0.5, np.nan], "<f4").tobytes(), 422, "inputs[1][0]"),
    ("-inf", np.array([-np.inf], "<f4").tobytes(), 422, "inputs[0][0]"),
    ("timesteps", np.zeros(MAX_TIMESTEPS + 1, "<f4").tobytes(), 413, None),
]


def test_websocket_answers_bad_messages_and_stays_open(
    server: Server, client: httpx.Client
) -> None:
    sid = _session(client)
    with _ws(server, sid) as ws:
        for name, body, status, field in STEP:
            error = _ws_error(ws, body.decode("utf-8"))
            assert (error["status"], error["field"]) == (status, field), (name, error)
        for name, data, status, field in BINARY:
            error = _ws_error(ws, data)
            assert (error["status"], error["field"]) == (status, field), (name, error)
        ws.send(np.array([0.5], "<f4").tobytes())  # still open, nothing applied before
        assert len(ws.recv(timeout=10)) == 4
        ws.send(b"\0" * (LIMIT + 4))  # over the limit: the WebSocket layer closes, 1009
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert client.get(f"/v1/sessions/{sid}").json()["step"] == 1
    with _ws(server, sid) as ws:
        ws.send("x" * (LIMIT + 1))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    with _ws(server, sid, numbered=True) as ws:  # gruserve-step: an 8-byte step number first
        error = _ws_error(ws, b"\0" * 4)
        assert (error["status"], error["field"]) == (422, "message"), error
        error = _ws_error(ws, struct.pack("<Q", 2**63) + np.zeros(1, "<f4").tobytes())
        assert (error["status"], error["field"]) == (422, "step"), error
    with _ws(server, "no-such-session") as ws:
        error = json.loads(ws.recv(timeout=10))["error"]
        assert (error["status"], error["type"]) == (404, "SessionNotFound"), error
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404


# -- memory -------------------------------------------------------------------------------------
def _body(cases: list[tuple[str, bytes, int, str | None]], name: str) -> bytes:
    return next(body for n, body, _, _ in cases if n == name)


def _barrage(server: Server, client: httpx.Client, sid: str) -> None:
    """One round: every kind of refused request once, bodies up to (and over) the limit."""
    json_type = {"content-type": "application/json"}
    for chunked in (False, True):
        pushed = push(server.port, "/v1/models/demo/predict", 4 * LIMIT, chunked)
        assert pushed.status == 413
    pushed = push(server.port, "/v2/models/demo/infer", 2 * LIMIT, True)
    assert pushed.status == 413
    for body in (DEEP, b'{"inputs": [[[0.5], [NaN]]]}', b'{"inputs": {"a": ' + DEEP_VALUE + b"}}"):
        r = client.post("/v1/models/demo/predict", content=body, headers=json_type)
        assert r.status_code == 422
    for body in (b'{"inputs": ' + DEEP, _body(STEP, "timesteps"), _body(STEP, "step huge")):
        r = client.post(f"/v1/sessions/{sid}/step", content=body, headers=json_type)
        assert r.status_code in (413, 422)
    for body in (DEEP, _body(V2, "nan"), _body(V2, "timesteps")):
        r = client.post("/v2/models/demo/infer", content=body, headers=json_type)
        assert r.status_code in (413, 422)
    r = client.post(
        f"/v1/sessions/{sid}/stream",
        content=b"[" * (LIMIT + 10),
        headers={"content-type": "application/x-ndjson"},
    )
    assert r.status_code == 200 and b'"status":413' in r.content
    with _ws(server, sid) as ws:
        _ws_error(ws, DEEP.decode())
        _ws_error(ws, b"\0\0\0")
        ws.send(b"\0" * (LIMIT + 4))
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)


def test_memory_stays_bounded_under_a_repeated_barrage(
    server: Server, client: httpx.Client
) -> None:
    sid = _session(client)
    for _ in range(WARMUP_ROUNDS):  # allocator plateau, metric children, caches
        _barrage(server, client, sid)
    warm = server.rss_mib()
    started = time.monotonic()
    for _ in range(ROUNDS):
        _barrage(server, client, sid)
    elapsed = time.monotonic() - started
    grown = server.rss_mib() - warm
    print(
        f"RSS {warm:.1f} MiB after warm-up, +{grown:.1f} MiB after {ROUNDS} rounds "
        f"({elapsed:.1f} s)"
    )
    assert grown < RSS_GROWTH_MIB, (warm, grown)
    # and the session the barrage aimed at was never stepped
    assert client.get(f"/v1/sessions/{sid}").json()["step"] == 0
