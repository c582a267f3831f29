"""What a real ``gruserve serve`` logs: the start-up summary, errors answered with their
request ids, WebSocket opens and closes; as text or one JSON object per line."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from conftest import free_port
from gruserve.logs import JsonFormatter
from test_server import BIN, _start
from test_server import _env as _server_env

KEY = "log-test-key"


def _env(models_dir: Path, **extra: str) -> dict[str, str]:
    """The test servers' environment, at info level."""
    return {**_server_env(models_dir), "GRUSERVE_LOG_LEVEL": "info", **extra}


def _stopped_output(proc: subprocess.Popen[bytes]) -> list[str]:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert proc.stdout is not None
    output = proc.stdout.read().decode()
    proc.stdout.close()
    return output.splitlines()


async def _traffic(base: str) -> None:
    """A 401, a 404 and a 409 with known request ids; a WebSocket opened and closed."""
    headers = {"x-api-key": KEY}
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        r = await client.get("/v1/models", headers={"x-request-id": "req-no-key"})
        assert r.status_code == 401
        r = await client.get(
            "/v1/sessions/nobody", headers={**headers, "x-request-id": "req-missing"}
        )
        assert r.status_code == 404
        sid = (await client.post("/v1/models/simple/sessions", json={}, headers=headers)).json()[
            "session_id"
        ]
        r = await client.post(
            f"/v1/sessions/{sid}/step",
            json={"inputs": [1, 2, 3], "step": 5},
            headers={**headers, "x-request-id": "req-order"},
        )
        assert r.status_code == 409
        metrics = (await client.get("/metrics", headers=headers)).text
        assert "process_resident_memory_bytes " in metrics
        assert "process_cpu_seconds_total " in metrics
    ws = base.replace("http", "ws") + f"/v1/sessions/{sid}/ws"
    async with connect(ws, additional_headers={**headers, "x-request-id": "req-ws"}) as sock:
        await sock.send(json.dumps({"inputs": [1, 2, 3]}))
        assert json.loads(await sock.recv())["step"] == 1


@pytest.mark.slow
def test_json_lines_name_the_requests(
    models_dir: Path, tiny_models: dict[str, Any], tmp_path: Path
) -> None:
    port = free_port()
    env = _env(models_dir, GRUSERVE_LOG_FORMAT="json", GRUSERVE_API_KEYS=KEY)
    proc = _start([str(BIN / "gruserve"), "serve", "--port", str(port)], env, port, tmp_path)
    try:
        asyncio.run(_traffic(f"http://127.0.0.1:{port}"))
    finally:
        lines = _stopped_output(proc)
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    messages = [r["message"] for r in records]
    summary = next(m for m in messages if m.startswith("gruserve "))
    assert "simple v1 (cpu)" in summary and "store memory" in summary
    assert "API keys on" in summary and f"listening on http://127.0.0.1:{port}" in summary
    assert "Uvicorn running on" in " ".join(messages)  # uvicorn's records are JSON too
    by_request = {r.get("request_id"): r for r in records if r["logger"] == "gruserve.api.errors"}
    assert by_request["req-no-key"]["message"].startswith("answered 401 MissingApiKey")
    assert by_request["req-missing"]["message"].startswith("answered 404 SessionNotFound")
    assert by_request["req-order"]["message"].startswith("answered 409 StepOutOfOrder")
    assert {by_request[k]["level"] for k in ("req-no-key", "req-missing", "req-order")} == {"info"}
    sockets = [r for r in records if r["logger"] == "gruserve.api.v1.ws"]
    assert [r["message"].split(":")[0] for r in sockets] == ["WebSocket open", "WebSocket closed"]
    assert all(r["request_id"] == "req-ws" for r in sockets)
    assert "client closed 1000" in sockets[1]["message"]


def _start_up_lines(env: dict[str, str], cwd: Path) -> list[str]:
    """What ``gruserve serve`` logs until uvicorn listens (then it is stopped)."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "gruserve"), "serve", "--port", str(port)],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    lines = []
    for raw in proc.stdout:
        lines.append(raw.decode())
        if "Uvicorn running on" in lines[-1]:
            break
    assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 503
    _stopped_output(proc)
    return lines


def test_an_empty_repository_is_warned_about_at_start_up(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    lines = _start_up_lines(_env(tmp_path / "empty"), tmp_path)
    assert any(
        line.startswith("INFO gruserve: gruserve ") and "models none" in line for line in lines
    )
    assert any(line.startswith("WARNING gruserve: no model loaded from") for line in lines)


def test_an_unreachable_store_is_warned_about_at_start_up(
    models_dir: Path, tiny_models: dict[str, Any], tmp_path: Path
) -> None:
    nobody = f"redis://:secret@127.0.0.1:{free_port()}/0"  # nothing listens there
    env = _env(models_dir, GRUSERVE_SESSION_STORE=nobody, GRUSERVE_STORE_TIMEOUT_S="0.5")
    lines = _start_up_lines(env, tmp_path)
    summary = next(line for line in lines if line.startswith("INFO gruserve: gruserve "))
    assert "store redis://***@127.0.0.1:" in summary and "secret" not in "".join(lines)
    assert any(
        line.startswith("WARNING gruserve: the session store (redis) is not ready at start-up")
        for line in lines
    )


def test_the_json_formatter_keeps_the_request_id_and_the_traceback() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord(
            "gruserve", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info()
        )
    record.request_id = "abc"
    line = json.loads(JsonFormatter().format(record))
    assert (line["level"], line["message"], line["request_id"]) == ("error", "failed x", "abc")
    assert "RuntimeError: boom" in line["exception"] and "\n" not in JsonFormatter().format(record)
