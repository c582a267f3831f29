"""A Redis that refuses gruserve's user: the README's least-privilege ACL, and a wrong one.

The README's ``ACL SETUSER`` line (Session stores, "Redis users") is applied as written to
a real ``redis-server`` and serves every kind of session request with no denial in
Redis's ``ACL LOG``. A user short of one right (a command a script calls half-way, the
script call itself, the keys) or with a wrong password is found before any request: the
start-up log names what is denied, ``/readyz`` answers 503, and each request answers 503
``StoreDenied`` with nothing stored. Fixing the user in Redis makes the same server serve,
with no restart.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from bench.redis_topology import Node

from conftest import private_redis, serve
from gruserve.client import errors as client_errors
from gruserve.sessions.redis_store._scripts import COUNT, DELETE, PAGE, PERMISSIONS, scripts

PASSWORD = "s3cret"
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_rule() -> list[str]:
    """The rules of the README's ``ACL SETUSER gruserve ...`` line (after the user's name),
    with this test's password."""
    text = README.read_text()
    (line,) = re.findall(r"^\s*(ACL SETUSER gruserve .+)$", text, flags=re.MULTILINE)
    return line.replace("PASSWORD", PASSWORD).split()[3:]


def cluster_additions() -> list[str]:
    """The rights the README adds on a Redis Cluster (its "add `+...`" in that sentence)."""
    text = README.read_text()
    said = text[text.index("On a Redis Cluster, set the same user") :].split(".", 1)[0]
    return re.findall(r"`(\+[^`]+)`", said)[0].split()


def test_the_readme_and_the_permission_check_cover_every_command_gruserve_sends() -> None:
    """Every command any store script calls (each layout, with and without history) is one
    the permission check asks about and the README's line allows, and so is every command
    the store sends itself; a new command in a script fails here, not half-way through a
    write on a production Redis."""
    texts = [COUNT, DELETE, PAGE]
    texts += [text for h in (False, True) for p in (False, True) for text in scripts(h, p)]
    called = set(re.findall(r"redis\.call\('(\w+)'", "\n".join(texts)))
    sent = {"EVALSHA", "SCRIPT", "PING", "WAIT"}  # the calls, script loads, pings, WAIT
    asked = set(re.findall(r"check\('(\w+)'", PERMISSIONS))
    assert called | sent <= asked, (called | sent) - asked
    allowed = {r[1:].split("|")[0].upper() for r in readme_rule() if r.startswith("+")}
    assert asked <= allowed, asked - allowed


@pytest.fixture
def redis_node(tmp_path: Path) -> Iterator[Node]:
    with private_redis(tmp_path) as node:
        version = str(node.info("server")["redis_version"])
        if int(version.split(".")[0]) < 7:
            pytest.skip(f"redis {version}: the permission check needs Redis 7.0 or later")
        yield node


def _url(node: Node) -> str:
    return f"redis://gruserve:{PASSWORD}@127.0.0.1:{node.port}/0"


def _acl_log(client: redis.Redis) -> list[Any]:
    """What Redis denied since the log was reset, but for the optional ``CONFIG GET`` of the
    start-up check (the README leaves it out of the rule)."""
    entries = client.execute_command("ACL", "LOG")
    return [e for e in entries if e[b"object"] != b"config|get"]


async def _create(client: httpx.AsyncClient) -> str:
    r = await client.post("/v1/models/simple/sessions", json={})
    assert r.status_code == 201, r.text
    return str(r.json()["session_id"])


async def test_the_readmes_user_serves_every_session_request_with_no_denial(
    models_dir: Path, tiny_models: dict[str, Any], redis_node: Node, rng: np.random.Generator
) -> None:
    model = tiny_models["simple"]
    redis_node.client.execute_command("ACL", "SETUSER", "gruserve", *readme_rule())
    redis_node.client.execute_command("ACL", "LOG", "RESET")
    x = rng.normal(size=(4, model.features)).astype(np.float32)
    # two sessions at most, the least recently used evicted: every script path runs
    async for s in serve(models_dir, _url(redis_node), max_sessions=2, session_eviction="lru"):
        client = s.client
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert await s.services.store.cautions() == []
        sid, other = await _create(client), await _create(client)
        for n in range(2):
            r = await client.post(f"/v1/sessions/{sid}/step", json={"inputs": x[n].tolist()})
            assert r.status_code == 200, r.text
        numbered = {"inputs": x[2].tolist(), "step": 2}
        first = await client.post(f"/v1/sessions/{sid}/step", json=numbered)
        assert first.status_code == 200, first.text
        resent = await client.post(f"/v1/sessions/{sid}/step", json=numbered)
        assert resent.json() == first.json()  # the kept answer: applied once
        bulk = await client.post(
            "/v1/models/simple/steps",
            json={"steps": [{"session_id": sid, "inputs": x[3].tolist(), "step": 3}]},
        )
        (item,) = bulk.json()["results"]
        assert item["step"] == 4, bulk.text
        listed = await client.get("/v1/sessions")
        assert {row["session_id"] for row in listed.json()["sessions"]} == {sid, other}
        assert "gruserve_sessions 2.0" in (await client.get("/metrics")).text  # counted
        evicting = await _create(client)  # the third: the least recently used (other) goes
        assert (await client.get(f"/v1/sessions/{other}")).status_code == 404
        assert (await client.delete(f"/v1/sessions/{evicting}")).status_code == 204
        read = await client.get(f"/v1/sessions/{sid}", params={"include_state": "true"})
        outputs, states = model.reference(x[None])
        np.testing.assert_allclose(item["outputs"], outputs[0][0, 3], atol=1e-5)
        for key, value in states.items():
            np.testing.assert_allclose(read.json()["states"][key], value[0], atol=1e-5)

    # a session written in the ten-field layout of 0.1.0, then stepped by a packed writer,
    # which rewrites the hash packed and drops the old fields (HDEL) in the same script
    async for s in serve(models_dir, _url(redis_node), store_packed_records=False):
        old = await _create(s.client)
        r = await s.client.post(f"/v1/sessions/{old}/step", json={"inputs": x[0].tolist()})
        assert r.status_code == 200, r.text
    assert redis_node.client.hexists(f"gruserve:session:{old}", "state")
    async for s in serve(models_dir, _url(redis_node)):
        r = await s.client.post(f"/v1/sessions/{old}/step", json={"inputs": x[1].tolist()})
        assert r.status_code == 200, r.text
    assert not redis_node.client.hexists(f"gruserve:session:{old}", "state")  # packed now
    assert _acl_log(redis_node.client) == []  # nothing gruserve sent was denied


def _deny(node: Node, how: str) -> None:
    """The README's user, short of one right (or with another password)."""
    rule = readme_rule()
    if how == "password":
        rule = [">another" if r == f">{PASSWORD}" else r for r in rule]
    elif how == "keys":
        rule = ["~elsewhere:*" if r == "~gruserve:*" else r for r in rule]
    else:
        rule = [r for r in rule if r != f"+{how}"]
    node.client.execute_command("ACL", "SETUSER", "gruserve", "reset", *rule)


@pytest.mark.parametrize(
    ("how", "named"),
    [
        ("hset", "HSET gruserve:"),  # called by the write script after its reads
        ("evalsha", "'evalsha' command"),  # the script call itself
        ("keys", "access one of the keys"),  # the user's keys elsewhere
        ("password", "invalid username-password pair"),
    ],
)
async def test_a_refused_user_is_not_ready_answers_503_store_denied_and_serves_once_fixed(
    models_dir: Path,
    tiny_models: dict[str, Any],
    redis_node: Node,
    rng: np.random.Generator,
    caplog: pytest.LogCaptureFixture,
    how: str,
    named: str,
) -> None:
    model = tiny_models["simple"]
    caplog.set_level(logging.WARNING, logger="gruserve")
    _deny(redis_node, how)
    x = rng.normal(size=(1, model.features)).astype(np.float32)
    async for s in serve(models_dir, _url(redis_node)):
        client = s.client
        assert "refuses gruserve's Redis user" in caplog.text and named in caplog.text
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and named in ready.json()["store"]["error"], ready.text

        created = await client.post("/v1/models/simple/sessions", json={})
        assert created.status_code == 503, created.text
        error = created.json()["error"]
        assert error["type"] == "StoreDenied" and "Redis users" in error["message"], error
        assert "script:" not in error["message"]
        if how == "hset":  # Redis's own words name no command inside a script: say where to look
            assert "/readyz and the start-up log name what it denies" in error["message"]
        known = client_errors.api_error(503, created.content)
        assert isinstance(known, client_errors.StoreDenied)
        assert isinstance(known, client_errors.StoreUnavailable)  # retried as any 503
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200
        assert 'gruserve_errors_total{type="StoreDenied"} 1.0' in metrics.text
        assert redis_node.client.keys("gruserve:*") == []  # nothing of the create stored

        redis_node.client.execute_command("ACL", "SETUSER", "gruserve", "reset", *readme_rule())
        assert (await client.get("/readyz")).status_code == 200  # fixed: no restart
        sid = await _create(client)
        r = await client.post(f"/v1/sessions/{sid}/step", json={"inputs": x[0].tolist()})
        assert r.status_code == 200, r.text
        outputs, _ = model.reference(x[None])
        np.testing.assert_allclose(r.json()["outputs"], outputs[0][0, 0], atol=1e-5)


async def test_the_readmes_user_serves_a_cluster_and_each_master_is_asked(
    models_dir: Path, tiny_models: dict[str, Any], cluster_url: str, redis_cluster: Any
) -> None:
    nodes = redis_cluster.alive()
    x = [0.5] * tiny_models["simple"].features
    rule = [*readme_rule(), *cluster_additions()]
    for node in nodes:
        node.client.execute_command("ACL", "SETUSER", "gruserve", *rule)
        node.client.execute_command("ACL", "LOG", "RESET")
    url = cluster_url.replace("redis+cluster://", f"redis+cluster://gruserve:{PASSWORD}@", 1)
    try:
        async for s in serve(models_dir, url):
            client = s.client
            assert (await client.get("/readyz")).status_code == 200
            assert await s.services.store.cautions() == []
            sids = [await _create(client) for _ in range(16)]
            bulk = await client.post(
                "/v1/models/simple/steps",
                json={"steps": [{"session_id": sid, "inputs": x} for sid in sids]},
            )
            assert [item.get("step") for item in bulk.json()["results"]] == [1] * 16, bulk.text
            assert len((await client.get("/v1/sessions")).json()["sessions"]) == 16
            for node in nodes:
                assert _acl_log(node.client) == [], node.port

            victim = redis_cluster.masters()[-1]  # one master short of HSET
            victim.client.execute_command("ACL", "SETUSER", "gruserve", "-hset")
            (caution,) = await s.services.store.cautions()  # said once for its buckets
            assert f"127.0.0.1:{victim.port} (a master of cluster" in caution, caution
            assert "its ACL denies HSET gruserve:{*}:session:" in caution, caution
    finally:
        for node in nodes:
            node.client.execute_command("ACL", "DELUSER", "gruserve")
