"""Exactly-once creates and steps over REST on a real master + replica, ``store_min_replicas`` 1.

A create (explicit, or in band on a numbered step) or a numbered step (alone or in a bulk
request) whose write reached the master but no replica answers 503; its resend answers
503 again while the replica is away (the resend is acknowledged only as a write is), then,
with the replica back, what the first send would have answered; the session then steps
as any other. A create of an id another create really took stays 409. WAIT fails
deterministically: the replica is killed and the master has noticed before the request
is sent. The same rule on the memory store: tests/api/test_v1_sessions.py
(``test_session_lifecycle``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cluster_helpers import replicated_redis, wait_for
from conftest import Served, serve
from gruserve.sessions.resend import same_create
from gruserve.sessions.store import SessionRecord
from redis_records import stored_field


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    with replicated_redis(tmp_path) as pair:
        yield pair


@pytest.fixture
async def served(
    nodes: tuple[Any, Any], models_dir: Path, tiny_models: dict[str, Any]
) -> AsyncIterator[Served]:
    master, _ = nodes
    url = f"redis://127.0.0.1:{master.port}/0"
    async for s in serve(models_dir, url, store_min_replicas=1, store_wait_ms=300):
        yield s


def _replica_away(master: Any, replica: Any) -> None:
    replica.kill()
    wait_for(lambda: master.info("replication")["connected_slaves"] == 0, "the master to notice")


def _replica_back(master: Any, replica: Any) -> None:
    replica.restart()
    wait_for(lambda: replica.info("replication")["master_link_status"] == "up", "the resync")
    wait_for(lambda: master.online_replicas() == 1, "the master to count it (online)")


def _revision(node: Any, sid: str) -> int | None:
    value = node.client.hget(f"gruserve:session:{sid}", "revision")
    return None if value is None else int(value)


async def test_a_create_resent_after_a_503_gets_the_first_answer(
    served: Served, nodes: tuple[Any, Any], rng: np.random.Generator
) -> None:
    master, replica = nodes
    client = served.client
    start = {"gru": rng.normal(size=4).astype(np.float32).tolist()}
    body = {"session_id": "once", "initial_state": start}
    _replica_away(master, replica)
    r = await client.post("/v1/models/simple/sessions", json=body)
    assert r.status_code == 503, r.text
    assert _revision(master, "once") == 0  # the write reached the master: only WAIT failed
    r = await client.post("/v1/models/simple/sessions", json=body)
    assert r.status_code == 503, r.text  # still on no replica: not acknowledged yet
    collision = {**body, "initial_state": {"gru": [0.0] * 4}}  # another create of the id
    r = await client.post("/v1/models/simple/sessions", json=collision)
    assert r.status_code == 503, r.text  # the store answers no write while WAIT fails

    _replica_back(master, replica)
    r = await client.post("/v1/models/simple/sessions", json=collision)
    assert r.status_code == 409 and r.json()["error"]["type"] == "SessionExists", r.text
    r = await client.post("/v1/models/simple/sessions", json=body)
    assert r.status_code == 201, r.text
    made = r.json()
    assert (made["session_id"], made["model"], made["step"]) == ("once", "simple", 0)
    # the first send's record (the resend's own would be newer: the resync came between)
    stored = float(stored_field(master.client, "gruserve:session:once", "created_at") or "nan")
    shown = datetime.fromisoformat(made["created_at"].replace("Z", "+00:00")).timestamp()
    assert abs(shown - stored) < 1e-3, (made["created_at"], stored)
    assert _revision(replica, "once") == 0  # acknowledged: the replica has it now
    again = await client.post("/v1/models/simple/sessions", json=body)
    assert again.status_code == 201 and again.json() == made

    # it steps as a session created in one go does
    r = await client.post("/v1/models/simple/sessions", json={**body, "session_id": "twin"})
    assert r.status_code == 201, r.text
    x = rng.normal(size=(2, 3)).astype(np.float32).tolist()
    replies = [
        (await client.post(f"/v1/sessions/{sid}/step", json={"inputs": x, "step": 0})).json()
        for sid in ("once", "twin")
    ]
    assert replies[0]["step"] == replies[1]["step"] == 1
    np.testing.assert_array_equal(replies[0]["outputs"], replies[1]["outputs"])
    r = await client.post("/v1/models/simple/sessions", json=body)
    assert r.status_code == 409, r.text  # stepped: no longer what this create made


async def test_an_in_band_create_resent_after_a_503_is_applied_once(
    served: Served, nodes: tuple[Any, Any], rng: np.random.Generator
) -> None:
    master, replica = nodes
    client = served.client
    x = rng.normal(size=(3, 2, 3)).astype(np.float32)
    first = {"inputs": x[0].tolist(), "step": 0, "create": {"model": "simple"}}
    _replica_away(master, replica)
    r = await client.post("/v1/sessions/inband/step", json=first)
    assert r.status_code == 503, r.text
    assert _revision(master, "inband") == 1  # created and stepped on the master only
    r = await client.post("/v1/sessions/inband/step", json=first)
    assert r.status_code == 503, r.text  # the kept result is not acknowledged before WAIT is

    _replica_back(master, replica)
    replies = [
        (await client.post("/v1/sessions/inband/step", json=body)).json()
        for body in (first, {"inputs": x[1].tolist(), "step": 1})
    ]
    # the sequential reference: a session created explicitly and stepped twice
    r = await client.post("/v1/models/simple/sessions", json={"session_id": "ref"})
    assert r.status_code == 201, r.text
    expected = [
        (await client.post("/v1/sessions/ref/step", json={"inputs": x[i].tolist()})).json()
        for i in range(2)
    ]
    assert [r["step"] for r in replies] == [1, 2]
    for got, want in zip(replies, expected, strict=True):
        np.testing.assert_array_equal(got["outputs"], want["outputs"])
    assert _revision(replica, "inband") == 2


async def _numbered(client: Any, kind: str, sid: str, body: dict[str, Any]) -> tuple[int, Any]:
    """``(status, reply)`` of one numbered step, alone or as a bulk request's only item."""
    if kind == "rest":
        r = await client.post(f"/v1/sessions/{sid}/step", json=body)
        return r.status_code, r.json()
    r = await client.post("/v1/models/simple/steps", json={"steps": [{"session_id": sid, **body}]})
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    return (result["error"]["status"] if "error" in result else 200), result


@pytest.mark.parametrize("kind", ["rest", "bulk"])
async def test_a_step_resent_after_a_503_is_acknowledged_once_replicated(
    served: Served, nodes: tuple[Any, Any], rng: np.random.Generator, kind: str
) -> None:
    master, replica = nodes
    client = served.client
    x = rng.normal(size=(2, 3)).astype(np.float32).tolist()
    for sid in ("resent", "ref"):
        r = await client.post("/v1/models/simple/sessions", json={"session_id": sid})
        assert r.status_code == 201, r.text
    body = {"inputs": x, "step": 0}
    _replica_away(master, replica)
    assert (await _numbered(client, kind, "resent", body))[0] == 503
    assert _revision(master, "resent") == 1  # applied on the master only
    assert (await _numbered(client, kind, "resent", body))[0] == 503  # the kept result too

    _replica_back(master, replica)
    status, reply = await _numbered(client, kind, "resent", body)
    assert status == 200 and reply["step"] == 1, reply
    assert _revision(replica, "resent") == 1
    want = (await client.post("/v1/sessions/ref/step", json={"inputs": x})).json()
    np.testing.assert_array_equal(reply["outputs"], want["outputs"])
    status, reply = await _numbered(client, kind, "resent", {"inputs": x, "step": 1})
    assert status == 200 and reply["step"] == 2, reply


def test_only_an_untouched_record_of_the_same_create_counts_as_a_resend() -> None:
    state = np.arange(4, dtype=np.float32)
    made = SessionRecord("s", "m", 1, state, created_at=1.0, last_used_at=1.0, owner="acme")
    assert same_create(made, SessionRecord("s", "m", 1, state.copy(), owner="acme"))
    for other in (
        SessionRecord("s", "m", 1, state, owner="beta"),
        SessionRecord("s", "n", 1, state),
        SessionRecord("s", "m", 2, state, owner="acme"),
        SessionRecord("s", "m", 1, state + 1, owner="acme"),
        SessionRecord("s", "m", 1, state[:3], owner="acme"),
    ):
        assert not same_create(made, other)
    stepped = made.advanced(state, 1, 2.0)
    assert not same_create(stepped, made)
    assert not same_create(made.reset(state, 2.0), made)  # reset: revision 1
