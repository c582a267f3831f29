"""A wave's script calls on a real Redis Cluster: one pipeline per master, answers equal to
one Redis's, scripts loaded again where a node lost them, and a dead master failing only
the calls on its buckets."""

from __future__ import annotations

import asyncio
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.cluster
from redis.crc import key_slot

from cluster_helpers import local_cluster, wait_for
from conftest import until
from gruserve.errors import StoreUnavailable
from gruserve.sessions.redis_store import RedisSessionStore
from gruserve.sessions.redis_store._keyspace import CLUSTER_BUCKETS
from gruserve.sessions.store import SessionRecord

WAVES = 10


def _record(sid: str) -> SessionRecord:
    return SessionRecord(sid, "m", 1, np.arange(4, dtype=np.float32) + len(sid), created_at=1.0)


async def _waves(store: RedisSessionStore, ids: list[str], waves: int) -> list[SessionRecord]:
    """``waves`` rounds of one wave of reads and one of compare-and-sets over ``ids`` (each
    wave issued in one pass of the event loop), then every record."""
    for _ in range(waves):
        records = await asyncio.gather(*(store.get(sid) for sid in ids))
        assert all(
            await asyncio.gather(
                *(
                    store.compare_and_set(r.advanced(r.state + r.step, 1, 2.0), r.revision)
                    for r in records
                )
            )
        )
    return list(await asyncio.gather(*(store.get(sid) for sid in ids)))


def _stats(node: Any) -> tuple[int, int]:
    """A master's socket reads from its clients and its ``EVALSHA`` calls since RESETSTAT."""
    reads = int(node.info("stats")["total_reads_processed"])
    evalsha = node.info("commandstats").get("cmdstat_evalsha", {"calls": 0})["calls"]
    return reads, int(evalsha)


async def test_a_wave_reaches_each_master_in_one_pipeline(
    redis_cluster: Any, cluster_url: str, redis_url: str
) -> None:
    """64 sessions touch all 16 buckets: a wave is 16 script calls over 3 masters. Sent as one
    pipeline per master, a master reads a wave off its socket in about one read (plus the
    replicas' once-a-second acks and this test's INFO); sent one call each, it would need at
    least one read per call."""
    ids = [f"wave-{i}" for i in range(64)]
    assert len({zlib.crc32(sid.encode()) % CLUSTER_BUCKETS for sid in ids}) == CLUSTER_BUCKETS
    cluster = RedisSessionStore(cluster_url, 60, 10_000)
    single = RedisSessionStore(redis_url, 60, 10_000)
    try:
        for store in (cluster, single):
            await asyncio.gather(*(store.create(_record(sid)) for sid in ids))
        await _waves(cluster, ids, 1)  # connections open, scripts loaded
        masters = redis_cluster.masters()
        for node in masters:
            node.client.config_resetstat()
        after = await _waves(cluster, ids, WAVES)
        stats = {node.port: _stats(node) for node in masters}
        reference = await _waves(single, ids, WAVES + 1)
    finally:
        await cluster.close()
        await single.close()
    # every wave: 16 reads' and 16 writes' script calls; the final reads once more
    assert sum(evalsha for _, evalsha in stats.values()) == (2 * WAVES + 1) * CLUSTER_BUCKETS
    for reads, evalsha in stats.values():
        assert reads < evalsha / 2, stats
    for got, want in zip(after, reference, strict=True):
        assert (got.session_id, got.step, got.revision) == (want.session_id, want.step, 11)
        assert (got.timesteps, got.created_at) == (want.timesteps, want.created_at)
        np.testing.assert_array_equal(got.state, want.state)


@pytest.mark.parametrize("min_replicas", [0, 1])
async def test_scripts_a_master_lost_are_loaded_again(
    redis_cluster: Any, cluster_url: str, min_replicas: int
) -> None:
    """``SCRIPT FLUSH`` on every master between waves (a restarted node has none): the
    calls the masters refused with NOSCRIPT are sent again once the scripts are loaded,
    and every answer is the one a store with its scripts in place gives."""
    ids = [f"flushed-{i}" for i in range(40)]
    store = RedisSessionStore(cluster_url, 60, 10_000, min_replicas=min_replicas)
    try:
        await asyncio.gather(*(store.create(_record(sid)) for sid in ids))
        for wave in range(2):
            for node in redis_cluster.masters():
                node.client.script_flush()
            records = await _waves(store, ids, 1)
            assert [(r.session_id, r.step) for r in records] == [(sid, wave + 1) for sid in ids]
            np.testing.assert_array_equal(records[7].state, _record(ids[7]).state + wave)
        for node in redis_cluster.masters():
            node.client.script_flush()
        await asyncio.gather(*(store.delete(sid) for sid in ids))
        assert await store.count() == 0
    finally:
        await store.close()


@pytest.mark.slow
async def test_a_dead_master_fails_only_the_calls_on_its_buckets(tmp_path: Path) -> None:
    """``kill -9`` of a master: a wave's calls on the other masters' buckets are answered;
    those on its own are answered or StoreUnavailable, never wrong; once its replica took
    over, the cluster client's refreshed slot map sends every call to the right master.

    The sessions are created through a store that waits for a replica (as
    ``GRUSERVE_STORE_MIN_REPLICAS=1`` does): replication is asynchronous, and a master killed
    before its replica read a create would take that session with it (reads of it answer
    SessionNotFound on the new master, which is Redis's promise without ``WAIT``, not
    routing)."""
    ids = [f"dead-{i}" for i in range(64)]
    with local_cluster(tmp_path) as cluster:
        store = RedisSessionStore(cluster.url, 60, 10_000, timeout_s=0.5)
        replicated = RedisSessionStore(cluster.url, 60, 10_000, min_replicas=1)
        try:
            await asyncio.gather(*(replicated.create(_record(sid)) for sid in ids))
            await store.get_many(ids)  # its slot map read while every master answers
            owners = _owners(cluster, ids)
            victim = cluster.nodes[owners[ids[0]]]
            victim.kill()
            answers = await store.get_many(ids)
            for sid, answer in zip(ids, answers, strict=True):
                if owners[sid] != victim.port or not isinstance(answer, StoreUnavailable):
                    assert isinstance(answer, SessionRecord) and answer.session_id == sid
            wait_for(lambda: len(cluster.masters()) == 3, "a replica to take over", 60)

            async def every_read_answers() -> bool:
                answers = await store.get_many(ids)
                wrong = [a for a in answers if not isinstance(a, (SessionRecord, StoreUnavailable))]
                assert not wrong, wrong  # a lost session is not a routing delay: fail now
                return all(isinstance(a, SessionRecord) for a in answers)

            await until(every_read_answers, "reads of every bucket on the new master")
            records = await store.get_many(ids)
            written = await store.compare_and_set_many(
                [(r.advanced(r.state, 1, time.time()), r.revision) for r in records]  # type: ignore[union-attr]
            )
            assert written == [True] * len(ids)
        finally:
            await store.close()
            await replicated.close()


def _owners(cluster: Any, ids: list[str]) -> dict[str, int]:
    """The port of the master holding each id's bucket now."""
    with redis.cluster.RedisCluster(host="127.0.0.1", port=next(iter(cluster.nodes))) as client:
        return {
            sid: int(
                client.get_node_from_key(
                    f"gruserve:{{{zlib.crc32(sid.encode()) % CLUSTER_BUCKETS}}}:session:{sid}"
                ).port
            )
            for sid in ids
        }


def _move_slot(cluster: Any, slot: int, source: Any, target: Any) -> None:
    """Move ``slot`` and its keys from master ``source`` to master ``target`` (as a
    resharding does), every master told the new owner."""
    source_id = source.client.execute_command("CLUSTER MYID").decode()
    target_id = target.client.execute_command("CLUSTER MYID").decode()
    target.client.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
    source.client.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
    keys = source.client.execute_command("CLUSTER GETKEYSINSLOT", slot, 1000)
    source.client.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
    for node in cluster.masters():
        node.client.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)


def _moved(node: Any) -> int:
    return int(node.info("errorstats").get("errorstat_MOVED", {"count": 0})["count"])


@pytest.mark.slow
async def test_a_moved_bucket_is_followed_and_the_slot_map_refreshed(tmp_path: Path) -> None:
    """A bucket's slot moves to another master after the stores read the slot map: the
    next wave's calls on it meet ``MOVED`` on the old master. Without ``WAIT`` they are sent
    again through the cluster client and answered right; with ``WAIT`` the writes on that
    bucket answer StoreUnavailable (never acknowledged off their connection), the others
    are written. Later waves go straight to the new master."""
    ids = [f"moved-{i}" for i in range(64)]
    with local_cluster(tmp_path) as cluster:
        store = RedisSessionStore(cluster.url, 60, 10_000)
        waiting = RedisSessionStore(cluster.url, 60, 10_000, min_replicas=1)
        try:
            await asyncio.gather(*(store.create(_record(sid)) for sid in ids))
            await waiting.get_many(ids)  # both know the slot map now
            bucket = zlib.crc32(ids[0].encode()) % CLUSTER_BUCKETS
            on_it = [sid for sid in ids if zlib.crc32(sid.encode()) % CLUSTER_BUCKETS == bucket]
            owners = _owners(cluster, ids)
            source = cluster.nodes[owners[ids[0]]]
            target = next(n for n in cluster.masters() if n.port != source.port)
            _move_slot(cluster, key_slot(f"gruserve:{{{bucket}}}:ids".encode()), source, target)

            records = await store.get_many(ids)
            assert [getattr(r, "session_id", r) for r in records] == ids
            assert _moved(source) >= 1  # the pipeline met MOVED: the cluster client answered
            written = await waiting.compare_and_set_many(
                [(r.advanced(r.state, 1, 2.0), r.revision) for r in records]  # type: ignore[union-attr]
            )
            for sid, result in zip(ids, written, strict=True):
                if sid in on_it:
                    assert isinstance(result, StoreUnavailable), (sid, result)
                else:
                    assert result is True, (sid, result)
            await waiting.get_many(ids)  # its reads follow MOVED too: its slot map is new
            moved = _moved(source)
            again = await waiting.compare_and_set_many(
                [
                    (r.advanced(r.state, 1, 2.0), r.revision)  # type: ignore[union-attr]
                    for sid, r in zip(ids, records, strict=True)
                    if sid in on_it
                ]
            )
            assert again == [True] * len(on_it)
            after = await store.get_many(ids)
            assert [r.step for r in after] == [1] * len(ids)  # type: ignore[union-attr]
            assert _moved(source) == moved  # both stores now send that bucket to its master
        finally:
            await store.close()
            await waiting.close()
