"""Rollout metrics on a served app's ``/metrics``: ``gruserve_session_upgrades_total``
(model, from_version, to_version, how) and
``gruserve_session_upgrade_replayed_timesteps_total`` (model), for upgrades through
``POST /v1/sessions/{id}/upgrade`` and for the moves ``GRUSERVE_SESSION_ON_VERSION_GONE``
makes. The two tiny versions and the helpers are those of test_upgrade.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import test_upgrade
from prometheus_client.parser import text_string_to_metric_families
from test_upgrade import KEPT, NAME, _chunks, _repo, _stream

from conftest import serve
from fixtures import FEATURES

Samples = dict[tuple[str, ...], float]
versions_dir = test_upgrade.versions_dir  # the module's two exported versions


async def _rollout(client: httpx.AsyncClient) -> tuple[Samples, Samples]:
    """The upgrade counts by (model, from, to, how) and the replayed timesteps by model."""
    text = (await client.get("/metrics")).text
    upgrades: Samples = {}
    replayed: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "gruserve_session_upgrades_total":
                key = (labels["model"], labels["from_version"], labels["to_version"], labels["how"])
                upgrades[key] = sample.value
            elif sample.name == "gruserve_session_upgrade_replayed_timesteps_total":
                replayed[(labels["model"],)] = sample.value
    return upgrades, replayed


async def test_upgrades_are_counted_by_how(
    tmp_path: Path, versions_dir: Path, store_url: str
) -> None:
    repo = _repo(tmp_path, versions_dir, (1, 2))
    async for s in serve(repo, store_url, session_history=KEPT):
        client = s.client
        assert await _rollout(client) == ({}, {})  # nothing before the first move
        for sid in ("cold", "warm"):
            await _stream(client, sid, _chunks(11, 3))  # 9 timesteps each, on version 1
        # refused upgrades move nothing and count nothing
        r = await client.post("/v1/sessions/warm/upgrade", json={"replay": KEPT})
        assert r.status_code == 422 and r.json()["error"]["field"] == "replay"
        r = await client.post("/v1/sessions/ghost/upgrade", json={})
        assert r.status_code == 404
        assert await _rollout(client) == ({}, {})
        r = await client.post("/v1/sessions/cold/upgrade", json={})
        assert r.status_code == 200 and r.json()["replayed"] == 0, r.text
        r = await client.post("/v1/sessions/warm/upgrade", json={"replay": 5})
        assert r.status_code == 200, r.text
        r = await client.post("/v1/sessions/warm/upgrade", json={"version": 1, "replay": 9})
        assert r.status_code == 200 and r.json()["old_version"] == 2, r.text
        r = await client.post("/v1/sessions/cold/upgrade", json={"replay": 0})
        assert r.status_code == 200, r.text
        upgrades, replayed = await _rollout(client)
        assert upgrades == {
            (NAME, "1", "2", "upgrade"): 1.0,
            (NAME, "2", "2", "upgrade"): 1.0,
            (NAME, "1", "2", "replay"): 1.0,
            (NAME, "2", "1", "replay"): 1.0,
        }
        assert replayed == {(NAME,): 14.0}


@pytest.mark.parametrize("policy", ["fail", "reset", "upgrade"])
async def test_moves_of_a_removed_version_are_counted(
    tmp_path: Path, versions_dir: Path, policy: str
) -> None:
    repo = _repo(tmp_path, versions_dir, (1,))
    async for s in serve(repo, session_history=64, session_on_version_gone=policy):
        client = s.client
        for sid in ("a", "b"):
            await _stream(client, sid, _chunks(12, 4))  # 12 timesteps each
        _repo(tmp_path, versions_dir, (2,))
        shutil.rmtree(repo / NAME / "1")
        assert (await client.post(f"/v2/repository/models/{NAME}/load")).status_code == 200
        x = np.zeros((2, FEATURES), np.float32)
        for sid in ("a", "b", "a"):  # the second step of "a" is on version 2: no second move
            r = await client.post(f"/v1/sessions/{sid}/step", json={"inputs": x.tolist()})
            assert r.status_code == (410 if policy == "fail" else 200), r.text
        upgrades, replayed = await _rollout(client)
        if policy == "fail":
            assert (upgrades, replayed) == ({}, {})
            continue
        assert upgrades == {(NAME, "1", "2", f"{policy}-on-gone"): 2.0}
        assert replayed == ({(NAME,): 24.0} if policy == "upgrade" else {})
