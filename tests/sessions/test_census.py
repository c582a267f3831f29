"""Sessions per model version on ``/metrics``, on the memory store and on Redis.

The memory store is counted on every scrape; Redis in the background (every
``session_census_interval_s``), so the Redis gauge is waited for as a condition.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import pytest

from conftest import serve
from fixtures import FEATURES, _randomize
from gruserve.export.exporter import export_model
from gruserve.nn import GRU, InputLayer, Sequential
from gruserve.sessions.census import VersionCensus, count_by_version
from gruserve.sessions.memory import MemorySessionStore

DEADLINE_S = 60
NAME = "counted"


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with versions 1 and 2 of one tiny model."""
    root = tmp_path_factory.mktemp("census")
    for version in (1, 2):
        model = Sequential([InputLayer((None, FEATURES)), GRU(3, name="gru")], name=NAME)
        _randomize(model, version)
        export_model(
            model.to_spec(), model.get_weights(), models_dir=root, name=NAME, version=version
        )
    return root


def _gauge(metrics: str) -> dict[int, float]:
    pattern = rf'gruserve_model_version_sessions\{{model="{NAME}",version="(\d+)"\}} (\S+)'
    return {int(v): float(n) for v, n in re.findall(pattern, metrics)}


async def _until(client: httpx.AsyncClient, wanted: dict[int, float]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while (got := _gauge((await client.get("/metrics")).text)) != wanted:
        assert time.monotonic() < deadline, f"gauge {got}, expected {wanted}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_sessions_per_version_gauge(
    both: Path, store: str, request: pytest.FixtureRequest
) -> None:
    url = "memory" if store == "memory" else str(request.getfixturevalue("redis_url"))
    async for s in serve(both, url, session_census_interval_s=0.05):
        client = s.client
        for i, version in enumerate((1, 1, 1, 2, 2)):
            body = {"session_id": f"c{i}", "version": version}
            r = await client.post(f"/v1/models/{NAME}/sessions", json=body)
            assert r.status_code == 201, r.text
        await _until(client, {1: 3.0, 2: 2.0})
        assert (await client.delete("/v1/sessions/c0")).status_code == 204
        assert (await client.delete("/v1/sessions/c3")).status_code == 204
        await _until(client, {1: 2.0, 2: 1.0})
        if store == "redis":  # counted in the background: one task, started with the app
            census = s.services.census
            assert census is not None and not census.in_process
            # a walk of several pages counts each session once
            counts = await count_by_version(s.services.store, page_size=2)
            assert counts == {(NAME, 1): 2, (NAME, 2): 1}


def test_census_refuses_a_bad_interval() -> None:
    with pytest.raises(ValueError, match="interval_s > 0"):
        VersionCensus(MemorySessionStore(ttl_s=60, max_sessions=10), 0)
