"""Real server processes (``gruserve serve``, ``uvicorn --factory``): NDJSON flushing, replicas."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from conftest import free_port

ATOL = 1e-5
BIN = Path(sys.executable).parent


def _env(models_dir: Path, store: str = "memory", **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRUSERVE_")}
    env.update(
        GRUSERVE_MODELS_DIR=str(models_dir),
        GRUSERVE_PROVIDER="cpu",
        GRUSERVE_SESSION_STORE=store,
        GRUSERVE_LOG_LEVEL="warning",
        # no gRPC unless a test asks: test servers run side by side; 8001 is one port
        **{"GRUSERVE_GRPC_PORT": "0", **extra},
    )
    return env


def _start(
    command: list[str], env: dict[str, str], port: int, cwd: Path
) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = proc.stdout.read().decode() if proc.stdout else ""
            _stop(proc)
            raise RuntimeError(f"server exited: {output}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    _stop(proc)
    raise RuntimeError("server did not become ready")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.fixture
def serve_process(models_dir: Path, tiny_models: dict[str, Any], tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = _start(
        [str(BIN / "gruserve"), "serve", "--port", str(port)], _env(models_dir), port, tmp_path
    )
    yield f"127.0.0.1:{port}"
    _stop(proc)


def test_serve_command_and_ndjson_flushes_each_line(
    serve_process: str, tiny_models: dict[str, Any], rng: np.random.Generator
) -> None:
    base = f"http://{serve_process}"
    sid = httpx.post(f"{base}/v1/models/simple/sessions", json={}).json()["session_id"]
    x = rng.normal(size=(1, 3, 3)).astype(np.float32)
    host, port = serve_process.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            (
                f"POST /v1/sessions/{sid}/stream HTTP/1.1\r\nHost: {host}\r\n"
                "Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
            ).encode()
        )
        reader = sock.makefile("rb")
        replies = []
        for t in range(3):
            line = json.dumps({"inputs": x[0, t].tolist()}).encode() + b"\n"
            sock.sendall(b"%x\r\n%s\r\n" % (len(line), line))
            if t == 0:
                assert reader.readline().startswith(b"HTTP/1.1 200")
                while reader.readline() not in (b"\r\n", b""):
                    pass
            size = int(
                reader.readline().strip(), 16
            )  # the reply arrives before the next line is sent
            replies.append(json.loads(reader.read(size + 2)))
        sock.sendall(b"0\r\n\r\n")
        reader.close()
    assert [r["step"] for r in replies] == [1, 2, 3]
    np.testing.assert_allclose(
        [r["outputs"] for r in replies], tiny_models["simple"].reference(x)[0][0][0], atol=ATOL
    )


def test_serving_imports_no_training_stack(models_dir: Path, tiny_models: dict[str, Any]) -> None:
    code = (
        "import sys\n"
        "from gruserve.server import create_app\n"
        "from gruserve.settings import Settings\n"
        f"settings = Settings(_env_file=None, models_dir={str(models_dir)!r}, provider='cpu')\n"
        "app = create_app(settings)\n"
        "heavy = sorted({'torch', 'keras', 'onnx', 'h5py'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
        "assert len(app.state.services.registry.models()) >= 8\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(models_dir),
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_two_processes_on_one_redis_continue_each_other(
    models_dir: Path,
    tiny_models: dict[str, Any],
    redis_url: str,
    tmp_path: Path,
    rng: np.random.Generator,
) -> None:
    ports = [free_port(), free_port()]
    env = _env(models_dir, redis_url)
    procs = [
        _start([str(BIN / "gruserve"), "serve", "--port", str(ports[0])], env, ports[0], tmp_path),
        _start(
            [
                str(BIN / "uvicorn"),
                "--factory",
                "gruserve.server:create_app",
                "--port",
                str(ports[1]),
                "--log-level",
                "warning",
            ],
            env,
            ports[1],
            tmp_path,
        ),
    ]
    try:
        a, b = (f"http://127.0.0.1:{p}" for p in ports)
        made = httpx.post(f"{a}/v1/models/stacked/sessions", json={"session_id": "roaming"})
        sid = made.json()["session_id"]
        # the other replica sees it: the same create resent there is that create (the first
        # answer again, as after a lost reply), another model's create of the id is refused
        again = httpx.post(f"{b}/v1/models/stacked/sessions", json={"session_id": sid})
        assert again.status_code == 201 and again.json() == made.json()
        taken = httpx.post(f"{b}/v1/models/simple/sessions", json={"session_id": sid})
        assert taken.status_code == 409 and taken.json()["error"]["type"] == "SessionExists"
        x = rng.normal(size=(1, 8, 3)).astype(np.float32)
        outputs = []
        for t in range(8):  # alternate replicas: each continues where the other left off
            r = httpx.post(
                f"{(a, b)[t % 2]}/v1/sessions/{sid}/step", json={"inputs": x[0, t].tolist()}
            )
            assert r.status_code == 200 and r.json()["step"] == t + 1, r.text
            outputs.append(r.json()["outputs"])
        expected, states = tiny_models["stacked"].reference(x)
        np.testing.assert_allclose(outputs, expected[0][0], atol=ATOL)
        got = httpx.get(f"{a}/v1/sessions/{sid}", params={"include_state": "true"}).json()
        for key in states:
            np.testing.assert_allclose(got["states"][key], states[key][0], atol=ATOL)
        assert httpx.delete(f"{b}/v1/sessions/{sid}").status_code == 204
        assert httpx.get(f"{a}/v1/sessions/{sid}").status_code == 404
    finally:
        for proc in procs:
            _stop(proc)


def test_settle_heap_freezes_what_start_up_built() -> None:
    """Run in a child process: freezing the test process would keep every later test's garbage."""
    code = (
        "import gc\n"
        "from gruserve.server import GC_THRESHOLDS, settle_heap\n"
        "before = gc.get_freeze_count()\n"
        "settle_heap()\n"
        "assert gc.get_freeze_count() > before + 1000, gc.get_freeze_count()\n"
        "assert gc.get_threshold() == GC_THRESHOLDS\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_serve_passes_its_settings_to_uvicorn(
    models_dir: Path, tiny_models: dict[str, Any]
) -> None:
    """In a child process: run_server settles the heap, which would stay done in this one."""
    code = (
        "import json, uvicorn\n"
        "from gruserve.server import run_server\n"
        "def fake(app, **kwargs): print(json.dumps(kwargs, default=lambda o: o.__name__))\n"
        "uvicorn.run = fake\n"
        "run_server()\n"
    )
    env = _env(models_dir, GRUSERVE_SHUTDOWN_GRACE_S="3.5", GRUSERVE_KEEPALIVE_S="7")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    kwargs = json.loads(result.stdout.splitlines()[-1])
    assert kwargs["timeout_graceful_shutdown"] == 3.5 and kwargs["timeout_keep_alive"] == 7
    # one write per response (protocols/_http11.py), no server header, X-Forwarded-* only for the
    # access log, which is off below debug level
    assert kwargs["http"] == "GruServeHttpProtocol" and kwargs["server_header"] is False
    assert kwargs["access_log"] is False and kwargs["proxy_headers"] is False


def test_a_memory_store_snapshot_survives_a_restart(
    models_dir: Path, tiny_models: dict[str, Any], tmp_path: Path
) -> None:
    """SIGTERM writes every session; the next start restores them (only those whose model
    version it serves), and they continue exactly as an uninterrupted run would."""
    models = tmp_path / "models"
    for name in ("stacked", "simple"):
        shutil.copytree(models_dir / name, models / name)
    snapshot_path = tmp_path / "state" / "sessions.snapshot"
    snapshot_path.parent.mkdir()
    env = {**_env(models, GRUSERVE_SNAPSHOT_PATH=str(snapshot_path)), "GRUSERVE_LOG_LEVEL": "info"}
    rng = np.random.default_rng(21)
    x = {sid: rng.normal(size=(1, 6, 3)).astype(np.float32) for sid in ("plain", "numbered")}

    def step(base: str, sid: str, t: int, number: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"inputs": x[sid][0, t].tolist()}
        if number is not None:
            body["step"] = number
        r = httpx.post(f"{base}/v1/sessions/{sid}/step", json=body)
        assert r.status_code == 200, r.text
        return dict(r.json())

    port = free_port()
    proc = _start([str(BIN / "gruserve"), "serve", "--port", str(port)], env, port, tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        for sid, model in (("plain", "stacked"), ("numbered", "stacked"), ("gone", "simple")):
            created = httpx.post(f"{base}/v1/models/{model}/sessions", json={"session_id": sid})
            assert created.status_code == 201
        replies = {sid: [step(base, sid, t) for t in range(3)] for sid in ("plain",)}
        replies["numbered"] = [step(base, "numbered", t, number=t) for t in range(3)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        _stop(proc)
    assert snapshot_path.is_file()

    shutil.rmtree(models / "simple")  # the next start no longer serves this model
    port = free_port()
    proc = _start([str(BIN / "gruserve"), "serve", "--port", str(port)], env, port, tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        assert not snapshot_path.exists()  # consumed: a crash later cannot bring it back
        assert httpx.get(f"{base}/v1/sessions/gone").status_code == 404
        # the last numbered step before the restart can still be resent: the same reply
        again = httpx.post(
            f"{base}/v1/sessions/numbered/step",
            json={"inputs": x["numbered"][0, 2].tolist(), "step": 2},
        )
        assert again.json() == replies["numbered"][2]
        for t in range(3, 6):
            replies["plain"].append(step(base, "plain", t))
            replies["numbered"].append(step(base, "numbered", t, number=t))
        listed = httpx.get(f"{base}/v1/sessions").json()["sessions"]
        assert [(s["session_id"], s["step"]) for s in listed] == [("numbered", 6), ("plain", 6)]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        output = proc.stdout.read().decode() if proc.stdout else ""
        _stop(proc)
    assert "restored 2 of the 3 sessions" in output and "1 on a model version not served" in output
    for sid in ("plain", "numbered"):
        assert [r["step"] for r in replies[sid]] == list(range(1, 7))
        expected, _ = tiny_models["stacked"].reference(x[sid])
        got = np.stack([r["outputs"] for r in replies[sid]])
        np.testing.assert_allclose(got, expected[0][0], atol=ATOL)
