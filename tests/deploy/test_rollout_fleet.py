"""A rollout across a fleet: two ``gruserve serve`` replicas on one Redis behind the
repository's nginx, sharing one repository folder and polling it; version 2 of the demo
model is copied in (atomically) while 64 sessions stream steps through nginx.

Acceptance (issue 15): no step fails; sessions created before keep version 1's numbers;
once each replica has polled, its index shows version 2 READY and default, and sessions
created on it afterwards run on version 2 with version 2's numbers. "Once polled" is
waited for as a condition with a generous deadline, never timed: a busy machine polls late.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from deploy_helpers import (
    REPO,
    copy_in_atomically,
    export_demo_version,
    find_nginx,
    free_port,
    nginx,
    server_env,
    start_server,
    stop,
    wait_ready,
)

ATOL = RTOL = 1e-5  # outputs are in raw sunspot units (tens): float32 holds ~7 digits
STREAMS = 64
POLL_S = "0.25"
DEADLINE_S = 120  # for both replicas to have polled and loaded: generous on a loaded machine


class Fleet:
    def __init__(self, lb: str, replicas: list[str], repo: Path) -> None:
        self.lb, self.replicas, self.repo = lb, replicas, repo


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Version 2 of the demo, exported outside the served repository."""
    return export_demo_version(tmp_path_factory.mktemp("staged"), 2, seed=15)


@pytest.fixture(scope="module")
def fleet(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    find_nginx()
    workdir = tmp_path_factory.mktemp("fleet")
    repo = workdir / "models"
    shutil.copytree(REPO / "models", repo)  # the shared repository (a volume in production)
    ports = [free_port() for _ in range(2)]
    env = server_env(redis_server, GRUSERVE_REPOSITORY_POLL_S=POLL_S)
    env["GRUSERVE_MODELS_DIR"] = str(repo)
    procs: list[subprocess.Popen[bytes]] = [start_server(p, env, workdir) for p in ports]
    try:
        for proc, port in zip(procs, ports, strict=True):
            wait_ready(proc, port)
        with nginx(ports, workdir / "nginx") as (lb, _):
            yield Fleet(lb, [f"127.0.0.1:{p}" for p in ports], repo)
    finally:
        for proc in procs:
            stop(proc)


class Stream:
    """One session stepped one timestep at a time through nginx until told to stop."""

    def __init__(self, session_id: str, version: int) -> None:
        self.session_id, self.version = session_id, version
        self.inputs: list[float] = []
        self.outputs: list[float] = []
        self.failures: list[str] = []

    async def run(self, client: httpx.AsyncClient, stop: asyncio.Event, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            x = float(np.float32(rng.uniform(0, 200)))
            try:
                r = await client.post(f"/v1/sessions/{self.session_id}/step", json={"inputs": [x]})
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))
                return
            if r.status_code != 200 or r.json()["version"] != self.version:
                self.failures.append(f"{r.status_code} {r.text}")
                return
            self.inputs.append(x)
            self.outputs.append(float(np.ravel(r.json()["outputs"])[0]))


async def _create(client: httpx.AsyncClient, session_id: str, at: str = "") -> int:
    """Create a demo session (through nginx, or on replica ``at`` = ``http://host:port``)."""
    r = await client.post(f"{at}/v1/models/demo/sessions", json={"session_id": session_id})
    assert r.status_code == 201, r.text
    return int(r.json()["version"])


async def _index(client: httpx.AsyncClient, replica: str) -> dict[int, dict[str, Any]]:
    r = await client.post(f"http://{replica}/v2/repository/index")
    assert r.status_code == 200, r.text
    return {int(e["version"]): e for e in r.json() if e["name"] == "demo"}


async def _reference(client: httpx.AsyncClient, replica: str, version: int, x: list[float]) -> Any:
    """Outputs (T,) of one stateless call of ``version`` over the whole sequence ``x``."""
    tensor = {"name": "inputs", "datatype": "FP32", "shape": [1, len(x), 1], "data": x}
    r = await client.post(
        f"http://{replica}/v2/models/demo/versions/{version}/infer", json={"inputs": [tensor]}
    )
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == str(version)
    return np.asarray(r.json()["outputs"][0]["data"], np.float64)


async def _until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not await condition():
        assert time.monotonic() < deadline, f"not within {DEADLINE_S} s: {what}"
        await asyncio.sleep(0.1)


async def test_new_version_rolls_out_while_64_sessions_stream(fleet: Fleet, staged: Path) -> None:
    limits = httpx.Limits(max_connections=2 * STREAMS)
    async with httpx.AsyncClient(base_url=f"http://{fleet.lb}", timeout=60, limits=limits) as lb:
        old = [Stream(f"fleet-old-{i}", 1) for i in range(STREAMS)]
        for s in old:
            assert await _create(lb, s.session_id) == 1
        stop = asyncio.Event()
        running = [asyncio.create_task(s.run(lb, stop, i)) for i, s in enumerate(old)]

        async def under_way(n: int) -> bool:
            return all(len(s.outputs) >= n or s.failures for s in old)

        await _until(lambda: under_way(2), "every stream under way")
        copy_in_atomically(staged, fleet.repo / "demo")

        async def everywhere_default() -> bool:
            for replica in fleet.replicas:
                index = await _index(lb, replica)
                if 2 not in index or (index[2]["state"], index[2]["default"]) != ("READY", True):
                    return False
            return True

        await _until(everywhere_default, "version 2 READY and default on both replicas")
        # sessions created on each replica from now on are on version 2; they step via nginx
        new = [Stream(f"fleet-new-{i}", 2) for i in range(4)]
        for i, s in enumerate(new):
            replica = fleet.replicas[i % 2]
            assert await _create(lb, s.session_id, at=f"http://{replica}") == 2
        running += [asyncio.create_task(s.run(lb, stop, 1000 + i)) for i, s in enumerate(new)]
        # the old streams carry on across the switch: a few more steps each after it
        marks = {s.session_id: len(s.outputs) for s in old}

        async def carried_on() -> bool:
            fresh = all(len(s.outputs) >= 3 or s.failures for s in new)
            return fresh and all(
                len(s.outputs) >= marks[s.session_id] + 2 or s.failures for s in old
            )

        await _until(carried_on, "every stream stepped after the switch")
        stop.set()
        await asyncio.gather(*running)

        assert [f for s in old + new for f in s.failures] == []
        for s in old + new:
            expected = await _reference(lb, fleet.replicas[-1], s.version, s.inputs)
            np.testing.assert_allclose(s.outputs, expected, rtol=RTOL, atol=ATOL)
        # the two versions really differ: version 2's numbers are not version 1's
        x = old[0].inputs
        v1 = await _reference(lb, fleet.replicas[0], 1, x)
        v2 = await _reference(lb, fleet.replicas[0], 2, x)
        assert not np.allclose(v1, v2, rtol=RTOL, atol=ATOL)
        for replica in fleet.replicas:
            index = await _index(lb, replica)
            assert (index[1]["state"], index[1]["default"]) == ("READY", False)
            info = (await lb.get(f"http://{replica}/v1/sessions/{old[0].session_id}")).json()
            assert (info["version"], info["step"]) == (1, len(old[0].outputs))
