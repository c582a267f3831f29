"""``gruserve serve --workers N`` on this machine: 1 vs 2 workers, Redis store, in one run.

    python -m bench.workers --seconds 5 --out bench/workers.json

A private ``redis-server`` is started here; for each worker count a fresh ``gruserve serve``
runs the demo model and ``bench.loadgen`` drives it over REST and WebSocket at C=64 (one
client process, as in ``bench.run_all``). The server's CPU is the sum over its worker
processes, so the load generator's share of the cores can be read beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.models import build
from bench.run_all import BIN, Server, _cpu_seconds, _machine_busy_seconds, free_port


def _family(pid: int) -> list[int]:
    """``pid`` and its children (uvicorn's workers)."""
    children = [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and _parent(int(p.name)) == pid
    ]
    return [pid, *children]


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _measure(server: Server, transport: str, seconds: float) -> dict[str, Any]:
    pids = _family(server.proc.pid)
    before, busy = sum(_cpu_seconds(p) for p in pids), _machine_busy_seconds()
    run = loadgen.run(server.url, model="demo", transport=transport, sessions=64, seconds=seconds)
    total = seconds + 1.0
    run["server_cpu"] = (sum(_cpu_seconds(p) for p in pids) - before) / total
    run["client_cpu"] = run["client_cpu_s"] / total
    run["machine_busy"] = (_machine_busy_seconds() - busy) / total
    run["server_processes"] = len(pids)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("bench/workers.json"))
    args = parser.parse_args()
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        sys.exit("bench.workers needs redis-server (apt-get install redis-server)")
    runs = []
    with tempfile.TemporaryDirectory(prefix="gruserve-workers-") as tmp:
        models_dir = Path(tmp)
        build(models_dir)
        redis_port, port = free_port(), free_port()
        redis = subprocess.Popen(
            [redis_server, "--port", str(redis_port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        try:
            for workers in (1, 2):
                env = {
                    "GRUSERVE_MODELS_DIR": str(models_dir),
                    "GRUSERVE_PROVIDER": "cpu",
                    "GRUSERVE_LOG_LEVEL": "warning",
                    "GRUSERVE_GRPC_PORT": "0",
                    "GRUSERVE_PORT": str(port),
                    "GRUSERVE_SESSION_STORE": f"redis://127.0.0.1:{redis_port}/0",
                    "GRUSERVE_WORKERS": str(workers),
                }
                server = Server([str(BIN / "gruserve"), "serve"], env, port, "/readyz")
                try:
                    for transport in ("rest", "ws"):
                        run = {"workers": workers, **_measure(server, transport, args.seconds)}
                        runs.append(run)
                        print(
                            f"workers={workers} {transport:>4} C=64: {run['steps_per_s']:>8,.0f} "
                            f"steps/s p50 {run['p50_ms']:.2f} ms p99 {run['p99_ms']:.2f} ms  "
                            f"server CPU {run['server_cpu']:.0%}  client CPU "
                            f"{run['client_cpu']:.0%}  busy {run['machine_busy']:.0%}",
                            flush=True,
                        )
                finally:
                    server.stop()
        finally:
            redis.terminate()
            redis.wait()
    args.out.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
