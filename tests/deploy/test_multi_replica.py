"""Three ``gruserve serve`` replicas on one Redis behind a real nginx running the repository's
configuration (deploy/nginx/gruserve.conf and upstream-compose.conf): sessions that hop
between replicas request by request still give exactly what one process gives; nginx keeps
each session on one replica and spreads the requests that name none; a replica stops and
its sessions go on elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from deploy_helpers import (
    NdjsonStream,
    find_nginx,
    free_port,
    nginx,
    reference,
    server_env,
    start_server,
    stop,
    upstreams_by_uri,
    wait_ready,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

ATOL = RTOL = 1e-5  # outputs are in raw sunspot units (tens): float32 holds ~7 digits
REPLICAS = 3
SURVIVOR = "/v1/sessions/survivor/step"


class Cluster:
    def __init__(
        self, lb: str, replicas: list[str], procs: list[subprocess.Popen[bytes]], log: Path
    ) -> None:
        self.lb, self.replicas, self.procs, self.access_log = lb, replicas, procs, log
        self.client = httpx.Client(base_url=f"http://{lb}", timeout=10)

    def reference(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Outputs [T, 1] and final states of one predict call on one running replica, no
        nginx (the failover test stops one)."""
        pairs = zip(self.replicas, self.procs, strict=True)
        running = next(replica for replica, proc in pairs if proc.poll() is None)
        return reference(f"http://{running}", x, timeout=10)

    def create(self, sid: str) -> None:
        reply = self.client.post("/v1/models/demo/sessions", json={"session_id": sid})
        assert reply.status_code == 201, reply.text

    def states(self, sid: str) -> dict[str, np.ndarray]:
        reply = self.client.get(f"/v1/sessions/{sid}", params={"include_state": "true"})
        assert reply.status_code == 200, reply.text
        return {k: np.asarray(v) for k, v in reply.json()["states"].items()}


@pytest.fixture(scope="module")
def cluster(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    find_nginx()
    workdir = tmp_path_factory.mktemp("cluster")
    ports = [free_port() for _ in range(REPLICAS)]
    env = server_env(redis_server)
    procs = [start_server(port, env, workdir) for port in ports]
    try:
        for proc, port in zip(procs, ports, strict=True):
            wait_ready(proc, port)
        with nginx(ports, workdir / "nginx") as (lb, access_log):
            cluster = Cluster(lb, [f"127.0.0.1:{p}" for p in ports], procs, access_log)
            yield cluster
            cluster.client.close()
    finally:
        for proc in procs:
            stop(proc)


def _sequence(rng: np.random.Generator, timesteps: int) -> np.ndarray:
    return rng.uniform(0, 200, size=(timesteps, 1)).astype(np.float32)


def _assert_close(got: Any, expected: np.ndarray) -> None:
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), expected, rtol=RTOL, atol=ATOL)


def test_sessions_hop_between_replicas_and_match_one_process(cluster: Cluster) -> None:
    """Each step goes to the next replica directly (nginx would keep a session on one): every
    step is continued by a replica that did not write the session last."""
    rng = np.random.default_rng(7)
    chunks = [1, 3, 2, 1, 1, 2, 3, 1, 2, 1]  # timesteps per step
    sids = [f"rr-{i}" for i in range(4)]
    xs = {sid: _sequence(rng, sum(chunks)) for sid in sids}
    for sid in sids:
        cluster.create(sid)
    outputs: dict[str, list[Any]] = {sid: [] for sid in sids}
    start = 0
    with contextlib.ExitStack() as clients:
        replicas = [
            clients.enter_context(httpx.Client(base_url=f"http://{r}", timeout=10))
            for r in cluster.replicas
        ]
        for step, size in enumerate(chunks, start=1):  # sessions interleaved
            for n, sid in enumerate(sids):
                chunk = xs[sid][start : start + size]
                replica = replicas[(step + n) % len(replicas)]
                reply = replica.post(f"/v1/sessions/{sid}/step", json={"inputs": chunk.tolist()})
                assert reply.status_code == 200, reply.text
                assert reply.json()["step"] == step
                outputs[sid].extend(reply.json()["outputs"])
            start += size

    for sid in sids:
        expected, states = cluster.reference(xs[sid])
        _assert_close(outputs[sid], expected)
        got = cluster.states(sid)
        assert got.keys() == states.keys()
        for key in states:
            np.testing.assert_allclose(got[key], states[key], atol=ATOL)


def test_nginx_keeps_each_session_on_one_replica_and_spreads_the_rest(cluster: Cluster) -> None:
    """The shipped upstream hashes on the session in the path: every request naming a session
    (steps, its state, a reset) reaches one replica, while sessions spread over the replicas
    and requests that name none (creates, bulk steps) go round robin."""
    sids = [f"sticky-{i}" for i in range(24)]
    for sid in sids:
        cluster.create(sid)
    x = np.ones((1, 1), np.float32)
    for _ in range(3):
        for sid in sids:
            reply = cluster.client.post(f"/v1/sessions/{sid}/step", json={"inputs": x.tolist()})
            assert reply.status_code == 200, reply.text
    for sid in sids[:4]:
        cluster.states(sid)
        reply = cluster.client.post(f"/v1/sessions/{sid}/reset", json={})
        assert reply.status_code == 200, reply.text
    bulk = {"steps": [{"session_id": sid, "inputs": [1.0]} for sid in sids[:2]]}
    for _ in range(6):
        reply = cluster.client.post("/v1/models/demo/steps", json=bulk)
        assert reply.status_code == 200, reply.text

    served = upstreams_by_uri(cluster.access_log)
    homes = {}
    for sid in sids:
        answered = {
            tried[-1]
            for uri, requests in served.items()
            if uri.startswith(f"/v1/sessions/{sid}/") or uri == f"/v1/sessions/{sid}"
            for tried in requests
        }
        assert len(answered) == 1, f"{sid} was served by {answered}"
        homes[sid] = answered.pop()
    assert len(set(homes.values())) >= 2, "nginx put every session on one replica"
    creates = {tried[-1] for tried in served["/v1/models/demo/sessions"]}
    bulks = {tried[-1] for tried in served["/v1/models/demo/steps"]}
    assert creates == bulks == set(cluster.replicas), "requests naming no session go round robin"


def test_a_gruserve_session_header_keeps_what_names_no_session_on_one_replica(
    cluster: Cluster,
) -> None:
    """Requests whose path names no session go round robin (above), unless they carry a
    ``Gruserve-Session`` header: a KServe v2 sequence's steps (its id is in the body, out of
    nginx's sight) and a gateway's bulk steps then each reach one replica, and the sequence
    gives what one process gives."""
    infer, bulk = "/v2/models/demo/infer", "/v1/models/demo/steps"
    logged = upstreams_by_uri(cluster.access_log)
    before = {uri: len(logged.get(uri, [])) for uri in (infer, bulk)}
    x = (np.random.default_rng(7).normal(size=(8, 1)) * 20 + 60).astype(np.float32)
    got = []
    for t in range(8):
        given = {"name": "inputs", "shape": [1, 1, 1], "datatype": "FP32", "data": [float(x[t, 0])]}
        sequence = {"sequence_id": "kept-7", "sequence_start": t == 0}
        body = {"inputs": [given], "parameters": sequence}
        reply = cluster.client.post(infer, json=body, headers={"Gruserve-Session": "kept-7"})
        assert reply.status_code == 200, reply.text
        (out,) = reply.json()["outputs"]
        got.append(out["data"])
    sids = [f"gateway-{i}" for i in range(4)]
    for sid in sids:
        cluster.create(sid)
    steps = {"steps": [{"session_id": sid, "inputs": [1.0]} for sid in sids]}
    for _ in range(6):
        reply = cluster.client.post(bulk, json=steps, headers={"Gruserve-Session": "gateway-a"})
        assert reply.status_code == 200, reply.text

    served = upstreams_by_uri(cluster.access_log)
    for uri, count in ((infer, 8), (bulk, 6)):
        answered = [tried[-1] for tried in served[uri][before[uri] :]]
        assert len(answered) == count and len(set(answered)) == 1, (uri, answered)
    expected, _ = cluster.reference(x)
    np.testing.assert_allclose(np.ravel(got), np.ravel(expected), atol=ATOL, rtol=RTOL)


def test_ndjson_stream_through_nginx_flushes_each_line(cluster: Cluster) -> None:
    rng = np.random.default_rng(8)
    x = _sequence(rng, 8)
    cluster.create("streamed")
    # two REST steps first (any replicas), then the stream continues the same session
    for t in range(2):
        reply = cluster.client.post("/v1/sessions/streamed/step", json={"inputs": x[t].tolist()})
        assert reply.status_code == 200, reply.text
    stream = NdjsonStream(cluster.lb, "/v1/sessions/streamed/stream")
    try:
        replies = [stream.step({"inputs": x[t].tolist()}) for t in range(2, 8)]
        assert stream.headers.get("x-request-id")  # nginx made one up
        stream.finish()
    finally:
        stream.close()
    assert [r["step"] for r in replies] == list(range(3, 9))
    expected, states = cluster.reference(x)
    _assert_close([r["outputs"] for r in replies], expected[2:])
    got = cluster.states("streamed")
    for key in states:
        np.testing.assert_allclose(got[key], states[key], atol=ATOL)


def test_websocket_through_nginx(cluster: Cluster) -> None:
    rng = np.random.default_rng(9)
    x = _sequence(rng, 5)
    cluster.create("socket")
    reply = cluster.client.post("/v1/sessions/socket/step", json={"inputs": x[:2].tolist()})
    assert reply.status_code == 200, reply.text
    with connect(f"ws://{cluster.lb}/v1/sessions/socket/ws", open_timeout=10) as ws:
        ws.send(json.dumps({"inputs": x[2:4].tolist()}))
        text = json.loads(ws.recv(timeout=10))
        ws.send(x[4].astype("<f4").tobytes())  # one timestep, binary
        raw = ws.recv(timeout=10)
        assert isinstance(raw, bytes), raw
        binary = np.frombuffer(raw, "<f4")
    assert text["step"] == 2
    expected, states = cluster.reference(x)
    _assert_close(reply.json()["outputs"] + text["outputs"], expected[:4])
    _assert_close(binary, expected[4])
    got = cluster.states("socket")
    for key in states:
        np.testing.assert_allclose(got[key], states[key], atol=ATOL)


def test_nginx_passes_request_ids_and_enforces_the_body_limit(cluster: Cluster) -> None:
    reply = cluster.client.get("/healthz", headers={"X-Request-ID": "trace-42"})
    assert reply.status_code == 200
    assert reply.headers["x-request-id"] == "trace-42"
    generated = cluster.client.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    # client_max_body_size = GRUSERVE_MAX_REQUEST_BYTES: nginx refuses before any replica
    body = b'{"inputs": [' + b"[1.0]," * (4 * 1024 * 1024 // 6) + b"[1.0]]}"
    too_big = cluster.client.post(
        "/v1/models/demo/predict", content=body, headers={"content-type": "application/json"}
    )
    assert too_big.status_code == 413
    # a WebSocket close code gets through: a missing session closes the socket with 4404
    with connect(f"ws://{cluster.lb}/v1/sessions/nobody/ws", open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["error"]["status"] == 404
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404


def test_a_replica_stops_and_the_others_carry_on(cluster: Cluster) -> None:
    """Runs last in this module: it stops, for good, the replica the session is kept on."""
    rng = np.random.default_rng(10)
    x = _sequence(rng, 9)
    cluster.create("survivor")
    outputs, home = [], None
    for t in range(9):
        if t == 3:
            (home,) = {tried[-1] for tried in upstreams_by_uri(cluster.access_log)[SURVIVOR]}
            stop(cluster.procs[cluster.replicas.index(home)])  # SIGTERM, as a rolling update
        reply = cluster.client.post(SURVIVOR, json={"inputs": [x[t].tolist()]})
        assert reply.status_code == 200, reply.text  # refused connections go to the next replica
        outputs.extend(reply.json()["outputs"])
    after_stop = upstreams_by_uri(cluster.access_log)[SURVIVOR][3:]
    assert all(tried[-1] != home for tried in after_stop)
    assert any(tried[0] == home for tried in after_stop), "nginx retried none"
    assert len({tried[-1] for tried in after_stop}) == 1, "the session moved to one replica"
    expected, states = cluster.reference(x)
    _assert_close(outputs, expected)
    got = cluster.states("survivor")
    for key in states:
        np.testing.assert_allclose(got[key], states[key], atol=ATOL)
