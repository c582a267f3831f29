"""What waiting for replicas costs: single steps at C=64 on Redis with and without ``WAIT``.

    python -m bench.replicas --seconds 5 --rounds 3 [--profile /tmp/spy]
    python -m bench.replicas --cluster --transports rest,ws --seconds 3 --rounds 3 \
        [--other-bin /path/to/old/.venv/bin]

Serves the benchmark's ``demo`` model (GRU(128) over 32 features, Dense(1)) three times
(five with ``--cluster``) from the same code, each on its own private ``redis-server``
database (no persistence):

- ``alone``: a master with no replica (the baseline);
- ``replica, min 0``: a master with one replica (``--replicaof``), writes acknowledged
  once the master has them (``GRUSERVE_STORE_MIN_REPLICAS=0``, asynchronous replication);
- ``replica, min 1``: the same pair, each write batch followed by ``WAIT 1``;
- with ``--cluster``, ``cluster, min 0`` and ``cluster, min 1``: a Redis Cluster of 3
  masters and 3 replicas (bench/redis_topology.py, as the tests start it), both servers
  sharing it (a cluster has one database; session ids keep them apart), written
  without waiting and with one ``WAIT 1`` per master a write wave touches
  (bench/README.md "What ``WAIT`` costs");
- with ``--other-bin``, ``alone (other)`` and (with ``--cluster``) ``cluster, min 0
  (other)`` and ``cluster, min 1 (other)``: the same stores served by another
  installation of gruserve (an older commit's venv), for before/after figures in the
  same run (``alone (other)`` on database 2 of the ``alone`` Redis).

Each run records the server's and the Redis processes' CPU per step (warm-up included)
beside steps/s and p99, and the summary gives every figure as a ratio to ``alone`` and,
for each topology, waiting against not waiting, and each ``(other)`` server against
this code's (``--out``, per transport).

The two replicated servers share the pair (databases 0 and 1) as two deployments of one
Redis would. Each round measures every server back to back (each round starting with
the next server in turn), so a machine whose speed drifts moves every side of each ratio
alike; the ratios reported are the medians of the rounds'. Every server and transport
is measured once, unrecorded, before round 0. Servers run on core 0 and the
load generator on core 1 (two cores or more); the Redis processes float.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import redis

from bench.models import build
from bench.redis_topology import local_cluster
from bench.run_all import BIN, Server, _cpu_seconds
from bench.stores import _pin, _redis

PORT = 8341
BASELINE = "alone"
NOT_WAITING, WAITING = "replica, min 0", "replica, min 1"
CLUSTER_NOT_WAITING, CLUSTER_WAITING = "cluster, min 0", "cluster, min 1"
WAIT_PAIRS = ((WAITING, NOT_WAITING), (CLUSTER_WAITING, CLUSTER_NOT_WAITING))
"""Each topology's ``WAIT`` against no waiting on the same Redis processes."""
OTHER = "{} (other)"
"""A server of ``--other-bin`` serving the store of the name in braces."""
WARMUP_S = 1.0  # the load generator's default warm-up, counted in the CPU per step
METRICS = (
    ("steps/s", "steps_per_s"),
    ("p99", "p99_ms"),
    ("server CPU/step", "server_us_per_step"),
    ("Redis CPU/step", "redis_us_per_step"),
    ("Redis command time/step", "redis_command_us_per_step"),
)
COUNTED = ("evalsha", "wait")
"""Commands counted per step on the masters (``INFO commandstats``): script calls, WAITs."""


def _replica_of(workdir: Path, port: int, master: int) -> subprocess.Popen[bytes]:
    """A replica of ``master`` on ``port``, returned once it is in sync."""
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
    (after the load generator's warm-up) into ``DIR/<name>.txt`` (collapsed stacks; ``name``
    names the store and, with several transports, the transport)."""
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
    """Per transport: each store's medians, and the medians of the rounds' ratios to
    ``alone`` and of each topology's waiting to not waiting."""
    by = {(r["transport"], r["store"], r["round"]): r for r in runs}
    rounds = sorted({r["round"] for r in runs})
    pairs = [(name, BASELINE) for name in names if name != BASELINE]
    pairs += [pair for pair in WAIT_PAIRS if set(pair) <= set(names)]
    # the other installation: its cluster against its own alone, and this code against it
    others = [name for name in names if name.endswith(OTHER[2:])]
    pairs += [(name, OTHER.format(BASELINE)) for name in others if name != OTHER.format(BASELINE)]
    pairs += [(name.removesuffix(OTHER[2:]), name) for name in others]
    summary: dict[str, Any] = {}
    for transport in dict.fromkeys(r["transport"] for r in runs):
        own = {name: [by[transport, name, k] for k in rounds] for name in names}
        figures = summary[transport] = {}
        for name in names:
            for key in [key for _, key in METRICS] + [f"{c}_per_step" for c in COUNTED]:
                figures[f"{name} {key}"] = float(np.median([r[key] for r in own[name]]))
        for name, base in pairs:
            for label, key in METRICS:
                ratios = [r[key] / b[key] for r, b in zip(own[name], own[base], strict=True)]
                figures[f"{name} / {base} {label}"] = float(np.median(ratios))
    return summary


class Topology(NamedTuple):
    """The Redis processes one server's store runs on: their pids (for CPU) and their
    masters' clients (for ``INFO commandstats``)."""

    pids: list[int]
    masters: list[redis.Redis]

    def commands(self) -> dict[str, tuple[int, int]]:
        """Calls and microseconds so far per command, summed over the masters."""
        total: dict[str, tuple[int, int]] = {}
        for client in self.masters:
            for key, stat in client.info("commandstats").items():
                calls, usec = total.get(key.removeprefix("cmdstat_"), (0, 0))
                total[key.removeprefix("cmdstat_")] = (calls + stat["calls"], usec + stat["usec"])
        return total


def _measure(server: Server, topology: Topology, transport: str, seconds: float) -> dict[str, Any]:
    """One C=64 closed-loop run, with the server's and its Redis processes' CPU per step,
    the masters' time in commands per step, and script calls and WAITs per step."""
    cpu, commands = sum(_cpu_seconds(pid) for pid in topology.pids), topology.commands()
    run = server.measure(model="demo", transport=transport, sessions=64, seconds=seconds)
    redis_s = sum(_cpu_seconds(pid) for pid in topology.pids) - cpu
    after = topology.commands()
    steps = run["steps_per_s"] * (seconds + WARMUP_S)
    run["server_us_per_step"] = 1e6 * run["server_cpu_s"] / steps
    run["redis_us_per_step"] = 1e6 * redis_s / steps
    usec = sum(u for _, u in after.values()) - sum(u for _, u in commands.values())
    run["redis_command_us_per_step"] = usec / steps
    for name in COUNTED:
        calls = after.get(name, (0, 0))[0] - commands.get(name, (0, 0))[0]
        run[f"{name}_per_step"] = calls / steps
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="default: bench/replicas.json "
                        "(bench/replicas_cluster.json with --cluster)")  # fmt: skip
    parser.add_argument("--profile", type=Path, default=None, help="py-spy the last round here")
    parser.add_argument("--cluster", action="store_true", help="also 3 masters + 3 replicas")
    parser.add_argument("--transports", default="rest", help="comma-separated: rest,ws")
    parser.add_argument("--other-bin", type=Path, default=None, help="also serve alone and "
                        "the cluster from this venv's bin (before/after)")  # fmt: skip
    args = parser.parse_args()
    out = args.out or Path("bench/replicas_cluster.json" if args.cluster else "bench/replicas.json")
    transports = args.transports.split(",")
    load = [os.getloadavg()]
    runs: list[dict[str, Any]] = []
    redis_procs: list[subprocess.Popen[bytes]] = []
    servers: dict[str, Server] = {}
    with (
        tempfile.TemporaryDirectory(prefix="gruserve-replicas-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        models_dir = Path(tmp) / "models"
        build(models_dir)
        alone, master, replica = PORT + 10, PORT + 11, PORT + 12
        env = {
            "GRUSERVE_MODELS_DIR": str(models_dir),
            "GRUSERVE_PROVIDER": "cpu",
            "GRUSERVE_LOG_LEVEL": "warning",
            "GRUSERVE_GRPC_PORT": "0",
        }
        waiting = {"GRUSERVE_STORE_MIN_REPLICAS": "1"}
        configs = [
            (BASELINE, {"GRUSERVE_SESSION_STORE": f"redis://127.0.0.1:{alone}/0"}),
            (NOT_WAITING, {"GRUSERVE_SESSION_STORE": f"redis://127.0.0.1:{master}/0"}),
            (WAITING, {"GRUSERVE_SESSION_STORE": f"redis://127.0.0.1:{master}/1", **waiting}),
        ]
        try:
            for port in (alone, master):
                folder = Path(tmp) / str(port)
                folder.mkdir()
                redis_procs.append(_redis(folder, port))
            folder = Path(tmp) / str(replica)
            folder.mkdir()
            redis_procs.append(_replica_of(folder, replica, master))
            topologies = {
                BASELINE: Topology([redis_procs[0].pid], [redis.Redis(port=alone)]),
                NOT_WAITING: Topology([p.pid for p in redis_procs[1:]], [redis.Redis(port=master)]),
            }
            topologies[WAITING] = topologies[NOT_WAITING]
            if args.cluster:
                cluster = stack.enter_context(local_cluster(Path(tmp) / "cluster"))
                store = {"GRUSERVE_SESSION_STORE": cluster.url}
                configs += [(CLUSTER_NOT_WAITING, store), (CLUSTER_WAITING, {**store, **waiting})]
                topologies[CLUSTER_NOT_WAITING] = topologies[CLUSTER_WAITING] = Topology(
                    [node.proc.pid for node in cluster.nodes.values()],
                    [node.client for node in cluster.masters()],
                )
            bins = dict.fromkeys((name for name, _ in configs), BIN)
            if args.other_bin is not None:
                other = [
                    (
                        OTHER.format(BASELINE),
                        {"GRUSERVE_SESSION_STORE": f"redis://127.0.0.1:{alone}/2"},
                    )
                ]
                topologies[OTHER.format(BASELINE)] = topologies[BASELINE]
                for name, extra in configs:
                    if name.startswith("cluster"):
                        other.append((OTHER.format(name), extra))
                        topologies[OTHER.format(name)] = topologies[name]
                configs += other
                bins.update(dict.fromkeys((name for name, _ in other), args.other_bin))
            two = (os.cpu_count() or 1) >= 2
            for i, (name, extra) in enumerate(configs):
                port = PORT + i
                command = [str(bins[name] / "gruserve"), "serve", "--port", str(port)]
                servers[name] = Server(
                    ["taskset", "-c", "0", *command] if two else command,
                    {**env, **extra},
                    port,
                    "/readyz",
                )
            _pin(1)
            names = list(servers)
            for name, transport in itertools.product(names, transports):  # none measured cold
                servers[name].measure(model="demo", transport=transport, sessions=64, seconds=1)
            for round_ in range(args.rounds):
                for transport in transports:
                    # each round starts with another server: no side always measured first
                    for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                        server = servers[name]
                        label = name if len(transports) == 1 else f"{name} {transport}"
                        spy = _spy(server, label, args) if round_ == args.rounds - 1 else None
                        run = _measure(server, topologies[name], transport, args.seconds)
                        if spy is not None:
                            spy.wait(timeout=60)
                        runs.append({"store": name, "round": round_, **run})
                        print(
                            f"round {round_} {transport:>4} {name:>15}: "
                            f"{run['steps_per_s']:8.0f} steps/s  p99 {run['p99_ms']:6.2f} ms  "
                            f"server {run['server_us_per_step']:5.0f} us/step  "
                            f"Redis {run['redis_us_per_step']:5.0f} us/step  "
                            f"WAIT {run['wait_per_step']:5.3f}/step",
                            flush=True,
                        )
        finally:
            for server in servers.values():
                server.stop()
            for proc in redis_procs:
                proc.terminate()
                proc.wait(timeout=10)
    load.append(os.getloadavg())
    summary = _summary(runs, [name for name, _ in configs])
    print(json.dumps(summary, indent=2))
    result = {"load_average_1_5_15": {"start": load[0], "end": load[1]}, "summary": summary}
    out.write_text(json.dumps({**result, "runs": runs}, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
