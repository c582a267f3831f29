"""``gruserve serve --workers N``: real processes on one port, sharing a real Redis.

Which worker answered a step is read from the multiprocess metrics folder, where each
worker writes its own samples (``counter_<pid>.db``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port
from gruserve.metrics import SUPERVISOR_FILE, ServerProcesses

BIN = Path(sys.executable).parent
ATOL = 1e-5
MOST_STEPS = 3000
WAIT_S = 120


def _env(store: str, models_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRUSERVE_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(
        GRUSERVE_MODELS_DIR=str(models_dir),
        GRUSERVE_PROVIDER="cpu",
        GRUSERVE_SESSION_STORE=store,
        GRUSERVE_LOG_LEVEL="warning",
        # no gRPC unless a test asks: test servers run side by side; 8001 is one port
        **{"GRUSERVE_GRPC_PORT": "0", **extra},
    )
    return env


def _steps_by_worker(folder: Path) -> dict[int, float]:
    """Steps each worker process has run, from its own counter file."""
    counts: dict[int, float] = {}
    for file in folder.glob("counter_*.db"):
        pid = int(file.stem.split("_")[1])
        one = folder.parent / f"one-{pid}"
        one.mkdir(exist_ok=True)
        shutil.copy(file, one / file.name)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(one))
        counts[pid] = registry.get_sample_value("gruserve_steps_total", {"model": "stacked"}) or 0
    return counts


def _parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


def _wait_ready(proc: subprocess.Popen[bytes], base: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gruserve exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("gruserve did not become ready")


def test_memory_store_refuses_several_workers(models_dir: Path, tmp_path: Path) -> None:
    for args, extra in [(["--workers", "2"], {}), ([], {"GRUSERVE_WORKERS": "3"})]:
        done = subprocess.run(
            [str(BIN / "gruserve"), "serve", "--port", str(free_port()), *args],
            env=_env("memory", models_dir, **extra),
            cwd=tmp_path,
            capture_output=True,
            timeout=120,
        )
        assert done.returncode == 1, done
        message = " ".join(done.stderr.decode().split())
        assert "needs a shared session store" in message, message
        assert "would be unknown to the others" in message


@contextmanager
def _two_workers(
    env: dict[str, str], cwd: Path, stderr: BinaryIO | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``gruserve serve --workers 2`` on a free port with both workers' apps built: the
    supervisor and its HTTP base URL. Stopped with SIGTERM (killed after 60 s) unless the
    test already stopped it."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(BIN / "gruserve"), "serve", "--port", str(port), "--workers", "2"],
        env=env,
        cwd=cwd,
        stderr=stderr,
    )
    try:
        _wait_ready(proc, base)
        folder = Path(env["PROMETHEUS_MULTIPROC_DIR"])
        deadline = time.monotonic() + WAIT_S
        while len(list(folder.glob("counter_*.db"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # the second worker is still building its app
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _step_until_both_answer(folder: Path, step: Callable[[int], None]) -> dict[int, float]:
    """Call ``step(n)`` for n = 0, 1, ... until both workers have run some of the steps (at
    least 20 steps; at most MOST_STEPS, or WAIT_S); the steps each worker ran."""
    counts: dict[int, float] = {}
    n, deadline = 0, time.monotonic() + WAIT_S
    while n < 20 or (
        sum(c > 0 for c in counts.values()) < 2 and n < MOST_STEPS and time.monotonic() < deadline
    ):
        step(n)
        n += 1
        if n % 10 == 0:
            counts = _steps_by_worker(folder)
    return _steps_by_worker(folder)


def test_two_workers_continue_each_others_sessions(
    models_dir: Path, tiny_models: dict[str, Any], redis_url: str, tmp_path: Path
) -> None:
    """Steps over fresh connections land on both workers; the session equals one sequence;
    SIGTERM to the supervisor stops both workers and it exits 0."""
    folder = tmp_path / "metrics"
    env = _env(redis_url, models_dir, PROMETHEUS_MULTIPROC_DIR=str(folder))
    with _two_workers(env, tmp_path) as (proc, base):
        r = httpx.post(f"{base}/v1/models/stacked/sessions", json={"session_id": "shared"})
        assert r.status_code == 201, r.text
        x = np.random.default_rng(7).normal(size=(1, MOST_STEPS, 3)).astype(np.float32)
        outputs = []

        def step(n: int) -> None:
            body = {"inputs": x[0, n : n + 1].tolist(), "step": n}
            r = httpx.post(f"{base}/v1/sessions/shared/step", json=body, timeout=30)
            assert r.status_code == 200 and r.json()["step"] == n + 1, r.text
            outputs.append(r.json()["outputs"])

        counts = _step_until_both_answer(folder, step)
        n = len(outputs)
        workers = [pid for pid, c in counts.items() if c > 0]
        assert len(workers) == 2 and sum(counts.values()) == n, counts
        assert all(_parent_of(pid) == proc.pid for pid in workers)

        expected, states = tiny_models["stacked"].reference(x[:, :n])
        np.testing.assert_allclose(np.concatenate(outputs), expected[0][0], atol=ATOL)
        got = httpx.get(f"{base}/v1/sessions/shared", params={"include_state": "true"}).json()
        assert got["step"] == n
        for key, value in got["states"].items():
            np.testing.assert_allclose(value, states[key][0], atol=ATOL)
        scraped = httpx.get(f"{base}/metrics").text  # any worker's scrape sums both
        assert f'gruserve_steps_total{{model="stacked"}} {float(n)}' in scraped
        # process figures per process: the supervisor and both workers, as /proc has them
        memory = _process_samples(scraped, "process_resident_memory_bytes")
        assert sorted(memory) == sorted([proc.pid, *workers]), memory
        for pid, resident in memory.items():
            status = Path(f"/proc/{pid}/status").read_text()
            kib = int(status.split("VmRSS:")[1].split()[0])
            assert 0.5 < resident / (kib * 1024) < 2, (pid, resident, kib)
        assert sorted(_process_samples(scraped, "process_cpu_seconds_total")) == sorted(memory)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived the supervisor"


def test_two_workers_serve_grpc_on_one_port_and_continue_each_others_sequences(
    models_dir: Path, tiny_models: dict[str, Any], redis_url: str, tmp_path: Path
) -> None:
    """Every worker serves gRPC on the one port (SO_REUSEPORT); steps of one sequence over
    fresh connections land on both and equal one sequence."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    folder, grpc_port = tmp_path / "metrics", free_port()
    env = _env(
        redis_url,
        models_dir,
        PROMETHEUS_MULTIPROC_DIR=str(folder),
        GRUSERVE_GRPC_PORT=str(grpc_port),
    )
    with _two_workers(env, tmp_path) as (_, base):
        rng = np.random.default_rng(11)
        sequence = int(rng.integers(1, 2**62))
        x = rng.normal(size=(1, MOST_STEPS, 3)).astype(np.float32)
        outputs = []

        def step(n: int) -> None:
            # a channel with its own subchannel pool opens its own connection, which the
            # kernel hands to either worker's listening socket
            client = grpcclient.InferenceServerClient(
                f"127.0.0.1:{grpc_port}", channel_args=[("grpc.use_local_subchannel_pool", 1)]
            )
            try:
                tensor = grpcclient.InferInput("inputs", [1, 1, 3], "FP32")
                tensor.set_data_from_numpy(x[:, n : n + 1])
                result = client.infer(
                    "stacked", [tensor], sequence_id=sequence, sequence_start=n == 0
                )
                outputs.append(result.as_numpy("outputs"))
            finally:
                client.close()

        counts = _step_until_both_answer(folder, step)
        n = len(outputs)
        # unnumbered steps: a worker whose kept record went stale (the other worker stepped
        # the session since) runs its batch, loses the compare-and-set and runs it again on
        # the fresh record, so the workers' runs may outnumber the steps
        assert sum(c > 0 for c in counts.values()) == 2 and sum(counts.values()) >= n, counts
        expected, _ = tiny_models["stacked"].reference(x[:, :n])
        np.testing.assert_allclose(np.concatenate(outputs, axis=1)[0], expected[0][0], atol=ATOL)
        got = httpx.get(f"{base}/v1/sessions/v2:stacked:{sequence}").json()
        assert got["step"] == n  # each step applied once


def _process_samples(scraped: str, name: str) -> dict[int, float]:
    """``name``'s value by its ``pid`` label in a scrape."""
    return {
        int(sample.labels["pid"]): sample.value
        for family in text_string_to_metric_families(scraped)
        for sample in family.samples
        if sample.name == name
    }


def test_server_processes_are_the_supervisor_and_its_workers(tmp_path: Path) -> None:
    """ServerProcesses reports ``process_*`` for the supervisor its file names (here this
    process) and each child that wrote samples; not a process that ended, nor one that is
    not the supervisor's child (a pid given again)."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    workers = [subprocess.Popen(sleeper) for _ in range(2)]
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    try:
        for pid in (*(w.pid for w in workers), ended.pid, 1):
            (tmp_path / f"counter_{pid}.db").touch()
        (tmp_path / f"histogram_{workers[0].pid}.db").touch()
        (tmp_path / SUPERVISOR_FILE).write_text(str(os.getpid()))
        collector = ServerProcesses(str(tmp_path))
        expected = sorted([os.getpid(), *(w.pid for w in workers)])
        assert collector.pids() == expected
        registry = CollectorRegistry()
        registry.register(collector)
        for pid in expected:
            labels = {"pid": str(pid)}
            assert (registry.get_sample_value("process_resident_memory_bytes", labels) or 0) > 1e6
            assert registry.get_sample_value("process_cpu_seconds_total", labels) is not None
            assert registry.get_sample_value("process_open_fds", labels)
        # without a supervisor file (multiprocess mode not set up by gruserve serve): every
        # process that wrote samples and still runs
        (tmp_path / SUPERVISOR_FILE).unlink()
        assert collector.pids() == sorted([1, *(w.pid for w in workers)])
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()


def _scrape_lines(base: str, metric: str) -> list[str]:
    text = httpx.get(f"{base}/metrics", timeout=10).text  # a new connection: either worker
    return [line for line in text.splitlines() if line.startswith(metric + "{")]


def test_a_scrape_shows_the_versions_loaded_now(
    models_dir: Path, tiny_models: dict[str, Any], redis_url: str, tmp_path: Path
) -> None:
    """Under --workers 2 (prometheus-client's multiprocess mode), a version that a rollout
    unloads leaves the scrape, as it does from one process (it used to stay as loaded, 1,
    for good), and nothing warns of labels it cannot clear."""
    repo = tmp_path / "repo"
    (repo / "stacked").mkdir(parents=True)
    shutil.copytree(models_dir / "stacked" / "1", repo / "stacked" / "1")
    env = _env(
        redis_url,
        repo,
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
        GRUSERVE_REPOSITORY_POLL_S="0.2",
        GRUSERVE_VERSION_UNLOAD_GRACE_S="0",
    )
    with open(tmp_path / "serve.log", "wb") as log, _two_workers(env, tmp_path, log) as (_, base):
        v1 = 'gruserve_model_loaded{model="stacked",provider="cpu",version="1"} 1.0'
        assert _scrape_lines(base, "gruserve_model_loaded") == [v1]

        staging = repo / "stacked" / ".staging-2"  # version 2 appears whole, as deployed
        shutil.copytree(repo / "stacked" / "1", staging)
        manifest = json.loads((staging / "model.json").read_text())
        (staging / "model.json").write_text(json.dumps({**manifest, "version": 2}))
        staging.rename(repo / "stacked" / "2")

        v2 = v1.replace('version="1"', 'version="2"')
        scrapes: list[list[str]] = []
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:  # each worker polls, loads 2, then unloads 1
            scrapes = [
                _scrape_lines(base, "gruserve_model_loaded")
                + _scrape_lines(base, "gruserve_model_version_bytes")
                for _ in range(6)
            ]
            if all(lines[0] == v2 and len(lines) == 2 for lines in scrapes):
                break
            time.sleep(0.2)
        assert all(lines[0] == v2 and len(lines) == 2 for lines in scrapes), scrapes
        assert all('version="2"' in lines[1] for lines in scrapes), scrapes
    assert "multi-process mode" not in (tmp_path / "serve.log").read_text()
