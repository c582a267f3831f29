"""Demo steps while a large new version loads: p99 in steady state against p99 during the load.

    python -m bench.rollout --rounds 3 [--out bench/rollout.json]

One server serves the benchmark's ``demo`` (GRU(128) over 32 features, Dense(1)) at
version 1. A C=64 closed loop of single-timestep WebSocket steps (``bench.loadgen``'s
connections, one process) runs on it; each step's completion time is kept with its latency.
Half-way through each round, version 2 of ``demo``, a large model (2 x GRU(512), exported by
the production exporter as ``bench.models`` exports its models), is copied into the
repository (hidden folder, then rename) and loaded through ``POST
/v2/repository/models/demo/load``: read, sha256-checked, compiled and warmed up beside
serving. The loop's sessions were created on version 1 and stay on it. The round compares
the p99 of steps that completed while the load request was in flight with the p99 of the
steps before it, in the same run (the goal: <= 2 x). Version 2 is then moved out again
(and the model rescanned) so the next round loads it anew.

The server runs on core 0 and the load generator on core 1 when there are two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from bench import loadgen
from bench.models import build, export_large
from bench.run_all import BIN, Server, free_port

SESSIONS = 64


class _Timed(list):  # type: ignore[type-arg]
    """The latencies list ``loadgen._session_loop`` appends to, keeping each step's
    completion time too (``time.perf_counter``: CLOCK_MONOTONIC, the same in every process)."""

    def __init__(self) -> None:
        super().__init__()
        self.done: list[float] = []

    def append(self, latency: float) -> None:
        self.done.append(time.perf_counter())
        super().append(latency)


def _worker(url: str, ids: list[str], seconds: float, out: Any) -> None:
    if loadgen.uvloop is not None:
        asyncio.set_event_loop_policy(loadgen.uvloop.EventLoopPolicy())
    timed = _Timed()

    async def main() -> None:
        parts = urlsplit(url)
        start = time.perf_counter()
        await asyncio.gather(
            *(
                loadgen._session_loop(
                    parts.hostname or "127.0.0.1",
                    parts.port or 80,
                    "ws",
                    sid,
                    32,
                    start + seconds,
                    start,
                    timed,
                    seed,
                )
                for seed, sid in enumerate(ids)
            )
        )

    asyncio.run(main())
    out.put({"done": timed.done, "latency": list(timed)})


def _p99(latency: np.ndarray, done: np.ndarray, start: float, end: float) -> tuple[float, int]:
    chosen = latency[(done >= start) & (done < end)]
    return (float(np.percentile(chosen, 99) * 1000) if len(chosen) else float("nan")), len(chosen)


def _round(
    server: Server, repo: Path, staged: Path, seconds: float, before_s: float
) -> dict[str, Any]:
    ids = [loadgen.create_session(server.url, "demo") for _ in range(SESSIONS)]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(server.url, ids, seconds, out))
    proc.start()
    time.sleep(1.0 + before_s)  # spawn, then steady steps
    target = repo / "demo" / "2"
    incoming = repo / "demo" / ".incoming-2"
    shutil.copytree(staged, incoming)
    incoming.rename(target)
    load_start = time.perf_counter()
    reply = httpx.post(f"{server.url}/v2/repository/models/demo/load", timeout=300)
    load_end = time.perf_counter()
    if reply.status_code != 200 or reply.json().get("default_version") != 2:
        raise RuntimeError(f"version 2 did not load: {reply.status_code} {reply.text}")
    result = out.get(timeout=seconds + 120)
    proc.join()
    shutil.move(target, repo / "demo" / ".out-2")  # gone again: the next round loads it anew
    httpx.post(f"{server.url}/v2/repository/models/demo/load", timeout=300)
    shutil.rmtree(repo / "demo" / ".out-2")
    for sid in ids:
        httpx.delete(f"{server.url}/v1/sessions/{sid}", timeout=30)
    done, latency = np.asarray(result["done"]), np.asarray(result["latency"])
    first = done.min() if len(done) else load_start
    steady, n_steady = _p99(latency, done, first + 1.0, load_start)  # 1 s of warm-up
    during, n_during = _p99(latency, done, load_start, load_end)
    return {
        "load_s": load_end - load_start,
        "steady_p99_ms": steady,
        "steady_steps": n_steady,
        "loading_p99_ms": during,
        "loading_steps": n_during,
        "ratio": during / steady,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=14.0, help="loop length per round")
    parser.add_argument("--before", type=float, default=6.0, help="steady seconds before loading")
    parser.add_argument("--out", type=Path, default=Path("bench/rollout.json"))
    parser.add_argument(
        "--profile", type=Path, default=None, help="run the server under py-spy (raw, GIL only)"
    )
    args = parser.parse_args()
    pinned = (os.cpu_count() or 1) >= 2
    with tempfile.TemporaryDirectory(prefix="gruserve-rollout-") as tmp:
        staging = Path(tmp) / "staging"
        build(staging)
        staged = export_large(staging, "demo", 2)
        repo = Path(tmp) / "models"
        (repo / "demo").mkdir(parents=True)
        shutil.copytree(staging / "demo" / "1", repo / "demo" / "1")
        port = free_port()  # the machine is shared: a fixed port may be another's server
        command = [str(BIN / "gruserve"), "serve", "--port", str(port)]
        env = {
            "GRUSERVE_MODELS_DIR": str(repo),
            "GRUSERVE_PROVIDER": "cpu",
            "GRUSERVE_LOG_LEVEL": "warning",
            "GRUSERVE_GRPC_PORT": "0",
        }
        server = Server(
            ["taskset", "-c", "0", *command] if pinned else command, env, port, "/readyz"
        )
        spy = None
        if args.profile is not None:  # the first round, GIL-holding samples, every thread
            spy = subprocess.Popen(
                [str(BIN / "py-spy"), "record", "--pid", str(server.proc.pid), "--threads",
                 "--gil", "--format", "raw", "--rate", "250", "-o", str(args.profile),
                 "--duration", str(int(args.seconds + 3))]
            )  # fmt: skip
        try:
            if pinned:
                os.sched_setaffinity(0, {1})
            rounds = []
            for i in range(args.rounds):
                found = _round(server, repo, staged, args.seconds, args.before)
                rounds.append(found)
                print(
                    f"round {i}: load {found['load_s']:.2f} s; p99 steady "
                    f"{found['steady_p99_ms']:.2f} ms ({found['steady_steps']} steps), while "
                    f"loading {found['loading_p99_ms']:.2f} ms ({found['loading_steps']} steps): "
                    f"x{found['ratio']:.2f}",
                    flush=True,
                )
        finally:
            if spy is not None:
                spy.wait(timeout=120)
            server.stop()
    summary = {
        "loading_p99 / steady_p99 (median of rounds)": float(
            np.median([r["ratio"] for r in rounds])
        ),
        "goal": "<= 2",
    }
    report = {
        "model": "demo v1: GRU(128) over 32 features, Dense(1); v2 loaded: 2 x GRU(512), Dense(1)",
        "load": f"C={SESSIONS} closed loop, WebSocket, one timestep per step",
        "cpus": os.cpu_count(),
        "note": "shared, loaded VM (other engineers' tests running): ratios in one run only",
        "rounds": rounds,
        "summary": summary,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
