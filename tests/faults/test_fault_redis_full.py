"""A Redis that answers but takes no writes: full, failing its disk, short of replicas.

With ``noeviction`` (Redis's default policy) every write script fails with ``OOM`` once
Redis holds more than ``maxmemory``. gruserve answers those steps and creates 503
``StoreFull`` naming the cause, never 500; nothing of a refused write is stored, reads and
deletes still work, and once memory is freed a numbered resend applies the step once,
with the numbers the model gives. An evicting policy would drop sessions without a word
instead, so the server says so in its start-up log. A Redis whose snapshot failed
(``MISCONF``) or that has fewer replicas than ``min-replicas-to-write`` (``NOREPLICAS``)
refuses writes too, and one running a script past ``busy-reply-threshold`` (``BUSY``)
refuses every call: 503 ``StoreUnavailable`` with the reason, and the same recovery. A real
``redis-server`` each time; ``CONFIG SET maxmemory 1`` makes it full at once.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from bench.redis_topology import Node, wait_for

from conftest import private_redis, serve
from gruserve.client import errors as client_errors


@pytest.fixture
def redis_node(tmp_path: Path) -> Iterator[Node]:
    """A private redis-server of this test's own (its memory settings are changed)."""
    with private_redis(tmp_path) as node:
        yield node
        with contextlib.suppress(redis.RedisError):  # no save at exit into a removed folder
            node.client.config_set("save", "")


def _url(node: Node) -> str:
    return f"redis://127.0.0.1:{node.port}/0"


async def _create(client: httpx.AsyncClient) -> str:
    r = await client.post("/v1/models/simple/sessions", json={})
    assert r.status_code == 201, r.text
    return str(r.json()["session_id"])


async def _step(client: httpx.AsyncClient, sid: str, x: np.ndarray, n: int) -> httpx.Response:
    """Step ``n`` (numbered) of ``sid``: timestep ``x[n]``."""
    return await client.post(f"/v1/sessions/{sid}/step", json={"inputs": x[n].tolist(), "step": n})


def _three_steps(
    resent: httpx.Response,
    read: httpx.Response,
    reference: tuple[list[np.ndarray], dict[str, np.ndarray]],
) -> None:
    """The third step's reply and the session read after it are what the model gives for
    the three steps as one sequence (``reference``): each step applied once."""
    outputs, states = reference
    assert read.json()["step"] == 3
    np.testing.assert_allclose(resent.json()["outputs"], outputs[0][0, 2], atol=1e-5)
    for key, value in states.items():
        np.testing.assert_allclose(read.json()["states"][key], value[0], atol=1e-5)


def _full(error: dict[str, Any]) -> None:
    """``error`` (an error body's ``error``) is the store refusing for want of memory."""
    assert error["type"] == "StoreFull", error
    assert "is full" in error["message"] and "maxmemory" in error["message"], error


async def test_a_full_redis_answers_503_store_full_and_loses_no_step(
    models_dir: Path, tiny_models: dict[str, Any], redis_node: Node, rng: np.random.Generator
) -> None:
    model = tiny_models["simple"]
    x = rng.normal(size=(3, model.features)).astype(np.float32)  # three single-timestep steps
    async for s in serve(models_dir, _url(redis_node)):
        client = s.client
        sid, spare = await _create(client), await _create(client)
        for n in range(2):
            assert (await _step(client, sid, x, n)).status_code == 200

        redis_node.client.config_set("maxmemory", 1)  # every write now over the limit
        refused = await _step(client, sid, x, 2)
        assert refused.status_code == 503, refused.text
        _full(refused.json()["error"])
        known = client_errors.api_error(503, refused.content)  # the Python client's exception
        assert isinstance(known, client_errors.StoreFull)
        assert isinstance(known, client_errors.StoreUnavailable)  # caught as any store outage
        created = await client.post("/v1/models/simple/sessions", json={})
        assert created.status_code == 503
        _full(created.json()["error"])
        bulk = await client.post(
            "/v1/models/simple/steps",
            json={"steps": [{"session_id": sid, "inputs": x[2].tolist(), "step": 2}]},
        )
        assert bulk.status_code == 200, bulk.text
        (item,) = bulk.json()["results"]
        assert item["error"]["status"] == 503
        _full(item["error"])
        assert (await client.get(f"/v1/sessions/{sid}")).json()["step"] == 2  # reads work
        assert (await client.delete(f"/v1/sessions/{spare}")).status_code == 204  # frees room
        text = (await client.get("/metrics")).text
        assert 'gruserve_errors_total{type="StoreFull"} 3.0' in text  # step, create, bulk step

        redis_node.client.config_set("maxmemory", 0)
        resent = await _step(client, sid, x, 2)
        assert resent.status_code == 200, resent.text
        assert (await _step(client, sid, x, 2)).json() == resent.json()  # kept: applied once
        read = await client.get(f"/v1/sessions/{sid}", params={"include_state": "true"})
        _three_steps(resent, read, model.reference(x[None]))


def _refuse(node: Node, code: str) -> threading.Thread | None:
    """Make ``node`` refuse writes with error ``code`` (``BUSY``: every call; the thread
    running the script that keeps it busy is returned, for :func:`_allow` to end)."""
    if code == "NOREPLICAS":
        node.client.config_set("min-replicas-to-write", 1)  # and it has none
        return None
    if code == "BUSY":
        node.client.config_set("busy-reply-threshold", 10)  # ms a script runs before BUSY
        looping = threading.Thread(target=_loop_until_killed, args=(node.port,), daemon=True)
        looping.start()

        def busy() -> bool:
            try:
                node.client.ping()
            except redis.ResponseError as exc:
                return str(exc).startswith("BUSY")
            return False

        wait_for(busy, "a script keeping Redis busy")
        return looping
    node.client.config_set("save", "3600 1")  # snapshots on, and the next one fails:
    shutil.rmtree(node.dir)  # no folder to write its temporary file in
    node.client.bgsave()

    def failed() -> bool:
        persistence = node.info("persistence")
        return (
            persistence["rdb_bgsave_in_progress"] == 0
            and persistence["rdb_last_bgsave_status"] == "err"
        )

    wait_for(failed, "a failed BGSAVE")
    return None


def _loop_until_killed(port: int) -> None:
    """Run a script that never ends on its own (it writes nothing, so SCRIPT KILL ends it)."""
    with redis.Redis(port=port) as client, contextlib.suppress(redis.ResponseError):
        client.eval("while true do end", 0)


def _allow(node: Node, code: str, looping: threading.Thread | None) -> None:
    if code == "NOREPLICAS":
        node.client.config_set("min-replicas-to-write", 0)
    elif code == "BUSY":
        node.client.script_kill()
        assert looping is not None
        looping.join(timeout=30)
        assert not looping.is_alive()
    else:
        node.client.config_set("save", "")  # no snapshots: writes no longer wait on one


@pytest.mark.parametrize("code", ["NOREPLICAS", "MISCONF", "BUSY"])
async def test_a_redis_refusing_writes_answers_503_and_loses_no_step(
    models_dir: Path,
    tiny_models: dict[str, Any],
    redis_node: Node,
    rng: np.random.Generator,
    code: str,
) -> None:
    model = tiny_models["simple"]
    x = rng.normal(size=(3, model.features)).astype(np.float32)
    async for s in serve(models_dir, _url(redis_node)):
        client = s.client
        sid = await _create(client)
        for n in range(2):
            assert (await _step(client, sid, x, n)).status_code == 200

        looping = _refuse(redis_node, code)
        refused = await _step(client, sid, x, 2)
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["type"] == "StoreUnavailable" and code in error["message"], error
        assert "script:" not in error["message"]  # which line of gruserve's Lua: noise
        read = await client.get(f"/v1/sessions/{sid}")
        if code == "BUSY":  # Redis runs nothing else, reads included
            assert read.status_code == 503 and "BUSY" in read.text, read.text
        else:
            assert read.json()["step"] == 2

        _allow(redis_node, code, looping)
        resent = await _step(client, sid, x, 2)
        assert resent.status_code == 200, resent.text
        read = await client.get(f"/v1/sessions/{sid}", params={"include_state": "true"})
        _three_steps(resent, read, model.reference(x[None]))


async def test_start_up_warns_when_redis_would_evict_sessions(
    models_dir: Path,
    tiny_models: dict[str, Any],
    redis_node: Node,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gruserve")
    async for s in serve(models_dir, _url(redis_node)):  # no limit: nothing is ever evicted
        assert await s.services.store.cautions() == []
    assert "evicts keys" not in caplog.text

    redis_node.client.config_set("maxmemory", 64 * 2**20)
    redis_node.client.config_set("maxmemory-policy", "volatile-lru")
    async for s in serve(models_dir, _url(redis_node)):
        (caution,) = await s.services.store.cautions()
        assert "maxmemory-policy volatile-lru" in caution and "noeviction" in caution
    assert f"session store: redis at 127.0.0.1:{redis_node.port} evicts keys" in caplog.text

    redis_node.client.config_set("maxmemory-policy", "noeviction")  # full: refuses, loses none
    async for s in serve(models_dir, _url(redis_node)):
        assert await s.services.store.cautions() == []


async def test_cluster_masters_are_each_asked(
    models_dir: Path, tiny_models: dict[str, Any], cluster_url: str, redis_cluster: Any
) -> None:
    async for s in serve(models_dir, cluster_url):
        assert await s.services.store.cautions() == []
        victim = redis_cluster.masters()[-1]
        victim.client.config_set("maxmemory", 64 * 2**20)
        victim.client.config_set("maxmemory-policy", "allkeys-lfu")
        try:
            (caution,) = await s.services.store.cautions()
            assert "maxmemory-policy allkeys-lfu" in caution and "cluster" in caution
        finally:
            victim.client.config_set("maxmemory", 0)
            victim.client.config_set("maxmemory-policy", "noeviction")
