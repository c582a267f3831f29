"""``kill -9`` of a Redis Cluster master while 16 sessions stream numbered steps.

A real cluster (3 masters, 3 replicas, ``cluster-node-timeout`` 1 s) behind one
``gruserve serve`` with ``GRUSERVE_STORE_MIN_REPLICAS=1``: a step is acknowledged only
once the replica of its master has it. Mid-stream the master holding one chosen session
is killed. Its replica takes over within seconds; the killed node is then started again,
as an orchestrator would, and rejoins as the new master's replica (until then the new
master has no replica, so its writes are refused with 503, never acknowledged unsafely).
Steps meanwhile get 503 and are resent with the same number: every session ends exactly
where one predict call over its inputs ends, each output its client was given equal to
that call's, none lost or doubled.
"""

from __future__ import annotations

import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import redis.cluster
from fault_helpers import NumberedClient, assert_session_matches, replicas, sequence, server_env

from cluster_helpers import local_cluster, wait_for
from gruserve.sessions.redis_store._keyspace import CLUSTER_BUCKETS

SESSIONS = 16
STEPS = 30
PAUSE_AT = 10  # the chosen session waits here for the kill, so it has steps left after it


def _master_port(cluster_url: str, session_id: str) -> int:
    """The port of the master holding ``session_id``'s keys now."""
    host, port = cluster_url.removeprefix("redis+cluster://").split(",")[0].split(":")
    bucket = zlib.crc32(session_id.encode()) % CLUSTER_BUCKETS
    with redis.cluster.RedisCluster(host=host, port=int(port)) as client:
        node = client.get_node_from_key(f"gruserve:{{{bucket}}}:session:{session_id}")
        return int(node.port)


@pytest.mark.slow
def test_kill_9_of_a_cluster_master_loses_no_acknowledged_step(tmp_path: Path) -> None:
    rng = np.random.default_rng(14)
    xs = {f"fail-{i:02d}": sequence(rng, STEPS) for i in range(SESSIONS)}
    chosen = "fail-00"
    with local_cluster(tmp_path / "cluster") as cluster:
        env = server_env(cluster.url, GRUSERVE_STORE_MIN_REPLICAS="1")
        # every 503 logs a warning, and nothing reads the server's output until it stops: a
        # full pipe would block the server (errors and tracebacks still show)
        env["GRUSERVE_LOG_LEVEL"] = "error"
        with replicas(1, env, tmp_path) as [server]:
            victim = cluster.nodes[_master_port(cluster.url, chosen)]
            clients = {sid: NumberedClient([server.url], sid, give_up_s=120) for sid in xs}
            for client in clients.values():
                client.create()
            paused, killed = threading.Event(), threading.Event()

            def stream(sid: str) -> None:
                for t in range(STEPS):
                    if sid == chosen and t == PAUSE_AT:
                        paused.set()
                        assert killed.wait(timeout=120), "the master was never killed"
                    clients[sid].step(xs[sid][t : t + 1])

            with ExitStack() as closing_clients, ThreadPoolExecutor(SESSIONS) as pool:
                for client in clients.values():
                    closing_clients.callback(client.close)
                streams = [pool.submit(stream, sid) for sid in xs]
                assert paused.wait(timeout=120), [s.exception() for s in streams if s.done()]
                victim.kill()
                killed.set()
                # the replica takes over; then the dead node comes back as its replica
                wait_for(lambda: len(cluster.masters()) == 3, "a replica to take over", 120)
                victim.restart()
                cluster.wait_healthy(3)
                for s in streams:
                    s.result(timeout=180)

            for sid, client in clients.items():
                assert_session_matches(server.url, sid, xs[sid], client.outputs)
    statuses = {a.status for c in clients.values() for a in c.attempts}
    assert statuses <= {200, 503}, statuses
    refused = sum(a.status == 503 for c in clients.values() for a in c.attempts)
    assert any(a.status == 503 for a in clients[chosen].attempts), "no step met the failover"
    print(f"\nkill -9 of a master: {refused} steps answered 503 and resent, every session exact")
