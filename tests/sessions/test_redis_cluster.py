"""The Redis store on a real Redis Cluster and with replicas: key buckets spread over every
master, per-bucket limits, merged listings, and writes acknowledged only once ``WAIT``
counted the replicas they need."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from redis.crc import key_slot

from cluster_helpers import local_cluster, replicated_redis, wait_for
from gruserve.errors import StoreUnavailable, TooManySessions
from gruserve.sessions.redis_store import RedisSessionStore
from gruserve.sessions.redis_store._keyspace import CLUSTER_BUCKETS, Keyspace
from gruserve.sessions.store import SessionRecord


def _record(sid: str, units: int = 4) -> SessionRecord:
    now = time.time()
    return SessionRecord(
        sid, "m", 1, np.arange(units, dtype=np.float32) + len(sid), created_at=now, last_used_at=now
    )


async def test_sessions_spread_over_every_master(redis_cluster: Any, cluster_url: str) -> None:
    store = RedisSessionStore(cluster_url, 60, 10_000)
    try:
        ids = [f"spread-{i}" for i in range(200)]
        for sid in ids:
            await store.create(_record(sid))
        # a wave of reads and compare-and-sets spanning every bucket, answered per session
        records = await asyncio.gather(*(store.get(sid) for sid in ids))
        written = await asyncio.gather(
            *(store.compare_and_set(r.advanced(r.state * 2, 3, time.time()), 0) for r in records)
        )
        assert all(written)
        after = await asyncio.gather(*(store.get(sid) for sid in ids))
        for sid, record in zip(ids, after, strict=True):
            assert (record.session_id, record.step, record.timesteps) == (sid, 1, 3)
            np.testing.assert_array_equal(record.state, _record(sid).state * 2)
        assert await store.count() == len(ids)
    finally:
        await store.close()
    per_master = {
        node.port: sum(1 for _ in node.client.scan_iter(match="gruserve:{*}:session:*"))
        for node in redis_cluster.masters()
    }
    assert len(per_master) == 3 and all(n > 20 for n in per_master.values()), per_master
    assert sum(per_master.values()) == len(ids)


def _same_bucket(count: int) -> list[str]:
    """``count`` ids whose keys share one bucket (so one master, one index)."""
    ids: list[str] = []
    i = 0
    while len(ids) < count:
        sid = f"b-{i}"
        if zlib.crc32(sid.encode()) % CLUSTER_BUCKETS == 0:
            ids.append(sid)
        i += 1
    return ids


async def test_max_sessions_holds_per_bucket(cluster_url: str) -> None:
    """``max_sessions`` 32 over 16 buckets: each bucket holds 2, however empty the rest."""
    store = RedisSessionStore(cluster_url, 60, 2 * CLUSTER_BUCKETS)
    try:
        first, second, third = _same_bucket(3)
        await store.create(_record(first))
        await store.create(_record(second))
        with pytest.raises(TooManySessions):
            await store.create(_record(third))
        assert await store.count() == 2
    finally:
        await store.close()


async def test_lru_evicts_the_least_recently_used_of_its_bucket(cluster_url: str) -> None:
    store = RedisSessionStore(cluster_url, 60, CLUSTER_BUCKETS, eviction="lru")
    try:
        old, new = _same_bucket(2)
        await store.create(_record(old))
        await store.create(_record("elsewhere-0"))  # another bucket: untouched
        await store.create(_record(new))
        assert sorted(s.session_id for s in (await store.page(None, 10, None)).sessions) == sorted(
            ["elsewhere-0", new]
        )
    finally:
        await store.close()


async def test_listing_merges_buckets_in_id_order(cluster_url: str) -> None:
    store = RedisSessionStore(cluster_url, 60, 10_000)
    try:
        ids = sorted(f"list-{i:03d}" for i in range(57))
        for sid in reversed(ids):
            await store.create(_record(sid))
        seen, cursor, pages = [], None, 0
        while True:
            page = await store.page(cursor, 7, None)
            assert len(page.sessions) <= 7
            seen += [s.session_id for s in page.sessions]
            pages += 1
            cursor = page.next_cursor
            if cursor is None:
                break
        assert seen == ids and pages == 9
    finally:
        await store.close()


# -- acknowledged writes reach the replicas ----------------------------------------------------
PATIENT_WAIT_MS = 30_000
"""``wait_ms`` of a store whose writes must be acknowledged: ``WAIT`` answers as soon as the
replica has the write, so only a busy machine makes it wait longer (the stores' 1 s default
is short of that there); a shortfall is tested with a store of its own."""


@pytest.fixture
def master_and_replica(tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    with replicated_redis(tmp_path) as nodes:
        yield nodes


def _replica_revision(client: redis.Redis, key: str) -> int | None:
    value = client.hget(key, "revision")
    return None if value is None else int(value)


async def test_an_acknowledged_write_is_on_the_replica(master_and_replica: Any) -> None:
    master, replica = master_and_replica
    store = RedisSessionStore(
        f"redis://127.0.0.1:{master.port}/0", 60, 100, min_replicas=1, wait_ms=PATIENT_WAIT_MS
    )
    try:
        await store.create(_record("kept"))
        assert _replica_revision(replica.client, "gruserve:session:kept") == 0
        for revision in range(5):
            record = await store.get("kept")
            assert await store.compare_and_set(
                record.advanced(record.state + 1, 1, time.time()), revision
            )
            # WAIT answered: the replica has it now, not eventually
            assert _replica_revision(replica.client, "gruserve:session:kept") == revision + 1
    finally:
        await store.close()


async def test_a_write_no_replica_acknowledged_is_not_acknowledged(
    master_and_replica: Any,
) -> None:
    master, replica = master_and_replica
    url = f"redis://127.0.0.1:{master.port}/0"
    patient = RedisSessionStore(url, 60, 100, min_replicas=1, wait_ms=PATIENT_WAIT_MS)
    try:
        await patient.create(_record("alone"))  # acknowledged, while the replica is there
    finally:
        await patient.close()
    store = RedisSessionStore(url, 60, 100, min_replicas=1, wait_ms=200)
    try:
        replica.kill()
        wait_for(
            lambda: master.info("replication")["connected_slaves"] == 0, "the master to notice"
        )
        record = await store.get("alone")
        with pytest.raises(StoreUnavailable, match=r"reached 0 of the 1 replicas"):
            await store.compare_and_set(record.advanced(record.state, 1, time.time()), 0)
        with pytest.raises(StoreUnavailable, match=r"reached 0 of the 1 replicas"):
            await store.create(_record("unsafe"))
        # without replicas required, the same master takes writes as before
        relaxed = RedisSessionStore(f"redis://127.0.0.1:{master.port}/0", 60, 100)
        try:
            current = await relaxed.get("alone")
            assert current.revision == 1  # the master applied it; only its copy was missing
            assert await relaxed.compare_and_set(current.advanced(current.state, 1, time.time()), 1)
        finally:
            await relaxed.close()
    finally:
        await store.close()


async def test_cluster_writes_wait_for_their_masters_replicas(
    redis_cluster: Any, cluster_url: str
) -> None:
    store = RedisSessionStore(cluster_url, 60, 10_000, min_replicas=1, wait_ms=PATIENT_WAIT_MS)
    try:
        ids = [f"wait-{i}" for i in range(48)]
        await asyncio.gather(*(store.create(_record(sid)) for sid in ids))
        records = await asyncio.gather(*(store.get(sid) for sid in ids))
        assert all(
            await asyncio.gather(
                *(store.compare_and_set(r.advanced(r.state, 1, time.time()), 0) for r in records)
            )
        )
        replicas = [n for n in redis_cluster.alive() if n not in redis_cluster.masters()]
        on_replicas: dict[str, int] = {}
        for node in replicas:
            node.client.execute_command("READONLY")
            for key in node.client.scan_iter(match="gruserve:{*}:session:*"):
                on_replicas[key.decode().rsplit(":", 1)[1]] = int(node.client.hget(key, "revision"))
        assert on_replicas == dict.fromkeys(ids, 1)
    finally:
        await store.close()


async def _create(store: RedisSessionStore, sid: str) -> BaseException | None:
    try:
        await store.create(_record(sid))
    except Exception as exc:
        return exc
    return None


@pytest.mark.slow
async def test_a_store_started_while_a_master_is_down_serves_the_other_masters(
    tmp_path: Path,
) -> None:
    # redis-py fetched its command table from slot 0's master alone, so a client started
    # while that master was down failed every call, on every master, until a failover; the
    # cluster's node timeout (30 s) keeps any failover out of this test's few seconds
    with local_cluster(tmp_path / "cluster", node_timeout_ms=30_000) as cluster:
        slot_map = next(iter(cluster.nodes.values())).client.execute_command("CLUSTER SLOTS")
        first, last, (_, port, *_) = next(entry for entry in slot_map if entry[0] == 0)[:3]
        keyspace = Keyspace("gruserve:", CLUSTER_BUCKETS)
        ids = [f"outage-{i}" for i in range(48)]
        down = {
            sid
            for sid in ids
            if first <= key_slot(keyspace.bucket(sid).session_key(sid).encode()) <= last
        }
        assert 0 < len(down) < len(ids), "every session on one master: pick other ids"
        cluster.nodes[port].kill()
        store = RedisSessionStore(cluster.url, 60, 10_000)
        try:
            outcomes = {sid: await _create(store, sid) for sid in ids}
            assert {sid for sid, exc in outcomes.items() if exc is None} == set(ids) - down
            assert all(isinstance(outcomes[sid], StoreUnavailable) for sid in down), outcomes
            # the master back: the same client serves its sessions too
            cluster.nodes[port].restart()
            cluster.wait_healthy(3)
            assert [await _create(store, sid) for sid in sorted(down)] == [None] * len(down)
            assert await store.count() == len(ids)
        finally:
            await store.close()


def test_a_cluster_port_is_never_one_a_node_just_took(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel may hand out a port again until the ``redis-server`` given it has bound it;
    a cluster's nodes must not share one (their folders and their ports would clash)."""
    from bench import redis_topology

    offered = iter([40001, 40002, 50002, 40003])  # 50002 is 40002's bus port

    class Socket:
        def __init__(self) -> None:
            self.port = 0

        def __enter__(self) -> Socket:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def bind(self, address: tuple[str, int]) -> None:
            self.port = next(offered) if address[1] == 0 else address[1]

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(redis_topology.socket, "socket", Socket)
    monkeypatch.setattr(redis_topology, "_HANDED_OUT", {40001, 50001, 40002, 50002})
    assert redis_topology._free_cluster_port() == 40003
    assert {40003, 50003} <= redis_topology._HANDED_OUT
