"""What waiting for replicas costs: REST single steps at C=64 on Redis with and without ``WAIT``.

    python -m bench.replicas --seconds 5 --rounds 3 [--profile /tmp/spy]

Serves the benchmark's ``demo`` model (GRU(128) over 32 features, Dense(1)) three times
from the same code, each on its own private ``redis-server`` database (no persistence):

- ``alone``: a master with no replica (the baseline);
- ``replica, min 0``: a master with one replica (``--replicaof``), writes acknowledged
  once the master has them (``GRUSERVE_STORE_MIN_REPLICAS=0``, asynchronous replication);
- ``replica, min 1``: the same pair, each write batch followed by ``WAIT 1``.

The two replicated servers share the pair (databases 0 and 1) as two deployments of one
Redis would. Each round measures every server back to back (each round starting with
the next server in turn), so a machine whose speed drifts moves every side of each ratio
alike; the ratios reported are the medians of the rounds'. Servers run on core 0 and the
load generator on core 1 (two cores or more); the Redis processes float.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.models import build
from bench.run_all import BIN, Server
from bench.stores import _pin, _redis

PORT = 8341
BASELINE = "alone"
NOT_WAITING, WAITING = "replica, min 0", "replica, min 1"


def _replica_of(workdir: Path, port: int, master: int) -> subprocess.Popen[bytes]:
    """A replica of ``master`` on ``port``, returned once it is in sync."""
    import redis

    proc = _redis(workdir, port, ["--replicaof", "127.0.0.1", str(master)])
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 30
    while client.info("replication").get("master_link_status") != "up":
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the replica did not sync")
        time.sleep(0.05)
    return proc


def _spy(server: Server, name: str, args: argparse.Namespace) -> subprocess.Popen[bytes] | None:
    """With ``--profile DIR``: py-spy samples ``server`` during its last round's measurement
    (after the load generator's warm-up) into ``DIR/<name>.txt`` (collapsed stacks)."""
    if args.profile is None:
        return None
    args.profile.mkdir(parents=True, exist_ok=True)
    out = args.profile / (name.replace(", ", "-").replace(" ", "") + ".txt")
    return subprocess.Popen(
        [
            str(BIN / "py-spy"),
            "record",
            "--pid",
            str(server.proc.pid),
            "--format",
            "raw",
            "--duration",
            str(int(args.seconds)),
            "--rate",
            "200",
            "--nonblocking",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _summary(runs: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    by = {(r["store"], r["round"]): r for r in runs}
    rounds = sorted({r["round"] for r in runs})
    for name in names:
        own = [by[name, k] for k in rounds]
        summary[f"{name} steps_per_s"] = float(np.median([r["steps_per_s"] for r in own]))
        summary[f"{name} p99_ms"] = float(np.median([r["p99_ms"] for r in own]))
        if name == BASELINE:
            continue
        base = [by[BASELINE, k] for k in rounds]
        summary[f"{name} / {BASELINE} steps/s"] = float(
            np.median([r["steps_per_s"] / b["steps_per_s"] for r, b in zip(own, base, strict=True)])
        )
        summary[f"{name} / {BASELINE} p99"] = float(
            np.median([r["p99_ms"] / b["p99_ms"] for r, b in zip(own, base, strict=True)])
        )
    if WAITING in names and NOT_WAITING in names:  # WAIT's own cost: same Redis pair
        waiting, not_waiting = ([by[n, k] for k in rounds] for n in (WAITING, NOT_WAITING))
        pairs = list(zip(waiting, not_waiting, strict=True))
        summary[f"{WAITING} / {NOT_WAITING} steps/s"] = float(
            np.median([w["steps_per_s"] / n["steps_per_s"] for w, n in pairs])
        )
        summary[f"{WAITING} / {NOT_WAITING} p99"] = float(
            np.median([w["p99_ms"] / n["p99_ms"] for w, n in pairs])
        )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/replicas.json"))
    parser.add_argument("--profile", type=Path, default=None, help="py-spy the last round here")
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    redis_procs: list[subprocess.Popen[bytes]] = []
    servers: dict[str, Server] = {}
    with tempfile.TemporaryDirectory(prefix="gruserve-replicas-") as tmp:
        models_dir = Path(tmp) / "models"
        build(models_dir)
        alone, master, replica = PORT + 10, PORT + 11, PORT + 12
        env = {
            "GRUSERVE_MODELS_DIR": str(models_dir),
            "GRUSERVE_PROVIDER": "cpu",
            "GRUSERVE_LOG_LEVEL": "warning",
            "GRUSERVE_GRPC_PORT": "0",
        }
        configs = [
            (BASELINE, {"GRUSERVE_SESSION_STORE": f"redis://127.0.0.1:{alone}/0"}),
            (NOT_WAITING, {"GRUSERVE_SESSION_STORE": f"redis://127.0.0.1:{master}/0"}),
            (
                WAITING,
                {
                    "GRUSERVE_SESSION_STORE": f"redis://127.0.0.1:{master}/1",
                    "GRUSERVE_STORE_MIN_REPLICAS": "1",
                },
            ),
        ]
        try:
            for port in (alone, master):
                folder = Path(tmp) / str(port)
                folder.mkdir()
                redis_procs.append(_redis(folder, port))
            folder = Path(tmp) / str(replica)
            folder.mkdir()
            redis_procs.append(_replica_of(folder, replica, master))
            two = (os.cpu_count() or 1) >= 2
            for i, (name, extra) in enumerate(configs):
                port = PORT + i
                command = [str(BIN / "gruserve"), "serve", "--port", str(port)]
                servers[name] = Server(
                    ["taskset", "-c", "0", *command] if two else command,
                    {**env, **extra},
                    port,
                    "/readyz",
                )
            _pin(1)
            names = list(servers)
            for round_ in range(args.rounds):
                # each round starts with another server: no side always measured first
                for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                    server = servers[name]
                    spy = _spy(server, name, args) if round_ == args.rounds - 1 else None
                    run = server.measure(
                        model="demo", transport="rest", sessions=64, seconds=args.seconds
                    )
                    if spy is not None:
                        spy.wait(timeout=60)
                    runs.append({"store": name, "round": round_, **run})
                    print(
                        f"round {round_} {name:>15}: {run['steps_per_s']:8.0f} steps/s  "
                        f"p50 {run['p50_ms']:6.2f} ms  p99 {run['p99_ms']:6.2f} ms",
                        flush=True,
                    )
        finally:
            for server in servers.values():
                server.stop()
            for proc in redis_procs:
                proc.terminate()
                proc.wait(timeout=10)
    summary = _summary(runs, [name for name, _ in configs])
    print(json.dumps(summary, indent=2))
    args.out.write_text(json.dumps({"runs": runs, "summary": summary}, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
