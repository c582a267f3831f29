"""The memory store against the Redis store, in one run: steps/s and p99 at C=64, as ratios.

    python -m bench.stores --seconds 5 --rounds 3 [--other-bin /path/to/old/.venv/bin]

Serves the benchmark's ``demo`` model (GRU(128) over 32 features, Dense(1)) twice, once
per store, from the same code: a private ``redis-server`` (no persistence) backs the
Redis server. Each round measures REST and then WebSocket C=64 closed loops on both
servers back to back, so a machine whose speed drifts moves both sides of each ratio
alike; the ratio reported is the median of the rounds'. The servers run on core 0 and the
load generator on core 1 (when the machine has two cores or more); Redis floats, unless
``--redis-core`` pins it (bench/README.md, "Where a Redis step's time goes").

``--other-bin`` adds a third server, the Redis store served by another installation of
gruserve (an older commit's venv), for before/after figures in the same run; ``--fields``
one more, the Redis store writing the record layout of servers before 0.2.0, ten fields
(``GRUSERVE_STORE_PACKED_RECORDS=0``; packed records are the default);
``--recent-off`` one more, this code's Redis store keeping no records
(``GRUSERVE_STORE_RECENT_RECORDS=0``: every step reads); ``--local-writes`` one more, the
Redis store with its step writes answered in the process instead of by Redis (a probe:
``bench/_local_writes.py``). Each Redis run also records the Redis commands and Redis CPU
per step (``INFO commandstats`` / ``cpu`` before and after), and every run how busy the
servers' core was (``/proc/stat``) and the mean batch (``gruserve_batch_size``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.models import build
from bench.run_all import BIN, Server, _machine_busy_seconds, batch_totals

PORT = 8321
WARMUP_S = 1.0
"""Each closed loop's warm-up (loadgen's default): its steps reach Redis but are not counted
in ``steps``, so the per-step Redis counters divide by the steps of warm-up and window."""


def _redis(
    workdir: Path, port: int, extra: list[str] | None = None, core: int | None = None
) -> subprocess.Popen[bytes]:
    """A private ``redis-server`` (no persistence), returned once it answers; ``extra``:
    more of its options (``--replicaof``, bench/replicas.py); ``core``: pinned there
    (None: it floats)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
    pin = ["taskset", "-c", str(core)] if core is not None else []
    options = ["--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(workdir)]
    proc = subprocess.Popen(
        [*pin, binary, *options, *(extra or [])],
        stdout=subprocess.DEVNULL,
    )
    import redis

    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(port=port).ping()
            return proc
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


def _redis_counters(port: int) -> dict[str, float]:
    """Redis's command calls by command (lowercase) and its CPU seconds (``used_cpu_s``),
    so far."""
    import redis

    client = redis.Redis(port=port)
    try:
        stats = client.info("commandstats")
        cpu = client.info("cpu")
    finally:
        client.close()
    counts = {k.removeprefix("cmdstat_"): float(v["calls"]) for k, v in stats.items()}
    counts["used_cpu_s"] = float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])
    return counts


def _pin(core: int) -> None:
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {core})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--other-bin", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/stores.json"))
    parser.add_argument(
        "--redis-core",
        type=int,
        default=None,
        help="pin redis-server to this core (default: it floats over both)",
    )
    parser.add_argument(
        "--fields",
        action="store_true",
        help="also serve the Redis store with GRUSERVE_STORE_PACKED_RECORDS=0",
    )
    parser.add_argument(
        "--recent-off",
        action="store_true",
        help="also serve the Redis store with GRUSERVE_STORE_RECENT_RECORDS=0",
    )
    parser.add_argument(
        "--local-writes",
        action="store_true",
        help="also serve the Redis store with its step writes answered in the process "
        "(bench/_local_writes.py: a probe of what the round trip to Redis costs)",
    )
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gruserve-stores-") as tmp:
        models_dir = Path(tmp) / "models"
        build(models_dir)
        redis_port = PORT + 9
        redis = _redis(Path(tmp), redis_port, core=args.redis_core)
        env = {
            "GRUSERVE_MODELS_DIR": str(models_dir),
            "GRUSERVE_PROVIDER": "cpu",
            "GRUSERVE_LOG_LEVEL": "warning",
            "GRUSERVE_GRPC_PORT": "0",
        }
        redis_env = {"GRUSERVE_SESSION_STORE": f"redis://127.0.0.1:{redis_port}/0"}
        here = [str(BIN / "gruserve")]
        configs = [("memory", here, {}), ("redis", here, redis_env)]
        if args.fields:
            configs.append(
                ("redis (fields)", here, {**redis_env, "GRUSERVE_STORE_PACKED_RECORDS": "0"})
            )
        if args.recent_off:
            configs.append(
                ("redis (no kept)", here, {**redis_env, "GRUSERVE_STORE_RECENT_RECORDS": "0"})
            )
            if args.fields:
                configs.append(
                    (
                        "redis (fields, no kept)",
                        here,
                        {
                            **redis_env,
                            "GRUSERVE_STORE_PACKED_RECORDS": "0",
                            "GRUSERVE_STORE_RECENT_RECORDS": "0",
                        },
                    )
                )
        if args.local_writes:
            probe = [sys.executable, "-m", "bench._local_writes"]
            configs.append(("redis (local writes)", probe, redis_env))
        if args.other_bin is not None:
            configs.append(("redis (other)", [str(args.other_bin / "gruserve")], redis_env))
        servers: dict[str, Server] = {}
        try:
            pin = ["taskset", "-c", "0"] if (os.cpu_count() or 1) >= 2 else []
            for i, (name, command, extra) in enumerate(configs):
                port = PORT + i
                servers[name] = Server(
                    [*pin, *command, "serve", "--port", str(port)],
                    {**env, **extra},
                    port,
                    "/readyz",
                )
            _pin(1)
            for round_ in range(args.rounds):
                for transport in ("rest", "ws"):
                    for name, server in servers.items():
                        before = _redis_counters(redis_port)
                        busy, since = _machine_busy_seconds(0), time.monotonic()
                        batches = batch_totals(httpx.get(server.url + "/metrics").text, "demo")
                        run = server.measure(
                            model="demo",
                            transport=transport,
                            sessions=64,
                            seconds=args.seconds,
                            warmup=WARMUP_S,
                        )
                        run["server_core_busy"] = (_machine_busy_seconds(0) - busy) / (
                            time.monotonic() - since
                        )
                        sums = batch_totals(httpx.get(server.url + "/metrics").text, "demo")
                        run["mean_batch"] = (sums[0] - batches[0]) / max(1.0, sums[1] - batches[1])
                        if name != "memory":
                            after = _redis_counters(redis_port)
                            # the warm-up's steps too, at the window's rate
                            steps = max(1.0, run["steps"] * (1 + WARMUP_S / args.seconds))
                            run["redis_per_step"] = {
                                k: (after.get(k, 0.0) - before.get(k, 0.0)) / steps for k in after
                            }
                        runs.append({"store": name, "round": round_, **run})
                        per = run.get("redis_per_step", {})
                        print(
                            f"round {round_} {transport:>4} {name:>24}: "
                            f"{run['steps_per_s']:8.0f} steps/s  p50 {run['p50_ms']:6.2f} ms  "
                            f"p99 {run['p99_ms']:6.2f} ms  cpu/step "
                            f"{1e6 * run['server_cpu_s'] / max(1, run['steps']):5.0f} us  "
                            f"core 0 {run['server_core_busy']:4.0%}  batch {run['mean_batch']:4.1f}"
                            + (
                                f"  redis: {per.get('evalsha', 0):.3f} evalsha "
                                f"{per.get('hmget', 0):.2f} hmget "
                                f"{1e6 * per.get('used_cpu_s', 0):.1f} us cpu /step"
                                if per
                                else ""
                            ),
                            flush=True,
                        )
        finally:
            for server in servers.values():
                server.stop()
            redis.terminate()
            redis.wait(timeout=10)
    summary: dict[str, Any] = {}
    for transport in ("rest", "ws"):
        for name in servers:
            if name == "memory":
                continue
            pairs = [
                (r, m)
                for r in runs
                for m in runs
                if r["store"] == name
                and m["store"] == "memory"
                and r["transport"] == m["transport"] == transport
                and r["round"] == m["round"]
            ]
            summary[f"{transport} {name} / memory"] = float(
                np.median([r["steps_per_s"] / m["steps_per_s"] for r, m in pairs])
            )
            summary[f"{transport} {name} p99_ms"] = float(
                np.median([r["p99_ms"] for r, _ in pairs])
            )
            for counter in ("evalsha", "hmget", "used_cpu_s"):
                summary[f"{transport} {name} redis {counter} per step"] = float(
                    np.median([r["redis_per_step"].get(counter, 0.0) for r, _ in pairs])
                )
        summary[f"{transport} memory p99_ms"] = float(
            np.median(
                [
                    r["p99_ms"]
                    for r in runs
                    if r["store"] == "memory" and r["transport"] == transport
                ]
            )
        )
        for name in servers:  # every server, memory too: the medians of its rounds
            mine = [r for r in runs if r["store"] == name and r["transport"] == transport]
            for key in ("server_core_busy", "mean_batch"):
                summary[f"{transport} {name} {key}"] = float(np.median([r[key] for r in mine]))
            summary[f"{transport} {name} server_cpu_us_per_step"] = float(
                np.median([1e6 * r["server_cpu_s"] / max(1, r["steps"]) for r in mine])
            )
    print(json.dumps(summary, indent=2))
    args.out.write_text(json.dumps({"runs": runs, "summary": summary}, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
