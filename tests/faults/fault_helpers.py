"""Shared by tests/faults: real processes (gruserve replicas, redis-server) broken on purpose.

The server pieces come from tests/deploy (``deploy_helpers``: servers on free ports,
readiness, stopping); :class:`RedisProcess` adds a redis-server that a test may pause,
kill and start again on the same port and data folder.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))

from deploy_helpers import find_nginx as find_nginx  # re-exported: tests/deploy is on the path
from deploy_helpers import free_port, start_server, stop, wait_ready
from deploy_helpers import homes as homes
from deploy_helpers import nginx as nginx
from deploy_helpers import reference as reference
from deploy_helpers import server_env as server_env
from deploy_helpers import serving as serving


class RedisProcess:
    """A private redis-server whose process a test controls.

    Args:
        workdir: its data folder (the append-only file, when ``durable``).
        durable: ``appendonly yes`` with ``appendfsync always``, the setting under which an
            acknowledged write survives ``kill -9``; else no persistence at all.
    """

    def __init__(self, workdir: Path, durable: bool) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
        self.binary, self.workdir, self.durable = binary, workdir, durable
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.durable
            else ["--appendonly", "no"]
        )
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                str(self.workdir),
                *persistence,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.exceptions.BusyLoadingError:
                    time.sleep(0.05)
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise RuntimeError(f"redis-server did not start on {self.port}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """``kill -9``: nothing flushed but what ``appendfsync always`` already wrote."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)  # a paused process cannot die otherwise cleanly
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.kill()


@contextlib.contextmanager
def running_redis(workdir: Path, durable: bool = True) -> Iterator[RedisProcess]:
    redis = RedisProcess(workdir, durable)
    redis.start()
    try:
        yield redis
    finally:
        redis.stop()


class ReplyTrap:
    """A TCP proxy in front of Redis that can lose replies: the network failing between a
    replica and its store at the worst moment.

    Until :meth:`arm` it forwards both ways. Armed, the first chunk a client sends that
    holds ``marker`` still reaches Redis (which executes it), but from then on nothing
    Redis answers reaches any client of the proxy, and :attr:`tripped` is set: a replica
    whose write was applied and never acknowledged, as if it died right after sending it.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.tripped = threading.Event()
        self._marker: bytes | None = None
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, marker: bytes) -> None:
        with self._lock:
            self._marker = marker

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if requests:
                    with self._lock:
                        if self._marker is not None and self._marker in data:
                            self._marker = None
                            self.tripped.set()  # before Redis can answer: no reply slips out
                elif self.tripped.is_set():
                    continue
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        for sock in self._sockets:
            sock.close()


# -- gruserve replicas and the clients of the fault tests ------------------------------------
ATOL = RTOL = 1e-5  # demo outputs are in raw sunspot units (tens): float32 holds ~7 digits
RETRYABLE = frozenset({502, 503, 504})
"""Statuses a client retries with the same step number: a proxy that lost its replica
(502, 504) or a replica that lost its store (503)."""


class Replica:
    """One ``gruserve serve`` process on 127.0.0.1:port."""

    def __init__(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.port, self.proc = port, proc
        self.url = f"http://127.0.0.1:{port}"

    def kill(self) -> None:
        """``kill -9``: no drain, no goodbye; requests in flight lose their connection."""
        self.proc.send_signal(signal.SIGCONT)
        self.proc.kill()
        self.proc.wait(timeout=10)


@contextlib.contextmanager
def replicas(count: int, env: dict[str, str], workdir: Path) -> Iterator[list[Replica]]:
    """``count`` servers with ``env`` (see ``deploy_helpers.server_env``), all ready.

    On the way out each is stopped, and its output checked for tracebacks: a fault may
    make requests fail, never make the server raise where nothing catches it.
    """
    ports = [free_port() for _ in range(count)]
    started = [Replica(port, start_server(port, env, workdir)) for port in ports]
    try:
        for replica in started:
            wait_ready(replica.proc, replica.port)
        yield started
    finally:
        outputs = [stop(replica.proc) for replica in started]
    for replica, output in zip(started, outputs, strict=True):
        assert "Traceback" not in output, f"replica {replica.port}:\n{output}"


def sequence(rng: np.random.Generator, timesteps: int) -> np.ndarray:
    """Demo inputs (one feature, the sunspot range), [timesteps, 1] float32."""
    return rng.uniform(0, 200, size=(timesteps, 1)).astype(np.float32)


def session_info(url: str, session_id: str) -> dict[str, Any]:
    """``GET /v1/sessions/{id}?include_state=true``: counters and states from one store read."""
    reply = httpx.get(
        f"{url}/v1/sessions/{session_id}", params={"include_state": "true"}, timeout=30
    )
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def session_state(url: str, session_id: str) -> tuple[int, dict[str, np.ndarray]]:
    """A session's step count and states, read together."""
    body = session_info(url, session_id)
    return int(body["step"]), {key: np.asarray(value) for key, value in body["states"].items()}


def assert_states_close(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=RTOL, atol=ATOL, err_msg=key)


def assert_session_matches(
    url: str, session_id: str, x: np.ndarray, outputs: list[np.ndarray] | None = None
) -> None:
    """The session applied exactly the timesteps ``x`` [T, 1], in order, each once: its
    timestep count and states, and the outputs its client was given (one [t, 1] array per
    step, when given: then also its step count), equal one predict call over ``x``."""
    expected, states = reference(url, x)
    info = session_info(url, session_id)
    assert info["timesteps"] == len(x), f"{session_id}: {info}, the client sent {len(x)}"
    assert_states_close({k: np.asarray(v) for k, v in info["states"].items()}, states)
    if outputs is not None:
        assert info["step"] == len(outputs), f"{session_id}: {info['step']} steps applied"
        np.testing.assert_allclose(
            np.concatenate(outputs), expected, rtol=RTOL, atol=ATOL, err_msg=session_id
        )


def counter(url: str, name: str) -> float:
    """A counter's value in a replica's ``/metrics`` (0 before its first increment)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return sum(values)


class Attempt(NamedTuple):
    """One HTTP attempt of a step: when it started (monotonic), how long it took, and its
    status (0: no reply, a transport error)."""

    started: float
    elapsed: float
    status: int


class NumberedClient:
    """A client streaming one session in numbered steps, resending after any failure.

    A step carries ``"step": n`` (the steps applied before it). On a transport error or
    a 502/503/504 it sends the very same request again, to the next of ``urls`` in
    turn: the server applies it if it never was, or answers with the outputs it kept if
    it was (its reply lost). Anything else, a 409 ``StepOutOfOrder`` included, fails the
    test: with numbered steps a resend never needs one.

    Args:
        urls: base URLs; attempts rotate over them (one URL: a load balancer).
        session_id: the session this client streams.
        timeout: seconds an attempt may take before it counts as lost and is resent.
        give_up_s: seconds one step may keep failing before the test fails.
    """

    def __init__(
        self,
        urls: list[str],
        session_id: str,
        timeout: float = 10,
        give_up_s: float = 30,
    ) -> None:
        self.urls, self.session_id, self.give_up_s = urls, session_id, give_up_s
        self.client = httpx.Client(timeout=timeout)
        self.attempts: list[Attempt] = []
        self.outputs: list[np.ndarray] = []
        self._turn = 0

    @property
    def applied(self) -> int:
        """Steps acknowledged so far."""
        return len(self.outputs)

    def _post(self, path: str, body: dict[str, Any]) -> httpx.Response | None:
        url = self.urls[self._turn % len(self.urls)]
        self._turn += 1
        started = time.monotonic()
        try:
            reply: httpx.Response | None = self.client.post(url + path, json=body)
        except httpx.TransportError:
            reply = None
        status = 0 if reply is None else reply.status_code
        self.attempts.append(Attempt(started, time.monotonic() - started, status))
        return reply

    def create(self) -> None:
        """Create the session (a resend after a lost reply may find it created: 409)."""
        body = {"session_id": self.session_id}
        deadline = time.monotonic() + self.give_up_s
        resent = False
        while True:
            reply = self._post("/v1/models/demo/sessions", body)
            if reply is not None and reply.status_code == 201:
                break
            if reply is not None and reply.status_code == 409 and resent:
                assert reply.json()["error"]["type"] == "SessionExists", reply.text
                break
            assert reply is None or reply.status_code in RETRYABLE, reply.text
            assert time.monotonic() < deadline, f"{self.session_id}: not created"
            resent = True
            time.sleep(0.05)
        self.attempts.clear()

    def step(self, inputs: np.ndarray) -> np.ndarray:
        """Apply ``inputs`` [T, 1] as step number :attr:`applied`; returns its outputs."""
        number = self.applied
        body = {"inputs": inputs.tolist(), "step": number}
        path = f"/v1/sessions/{self.session_id}/step"
        deadline = time.monotonic() + self.give_up_s
        while True:
            reply = self._post(path, body)
            if reply is not None and reply.status_code == 200:
                break
            assert reply is None or reply.status_code in RETRYABLE, (
                f"{self.session_id} step={number}: {reply.status_code} {reply.text}"
            )
            assert time.monotonic() < deadline, f"{self.session_id} step={number}: gave up"
            time.sleep(0.05)
        answer = reply.json()
        assert answer["step"] == number + 1, (self.session_id, number, answer)
        outputs = np.asarray(answer["outputs"], dtype=np.float64)
        self.outputs.append(outputs)
        return outputs

    def close(self) -> None:
        self.client.close()
