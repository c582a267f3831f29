"""gRPC streaming against WebSocket, in one run: steps/s and p99 at C=64, as ratios.

    python -m bench.grpc_vs_ws --seconds 5 --rounds 3

One ``gruserve serve`` (memory store) serves the benchmark's ``demo`` model (GRU(128) over
32 features, Dense(1)) over HTTP and gRPC at once. Each round measures 64 closed-loop
single-timestep sequences over WebSocket (``bench.loadgen``, one connection each) and then
over Triton's ``ModelStreamInfer`` (``bench.grpc_loadgen``, one stream each), back to back
on the same server, so a machine whose speed drifts moves both sides of each ratio alike;
the ratio reported is the median of the rounds'. The server runs on core 0 and the load
generator on core 1 (when the machine has two cores or more).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench import grpc_loadgen
from bench.models import build
from bench.run_all import BIN, Server, _cpu_seconds, _machine_busy_seconds

PORT, GRPC_PORT = 8331, 8332


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/grpc_vs_ws.json"))
    args = parser.parse_args()
    two_cores = (os.cpu_count() or 1) >= 2
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gruserve-grpc-") as tmp:
        models_dir = Path(tmp) / "models"
        build(models_dir)
        env = {
            "GRUSERVE_MODELS_DIR": str(models_dir),
            "GRUSERVE_PROVIDER": "cpu",
            "GRUSERVE_LOG_LEVEL": "warning",
            "GRUSERVE_GRPC_PORT": str(GRPC_PORT),
        }
        command = [str(BIN / "gruserve"), "serve", "--port", str(PORT)]
        server = Server(
            ["taskset", "-c", "0", *command] if two_cores else command, env, PORT, "/readyz"
        )
        try:
            if two_cores:
                os.sched_setaffinity(0, {1})
            for round_ in range(args.rounds):
                ws = server.measure(
                    model="demo", transport="ws", sessions=args.sessions, seconds=args.seconds
                )
                before, busy = _cpu_seconds(server.proc.pid), _machine_busy_seconds()
                stream = grpc_loadgen.run(
                    f"127.0.0.1:{GRPC_PORT}",
                    "demo",
                    args.sessions,
                    args.seconds,
                    first_id=1 + round_ * args.sessions,
                )
                stream["server_cpu_s"] = _cpu_seconds(server.proc.pid) - before
                stream["machine_busy_s"] = _machine_busy_seconds() - busy
                for run in (ws, stream):
                    runs.append({"round": round_, **run})
                    print(
                        f"round {round_} {run['transport']:>11}: {run['steps_per_s']:8.0f} "
                        f"steps/s  p50 {run['p50_ms']:6.2f} ms  p99 {run['p99_ms']:6.2f} ms  "
                        f"server CPU {run['server_cpu_s']:.1f} s  client CPU "
                        f"{run['client_cpu_s']:.1f} s",
                        flush=True,
                    )
        finally:
            server.stop()
    pairs = [
        (g, w)
        for g in runs
        for w in runs
        if g["transport"] == "grpc-stream" and w["transport"] == "ws" and g["round"] == w["round"]
    ]
    summary: dict[str, Any] = {
        "grpc_stream / ws steps_per_s": float(
            np.median([g["steps_per_s"] / w["steps_per_s"] for g, w in pairs])
        ),
        "ws steps_per_s": float(np.median([w["steps_per_s"] for _, w in pairs])),
        "grpc_stream steps_per_s": float(np.median([g["steps_per_s"] for g, _ in pairs])),
        "ws p99_ms": float(np.median([w["p99_ms"] for _, w in pairs])),
        "grpc_stream p99_ms": float(np.median([g["p99_ms"] for g, _ in pairs])),
    }
    summary["goal_0.8x_ws"] = summary["grpc_stream / ws steps_per_s"] >= 0.8
    print(json.dumps(summary, indent=2))
    args.out.write_text(json.dumps({"runs": runs, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
