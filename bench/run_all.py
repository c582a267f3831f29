"""The whole benchmark in one run (``make bench``): prints a table and the ratios, writes JSON.

1. the in-process limit: ``LoadedModel.run`` in a loop, single-timestep steps, batch 1 and 64;
2. gruserve (``gruserve serve``, one process) over REST and WebSocket at C = 1, 16, 64;
3. the FastAPI + torch per-request baseline (bench/baseline_torch.py) over REST at the same C,
   each point measured right after gruserve's, both servers up at once; the target's point
   (REST, C = 64) in ``--rounds`` alternating pairs, the ratio being the median of the
   pairs' ratios, so a machine whose speed drifts during the run (shared VMs do, by 20% and
   more) moves both sides of each ratio alike;
4. the large model (2 x GRU(512)) over WebSocket at C = 64, batching on vs max batch size 1,
   with the default single onnxruntime intra-op thread (the target's pair) and with 2.
   The two servers of each pair differ only by ``GRUSERVE_BATCH_MAX_SIZE=1``.

Servers and the load generator are separate processes on this machine; the CPU
seconds each used are reported, and so is the CPU the whole machine was busy for,
so the client's share of the cores, and anything else running, is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench import loadgen
from bench.models import FEATURES, build

BIN = Path(sys.executable).parent
CONCURRENCY = (1, 16, 64)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds(core: int | None = None) -> float:
    """CPU seconds the whole machine (or only ``core``) has been busy: every state but idle
    and iowait."""
    name = "cpu" if core is None else f"cpu{core}"
    for line in Path("/proc/stat").read_text().splitlines():
        label, *values = line.split()
        if label == name:
            fields = [int(v) for v in values]
            return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    raise ValueError(f"/proc/stat has no {name!r} line")


def free_port() -> int:
    """A port nothing listens on now, for a server or Redis a bench starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A server subprocess, ready when its health route answers."""

    def __init__(self, command: list[str], env: dict[str, str], port: int, health: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + health, timeout=1).status_code < 500:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{command} did not start")

    def measure(self, **kwargs: Any) -> dict[str, Any]:
        before, busy = _cpu_seconds(self.proc.pid), _machine_busy_seconds()
        result = loadgen.run(self.url, **kwargs)
        result["server_cpu_s"] = _cpu_seconds(self.proc.pid) - before
        result["machine_busy_s"] = _machine_busy_seconds() - busy
        return result

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def in_process(
    models_dir: Path, name: str, batch: int, seconds: float = 2.0, threads: int = 1
) -> float:
    """Steps/s of a bare ``LoadedModel.run`` loop: the ceiling for any transport."""
    from gruserve.repository import ModelRepository
    from gruserve.runtime.model import LoadedModel

    model = LoadedModel(
        ModelRepository(models_dir).resolve(name), ["CPUExecutionProvider"], threads
    )
    x = np.random.default_rng(0).normal(size=(batch, 1, FEATURES)).astype(np.float32)
    states = [np.zeros((batch, u), np.float32) for u in model.signature.state_units]
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        result = model.run(x, None, states)
        states = result.states
        runs += 1
    return batch * runs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    parser.add_argument("--rounds", type=int, default=3, help="REST C=64 pairs vs the baseline")
    args = parser.parse_args()
    seconds = args.seconds
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="gruserve-bench-") as tmp:
        models_dir = Path(tmp)
        weights = build(models_dir)
        limits = {
            f"{name}_b{b}": in_process(models_dir, name, b)
            for name in ("demo", "large")
            for b in (1, 64)
        }
        limits.update(
            {f"large_b{b}_intra2": in_process(models_dir, "large", b, threads=2) for b in (1, 64)}
        )
        results["in_process_steps_per_s"] = limits
        print(
            "in-process onnxruntime loop (steps/s):",
            {k: round(v) for k, v in limits.items()},
            flush=True,
        )

        env = {
            "GRUSERVE_MODELS_DIR": str(models_dir),
            "GRUSERVE_PROVIDER": "cpu",
            "GRUSERVE_LOG_LEVEL": "warning",
            "GRUSERVE_GRPC_PORT": "0",
            "GRUSERVE_PORT": "8311",
        }
        server = Server([str(BIN / "gruserve"), "serve"], env, 8311, "/readyz")
        try:
            baseline = Server(
                [
                    sys.executable,
                    "-m",
                    "bench.baseline_torch",
                    "--weights",
                    str(weights),
                    "--port",
                    "8312",
                ],
                {},
                8312,
                "/docs",
            )
        except BaseException:
            server.stop()
            raise
        try:
            points = [("rest", c, 0) for c in CONCURRENCY[:-1]]
            points += [("rest", CONCURRENCY[-1], r) for r in range(args.rounds)]
            for transport, c, round_ in points:  # each baseline point right after gruserve's
                for name, target in (("gruserve", server), ("fastapi+torch", baseline)):
                    run = target.measure(
                        model="demo", transport=transport, sessions=c, seconds=seconds
                    )
                    results["runs"].append(
                        {"server": name, "model": "demo", **run, "round": round_}
                    )
                    _print(results["runs"][-1])
            for c in CONCURRENCY:
                run = server.measure(model="demo", transport="ws", sessions=c, seconds=seconds)
                results["runs"].append({"server": "gruserve", "model": "demo", **run})
                _print(results["runs"][-1])
            metrics = httpx.get(server.url + "/metrics").text
            results["demo_mean_batch"] = _mean_batch(metrics, "demo")
        finally:
            server.stop()
            baseline.stop()

        for intra in (1, 2):
            for batch in (None, 1):
                name = "gruserve" if batch is None else "gruserve batch=1"
                extra = {"GRUSERVE_INTRA_OP_THREADS": str(intra)}
                if batch is not None:
                    extra["GRUSERVE_BATCH_MAX_SIZE"] = str(batch)
                large = Server([str(BIN / "gruserve"), "serve"], {**env, **extra}, 8311, "/readyz")
                try:
                    run = large.measure(model="large", transport="ws", sessions=64, seconds=seconds)
                    metrics = httpx.get(large.url + "/metrics").text
                finally:
                    large.stop()
                run["intra_op_threads"] = intra
                run["mean_batch"] = _mean_batch(metrics, "large")
                results["runs"].append({"server": name, "model": "large", **run})
                _print(results["runs"][-1])

    results["ratios"] = _ratios(results)
    print(json.dumps(results["ratios"], indent=2))
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


def batch_totals(metrics: str, model: str) -> tuple[float, float]:
    """``model``'s ``gruserve_batch_size`` sum and count in a ``/metrics`` text (0 before any
    batch): the mean batch of a window is the ratio of their changes."""
    values = {"sum": 0.0, "count": 0.0}
    for line in metrics.splitlines():
        for kind in values:
            if line.startswith(f'gruserve_batch_size_{kind}{{model="{model}"}}'):
                values[kind] = float(line.split()[-1])
    return values["sum"], values["count"]


def _mean_batch(metrics: str, model: str) -> float:
    total, count = batch_totals(metrics, model)
    return total / count if count else float("nan")


def _all(
    results: dict[str, Any],
    server: str,
    model: str,
    transport: str,
    sessions: int,
    intra_op_threads: int | None = None,
) -> list[dict[str, Any]]:
    """Every run of that point, in the order measured (the REST C=64 rounds)."""
    key = (server, model, transport, sessions, intra_op_threads)
    return [
        dict(run)
        for run in results["runs"]
        if (
            run["server"],
            run["model"],
            run["transport"],
            run["sessions"],
            run.get("intra_op_threads"),
        )
        == key
    ]


def _find(results: dict[str, Any], *point: Any) -> dict[str, Any]:
    """The first run of that point (see :func:`_all`)."""
    runs = _all(results, *point)
    if not runs:
        raise KeyError(point)
    return runs[0]


def _ratios(results: dict[str, Any]) -> dict[str, Any]:
    pairs = list(
        zip(
            _all(results, "gruserve", "demo", "rest", 64),
            _all(results, "fastapi+torch", "demo", "rest", 64),
            strict=True,
        )
    )
    per_round = [g["steps_per_s"] / b["steps_per_s"] for g, b in pairs]
    rest_ratio = float(np.median(per_round))
    rest_p99 = float(np.median([g["p99_ms"] for g, _ in pairs]))
    ws64 = _find(results, "gruserve", "demo", "ws", 64)
    large = _find(results, "gruserve", "large", "ws", 64, 1)
    large1 = _find(results, "gruserve batch=1", "large", "ws", 64, 1)
    intra2 = _find(results, "gruserve", "large", "ws", 64, 2)
    intra2_1 = _find(results, "gruserve batch=1", "large", "ws", 64, 2)
    limit = results["in_process_steps_per_s"]["demo_b64"]
    return {
        "rest_c64_vs_fastapi_torch": rest_ratio,
        "rest_c64_vs_fastapi_torch_per_round": per_round,
        "ws_c64_steps_per_s": ws64["steps_per_s"],
        "ws_c64_p99_ms": ws64["p99_ms"],
        "rest_c64_p99_ms": rest_p99,
        "large_batching_vs_batch1": large["steps_per_s"] / large1["steps_per_s"],
        "large_batching_vs_batch1_intra2": intra2["steps_per_s"] / intra2_1["steps_per_s"],
        "ws_c64_vs_in_process_b64_limit": ws64["steps_per_s"] / limit,
        "targets": {
            "rest_c64_5x_baseline": rest_ratio >= 5,
            "ws_c64_30k": ws64["steps_per_s"] >= 30_000,
            "p99_c64_10ms": max(rest_p99, ws64["p99_ms"]) <= 10,
            "large_batching_5x": large["steps_per_s"] >= 5 * large1["steps_per_s"],
        },
    }


def _print(run: dict[str, Any]) -> None:
    total = run["seconds"] + 1.0  # measured seconds plus warm-up, roughly what both sides ran
    intra = f" intra={run['intra_op_threads']}" if "intra_op_threads" in run else ""
    print(
        f"{run['server']:>17} {run['model']:>5}{intra} {run['transport']:>4} "
        f"C={run['sessions']:>2}: {run['steps_per_s']:>8.0f} steps/s  p50 {run['p50_ms']:6.2f} ms  "
        f"p99 {run['p99_ms']:6.2f} ms  server CPU {run['server_cpu_s'] / total:4.0%}  "
        f"client CPU {run['client_cpu_s'] / total:4.0%}  "
        f"machine busy {run['machine_busy_s'] / total:4.0%}",
        flush=True,
    )


if __name__ == "__main__":
    main()
