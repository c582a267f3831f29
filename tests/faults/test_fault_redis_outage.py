"""Redis dies (``kill -9``) or hangs (``SIGSTOP``) under two replicas streaming sessions.

While Redis is gone every request, and ``/readyz``, answers 503 within a few
GRUSERVE_STORE_TIMEOUT_S (see ``BOUND_S``): nothing hangs. Redis comes back on the same
port (after a kill, from its append-only file, fsynced on every write): the same server
processes, never restarted, serve again by themselves. Each session's stored step count
and state then agree (one read of both is one predict call over that many of its inputs:
no write was half applied), nothing acknowledged was lost, and the clients, resending
every failed step with its number, finish with the outputs and state of one predict call
over everything they sent.
"""

from __future__ import annotations

import functools
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fault_helpers import (
    NumberedClient,
    RedisProcess,
    Replica,
    assert_session_matches,
    assert_states_close,
    counter,
    reference,
    replicas,
    running_redis,
    sequence,
    server_env,
    session_state,
)

SESSIONS = 4
STORE_TIMEOUT_S = 0.5
# The longest any request may take, Redis up, down or hung. A request waits on at most one
# Redis call that hangs, and that call gives up after 2 to 4 x the timeout (measured: the
# timed-out read, then the retry on a fresh connection, whose connect and handshake
# redis-py retries too): 2 s here, and 1 s to spare.
BOUND_S = 3.0
OUTAGE_S = 2.0  # how long Redis stays dead or frozen
PACE_S = 0.02  # a client's pause between steps
INPUTS = 1000  # timesteps generated per session (the clients send far fewer)


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _not_ready(replica: Replica) -> None:
    started = time.monotonic()
    reply = httpx.get(f"{replica.url}/readyz", timeout=10)
    elapsed = time.monotonic() - started
    assert reply.status_code == 503, reply.text
    assert reply.json()["store"]["reachable"] is False, reply.text
    assert elapsed < BOUND_S, f"/readyz took {elapsed:.2f} s with Redis down"


def _ready(replica: Replica) -> bool:
    return httpx.get(f"{replica.url}/readyz", timeout=10).status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_service_answers_503_fast_and_resumes_by_itself(fault: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(5 if fault == "kill" else 6)
    xs = {f"{fault}-{i}": sequence(rng, INPUTS) for i in range(SESSIONS)}
    env = {"GRUSERVE_STORE_TIMEOUT_S": str(STORE_TIMEOUT_S)}
    with (
        running_redis(tmp_path / "redis", durable=True) as redis,
        replicas(2, server_env(redis.url, **env), tmp_path) as servers,
    ):
        urls = [r.url for r in servers]
        clients = {sid: NumberedClient(urls, sid, timeout=10) for sid in xs}
        for client in clients.values():
            client.create()
        done = threading.Event()

        def stream(sid: str) -> None:
            client = clients[sid]
            while not done.is_set():
                client.step(xs[sid][client.applied : client.applied + 1])
                time.sleep(PACE_S)

        def progressed(steps: int) -> Callable[[], bool]:
            marks = {sid: c.applied + steps for sid, c in clients.items()}
            return lambda: all(clients[sid].applied >= n for sid, n in marks.items())

        with ThreadPoolExecutor(SESSIONS) as pool:
            streams = [pool.submit(stream, sid) for sid in xs]
            try:
                _wait(progressed(5), "no progress before the outage")
                broke = time.monotonic()
                _break(redis, fault)
                time.sleep(OUTAGE_S / 2)
                for replica in servers:
                    _not_ready(replica)
                time.sleep(OUTAGE_S / 2)
                mended = time.monotonic()  # from here on Redis may answer again
                _mend(redis, fault)
                _assert_consistent(clients, xs, urls[0])
                _wait(progressed(5), "the service did not resume by itself")
                for replica in servers:
                    assert replica.proc.poll() is None
                    _wait(functools.partial(_ready, replica), "/readyz did not recover")
            finally:
                done.set()
                for s in streams:
                    s.result(timeout=60)
                for client in clients.values():
                    client.close()

        attempts = [a for c in clients.values() for a in c.attempts]
        slowest = max(attempts, key=lambda a: a.elapsed)
        assert slowest.elapsed < BOUND_S, slowest
        assert {a.status for a in attempts} <= {200, 503}, "only the store failed"
        for sid, client in clients.items():
            # an attempt made and answered while Redis was away can only have failed
            during = [a for a in client.attempts if broke < a.started < mended - a.elapsed]
            assert during, f"{sid} sent nothing while Redis was away"
            assert all(a.status == 503 for a in during), (sid, during)
        for sid, client in clients.items():
            assert_session_matches(urls[1], sid, xs[sid][: client.applied], client.outputs)
        refused = sum(a.status == 503 for a in attempts)
        replays = sum(counter(url, "gruserve_step_replays_total") for url in urls)
        print(
            f"\nRedis {fault}: {refused} requests answered 503 (slowest request "
            f"{slowest.elapsed:.2f} s), {replays:.0f} resent steps had been applied, "
            f"{min(c.applied for c in clients.values())}+ steps per session"
        )


def _break(redis: RedisProcess, fault: str) -> None:
    if fault == "kill":
        redis.kill()
    else:
        redis.signal(signal.SIGSTOP)


def _mend(redis: RedisProcess, fault: str) -> None:
    if fault == "kill":
        redis.start()  # same port, same folder: the append-only file brings the data back
    else:
        redis.signal(signal.SIGCONT)


def _assert_consistent(
    clients: dict[str, NumberedClient], xs: dict[str, np.ndarray], url: str
) -> None:
    """Each session as Redis has it just after the outage: its step count and state are
    those of one predict call over that many of its inputs; it has every step its client
    was told was applied, and at most the one step the client is still waiting on."""
    for sid, client in clients.items():
        acknowledged = client.applied
        step, states = session_state(url, sid)
        in_flight = client.applied + 1
        assert acknowledged <= step <= in_flight, (sid, acknowledged, step, in_flight)
        assert_states_close(states, reference(url, xs[sid][:step])[1])
