"""``kill -9`` of one of three replicas behind nginx while clients stream numbered steps.

Three ``gruserve serve`` on one durable Redis behind the repository's nginx configuration;
client threads each stream one session, a timestep per step, every step carrying its
number. nginx keeps each session on one replica, so the ids are chosen for two of the six
sessions to live on the one that dies. Mid-stream one replica is killed at the worst
moment: it has just sent a step's write to Redis (which applies it) and never hears back (a
proxy between it and Redis loses the replies from then on, so the requests nginx hands it
meanwhile hang in it too). nginx answers the requests that were in the dead replica with
502 (a POST is never passed on once sent) and sends new ones to the survivors; clients
resend the same step number. The step the dead replica wrote is answered from the stored
result, the ones it had not are applied: every session ends exactly where one predict call
over its inputs ends, with the outputs its client was given equal to that call's, none lost
or doubled.
"""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing
from pathlib import Path

import numpy as np
import pytest
from fault_helpers import (
    NumberedClient,
    ReplyTrap,
    assert_session_matches,
    counter,
    find_nginx,
    homes,
    nginx,
    replicas,
    running_redis,
    sequence,
    server_env,
)

from gruserve.sessions.redis_store._scripts import WRITE_SCRIPT

SESSIONS = 6
ON_VICTIM = 2
STEPS = 50
HOLD_S = 0.3  # the victim keeps what nginx sends it this long (< the 2 s store timeout)
# a step's write: the compare-and-set script, called by its SHA1 (reads call another script)
CAS = hashlib.sha1(WRITE_SCRIPT.encode()).hexdigest().encode()


@pytest.mark.slow
def test_kill_9_of_a_replica_loses_and_doubles_no_step(tmp_path: Path) -> None:
    find_nginx()
    rng = np.random.default_rng(2024)
    with (
        running_redis(tmp_path / "redis", durable=True) as redis,
        closing(ReplyTrap(redis.port)) as trap,
        replicas(1, server_env(trap.url), tmp_path) as [victim],
        replicas(2, server_env(redis.url), tmp_path) as survivors,
        nginx([victim.port, *(r.port for r in survivors)], tmp_path / "nginx") as (lb, log),
    ):
        # nginx keeps each session on one replica: two of the sessions live on the victim
        victim_address = f"127.0.0.1:{victim.port}"
        home = homes(lb, log, [f"kill-{i}" for i in range(60)])
        doomed = [sid for sid, at in home.items() if at == victim_address][:ON_VICTIM]
        spared = [sid for sid, at in home.items() if at != victim_address]
        assert len(doomed) == ON_VICTIM, home
        xs = {sid: sequence(rng, STEPS) for sid in doomed + spared[: SESSIONS - ON_VICTIM]}
        clients = {sid: NumberedClient([f"http://{lb}"], sid) for sid in xs}
        for client in clients.values():
            client.create()
        killed = threading.Event()
        applied_after_kill = dict.fromkeys(xs, 0)

        def stream(sid: str) -> None:
            client = clients[sid]
            for t in range(STEPS):
                client.step(xs[sid][t : t + 1])
                if killed.is_set():
                    applied_after_kill[sid] += 1

        with ExitStack() as closing_clients, ThreadPoolExecutor(SESSIONS) as pool:
            for client in clients.values():
                closing_clients.callback(client.close)
            streams = [pool.submit(stream, sid) for sid in xs]
            deadline = time.monotonic() + 60
            while sum(c.applied for c in clients.values()) < SESSIONS * STEPS // 3:
                assert time.monotonic() < deadline, "the clients made no progress"
                assert not any(s.done() for s in streams), [s.exception() for s in streams]
                time.sleep(0.005)
            applied_before_kill = {sid: c.applied for sid, c in clients.items()}
            trap.arm(CAS)
            assert trap.tripped.wait(timeout=30), "the victim wrote no step"
            time.sleep(HOLD_S)
            victim.kill()
            killed.set()
            for s in streams:
                s.result(timeout=120)

        for sid, client in clients.items():
            assert_session_matches(survivors[0].url, sid, xs[sid], client.outputs)
        assert min(applied_before_kill.values()) < STEPS, "a session ended before the kill"
        assert sum(applied_after_kill.values()) > 0

        # the kill hit requests in flight: clients saw them fail and resent them, and the
        # one the victim had written was answered from the stored result, not run again
        lost = [a for c in clients.values() for a in c.attempts if a.status != 200]
        assert lost, "no request was in flight on the killed replica"
        assert {a.status for a in lost} <= {502}, lost
        replays = sum(counter(r.url, "gruserve_step_replays_total") for r in survivors)
        assert replays >= 1, "the step the victim wrote was not answered from the store"
        requests = [line.rsplit(" ", 1) for line in log.read_text().splitlines()]
        assert any(  # `$uri $upstream_addr $status`, the last upstream tried the one that answered
            tried.endswith(victim_address) and "/step " in tried and status == "200"
            for tried, status in requests
        ), "the victim applied no step before it died"
        print(
            f"\nkill -9 after {sum(applied_before_kill.values())} of {SESSIONS * STEPS} "
            f"steps; {len(lost)} requests lost in it and resent, {replays:.0f} of them "
            "already applied (answered from the stored result)"
        )
