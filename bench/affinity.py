"""Two replicas on one Redis behind the repository's nginx: round robin against the session hash.

    python -m bench.affinity --seconds 6 --rounds 3

Serves the benchmark's ``demo`` model from two ``gruserve serve`` processes sharing a
private ``redis-server`` (no persistence), behind a private, unprivileged nginx running
``deploy/nginx/gruserve.conf`` with one of two upstream blocks made from
``deploy/nginx/upstream-compose.conf``: as shipped (``hash $gruserve_session consistent``:
each session's requests reach one replica) and with that line removed (nginx's default
round robin, what the file held before). Each round runs a REST C=64 closed loop
(``bench.loadgen``, one connection per session) through each nginx in turn, so a machine
whose speed drifts moves both alike; the ratio is the median of the rounds'.

Per run it records steps/s and p99, and per answered step the replicas' kept-record misses
(``gruserve_session_recent_misses``: a step run on a stale kept record, then again),
model runs (``gruserve_batch_size`` sum: above 1, steps that ran twice) and Redis commands
(``INFO commandstats``: ``HMGET`` is one per key in both scripts, ``EVALSHA`` one per
script call). Nothing is pinned: the replicas, nginx, Redis and the load generator share the
machine's cores. WebSockets are not measured: a socket stays on one replica either way.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench import loadgen
from bench.models import build
from bench.run_all import BIN, Server, free_port
from bench.stores import _redis, _redis_counters

NGINX_DIR = Path(__file__).resolve().parents[1] / "deploy" / "nginx"
HASH = re.compile(r"(?m)^\s*hash\s+\$gruserve_session\s+consistent;\n")
REPLICAS = 2
SESSIONS = 64


def _upstream(ports: list[int], hashed: bool) -> str:
    """The compose upstream block on ``ports``, as shipped or without its hash line."""
    text = (NGINX_DIR / "upstream-compose.conf").read_text()
    text, count = HASH.subn("" if not hashed else r"\g<0>", text)
    if count != 1:
        raise SystemExit("deploy/nginx/upstream-compose.conf should hash on $gruserve_session")
    text = re.sub(r"(?m)^\s*server\s+[^;]*;\n", "", text)
    servers = "".join(f"    server 127.0.0.1:{p};\n" for p in ports)
    text = text.replace("upstream gruserve {\n", "upstream gruserve {\n" + servers, 1)
    return re.sub(r"(?ms)^upstream gruserve_grpc \{.*?^\}\n", "", text)  # no gRPC here


@contextmanager
def _nginx(workdir: Path, ports: list[int], hashed: bool) -> Iterator[str]:
    """nginx serving deploy/nginx/gruserve.conf on a free port; yields its URL."""
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if binary is None:
        raise SystemExit("bench.affinity needs nginx (Debian: apt-get install nginx-light)")
    workdir.mkdir(parents=True)
    port = free_port()
    server = re.sub(
        r"(?m)^(\s*)listen\s+8080;",
        rf"\1listen 127.0.0.1:{port};",
        (NGINX_DIR / "gruserve.conf").read_text(),
    )
    (workdir / "gruserve.conf").write_text(server)
    (workdir / "upstream.conf").write_text(_upstream(ports, hashed))
    user = "user root root;\n" if os.geteuid() == 0 else ""
    temp = "".join(
        f"    {kind}_temp_path {workdir}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (workdir / "nginx.conf").write_text(
        f"{user}worker_processes 1;\nevents {{ worker_connections 1024; }}\nhttp {{\n{temp}"
        "    access_log off;\n"
        f"    include {workdir}/upstream.conf;\n    include {workdir}/gruserve.conf;\n}}\n"
    )
    proc = subprocess.Popen(
        [binary, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-g",
         f"daemon off; pid {workdir}/nginx.pid; error_log {workdir}/error.log;"],
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            try:
                httpx.get(url + "/healthz", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"nginx did not start: see {workdir}/error.log") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _replica_counters(url: str) -> dict[str, float]:
    totals = {"misses": 0.0, "runs": 0.0}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("gruserve_session_recent_misses_total"):
            totals["misses"] += float(line.split()[-1])
        elif line.startswith('gruserve_batch_size_sum{model="demo"}'):
            totals["runs"] += float(line.split()[-1])
    return totals


def _counted(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def measure(lb: str, replicas: list[Server], redis_port: int, seconds: float) -> dict[str, Any]:
    """One REST C=64 closed loop through ``lb``, with what the replicas and Redis did."""
    before = [_replica_counters(r.url) for r in replicas]
    calls = _redis_counters(redis_port)
    run = loadgen.run(lb, model="demo", transport="rest", sessions=SESSIONS, seconds=seconds)
    after = [_replica_counters(r.url) for r in replicas]
    calls_after = _redis_counters(redis_port)
    # warm-up included, as in the counters: per step the replicas answered in the window
    answered = sum(a["runs"] - b["runs"] for a, b in zip(after, before, strict=True))
    misses = sum(a["misses"] - b["misses"] for a, b in zip(after, before, strict=True))
    answered -= misses  # a miss ran its step twice: once on the stale record, once again
    return {
        **run,
        "misses_per_step": misses / answered,
        "runs_per_step": (answered + misses) / answered,
        "hmget_per_step": _counted(calls, calls_after, "hmget") / answered,
        "evalsha_per_step": _counted(calls, calls_after, "evalsha") / answered,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/affinity.json"))
    args = parser.parse_args()
    results: dict[str, Any] = {"load_before": os.getloadavg(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="gruserve-affinity-") as tmp:
        work = Path(tmp)
        build(work / "models")
        redis_port = free_port()
        redis = _redis(work, redis_port)
        replicas: list[Server] = []
        ports: list[int] = []
        try:
            for _ in range(REPLICAS):
                port = free_port()
                ports.append(port)
                env = {
                    "GRUSERVE_MODELS_DIR": str(work / "models"),
                    "GRUSERVE_PROVIDER": "cpu",
                    "GRUSERVE_LOG_LEVEL": "warning",
                    "GRUSERVE_GRPC_PORT": "0",
                    "GRUSERVE_SESSION_STORE": f"redis://127.0.0.1:{redis_port}/0",
                }
                replicas.append(
                    Server([str(BIN / "gruserve"), "serve", "--port", str(port)], env, port,
                           "/readyz")
                )  # fmt: skip
            for round_ in range(args.rounds):
                for name, hashed in (("round robin", False), ("session hash", True)):
                    with _nginx(work / f"nginx-{round_}-{int(hashed)}", ports, hashed) as lb:
                        run = {"round": round_, "upstream": name}
                        run |= measure(lb, replicas, redis_port, args.seconds)
                    results["runs"].append(run)
                    print(
                        f"round {round_} {name:>12}: {run['steps_per_s']:8,.0f} steps/s  "
                        f"p99 {run['p99_ms']:5.1f} ms  misses/step {run['misses_per_step']:.3f}"
                        f"  runs/step {run['runs_per_step']:.2f}  "
                        f"HMGET/step {run['hmget_per_step']:.2f}  "
                        f"EVALSHA/step {run['evalsha_per_step']:.3f}",
                        flush=True,
                    )
        finally:
            for replica in replicas:
                replica.stop()
            redis.terminate()
            redis.wait()
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for run in results["runs"]:
        by_round.setdefault(run["round"], {})[run["upstream"]] = run
    ratios = [r["session hash"]["steps_per_s"] / r["round robin"]["steps_per_s"] for r in
              by_round.values()]  # fmt: skip
    results["session hash / round robin, steps/s"] = float(np.median(ratios))
    results["per round"] = ratios
    results["load_after"] = os.getloadavg()
    print(json.dumps({k: results[k] for k in ("session hash / round robin, steps/s",
                                              "per round")}, indent=2))  # fmt: skip
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
