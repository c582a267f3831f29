"""``bench.loadgen``, the load generator behind bench/README.md's fleet figures, still drives a
real ``gruserve serve`` over both transports.

Nothing else runs it between measurements, so a change that breaks it (one did: a typing
fix left the REST loop without its request list) would only show at the next measurement.
Its loop raises on any reply but a 200 (REST) or a binary frame (WebSocket), so each step
it counts is a step the server applied; the sessions' own step counts say so too.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest
from bench import loadgen

sys.path.insert(0, str(Path(__file__).resolve().parent / "deploy"))

from deploy_helpers import free_port, server_env, start_server, stop, wait_ready


@pytest.mark.parametrize("transport", ["rest", "ws"])
def test_the_load_generator_steps_a_real_server(tmp_path: Path, transport: str) -> None:
    port = free_port()
    proc = start_server(port, server_env(), tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, port)
        result = loadgen.run(
            base, "demo", transport, sessions=2, seconds=0.5, warmup=0.1, features=1
        )
        with urllib.request.urlopen(f"{base}/v1/sessions", timeout=30) as reply:
            listed = json.loads(reply.read())["sessions"]
    finally:
        stop(proc)
    assert result["steps"] > 0 and result["p99_ms"] > 0, result
    assert len(listed) == 2
    # the warm-up's steps are applied but not counted
    assert sum(row["step"] for row in listed) >= result["steps"]
