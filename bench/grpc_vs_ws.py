"""gRPC streaming against WebSocket, in one run: steps/s and p99 at C=64, as ratios.

    python -m bench.grpc_vs_ws --seconds 5 --rounds 3

One ``gruserve serve`` (memory store) serves the benchmark's ``demo`` model (GRU(128) over
32 features, Dense(1)) over HTTP and gRPC at once. Each round measures 64 closed-loop
single-timestep sequences over WebSocket (``bench.loadgen``, one connection each) and then
over Triton's ``ModelStreamInfer`` (``bench.grpc_loadgen``, one stream each), back to back
on the same server, so a machine whose speed drifts moves both sides of each ratio alike;
the ratio reported is the median of the rounds'. The server runs on core 0 and the load
generator on core 1 (when the machine has two cores or more).

Each round also measures, with the same load generator, a bare ``ModelStreamInfer`` echo
server (``bench.grpc_echo``, no gruserve code) in each handler form grpcio offers, on the
same core: grpcio's own ceiling; the same echo served by an asyncio HTTP/2 protocol instead
of grpcio (``bench.grpc_h2echo``: ``h2``, ``h2-lean``, and ``h2-lean-gruserve``, which
answers with gruserve's real per-message answer; ``--echoes`` picks the echo servers); and
gruserve's per-message answer with grpcio taken out (``bench.grpc_dataplane``,
in-process). Every run records the server's CPU seconds, so the summary gives server CPU
per step (``server_us_per_step``, warm-up included), the figure that says what a
step costs whichever side is saturated.

``--other-bin`` (e.g. ``/work/main/.venv/bin``) serves the same model from another
installation too, on the same core: each round then also measures its gRPC stream and
its dataplane, and the summary gives this installation's ratios to it (before/after).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench import grpc_loadgen
from bench.grpc_echo import FORMS as ECHOES
from bench.grpc_h2echo import FORMS as H2_ECHOES
from bench.models import build
from bench.run_all import BIN, Server, _cpu_seconds, _machine_busy_seconds

PORT, GRPC_PORT, ECHO_PORT = 8331, 8332, 8333
OTHER_PORT, OTHER_GRPC_PORT = 8334, 8335
DATAPLANE = "v2 dataplane, no grpcio"
OTHER_STREAM, OTHER_DATAPLANE = "grpc-stream (other)", "v2 dataplane, no grpcio (other)"
WARMUP_S = 1.0  # bench.loadgen's and bench.grpc_loadgen's default


def _echo(form: str, seconds: float, sessions: int, pin: bool, models_dir: Path) -> dict[str, Any]:
    """One run against a fresh echo server: ``bench.grpc_echo`` (grpcio) in handler
    ``form``, or ``bench.grpc_h2echo`` (an asyncio HTTP/2 protocol) for its forms."""
    module = "bench.grpc_h2echo" if form in H2_ECHOES else "bench.grpc_echo"
    command = [sys.executable, "-m", module, "--port", str(ECHO_PORT), "--form", form]
    if form in H2_ECHOES:
        command += ["--models-dir", str(models_dir)]
    proc = subprocess.Popen(["taskset", "-c", "0", *command] if pin else command)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ECHO_PORT}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        before, busy = _cpu_seconds(proc.pid), _machine_busy_seconds()
        run = grpc_loadgen.run(f"127.0.0.1:{ECHO_PORT}", "demo", sessions, seconds)
        run["server_cpu_s"] = _cpu_seconds(proc.pid) - before
        run["machine_busy_s"] = _machine_busy_seconds() - busy
        run["transport"] = f"grpc-echo {form}"
        return run
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _dataplane(
    models_dir: Path, seconds: float, sessions: int, pin: bool, python: str = sys.executable
) -> dict[str, Any]:
    """``bench.grpc_dataplane`` in a fresh process on the server's core, run by ``python``
    (another installation's: its gruserve, this checkout's bench)."""
    command = [python, "-m", "bench.grpc_dataplane", "--models-dir", str(models_dir)]
    command += ["--seconds", str(seconds), "--sessions", str(sessions)]
    here = str(Path(__file__).resolve().parent.parent)
    done = subprocess.run(
        ["taskset", "-c", "0", *command] if pin else command,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "GRUSERVE_LOG_LEVEL": "warning", "PYTHONPATH": here},
    )
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "transport": DATAPLANE,
        "steps_per_s": measured["steps_per_s"],
        "server_us_per_step": measured["cpu_us_per_step"],
    }


def _stream(server: Server, port: int, sessions: int, seconds: float, first_id: int) -> Any:
    """The gRPC stream load against ``server``'s gRPC ``port``, with its CPU seconds."""
    before, busy = _cpu_seconds(server.proc.pid), _machine_busy_seconds()
    run = grpc_loadgen.run(f"127.0.0.1:{port}", "demo", sessions, seconds, first_id=first_id)
    run["server_cpu_s"] = _cpu_seconds(server.proc.pid) - before
    run["machine_busy_s"] = _machine_busy_seconds() - busy
    return run


def _per_step_us(run: dict[str, Any], seconds: float) -> float:
    return 1e6 * run["server_cpu_s"] / (run["steps_per_s"] * (seconds + WARMUP_S))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/grpc_vs_ws.json"))
    parser.add_argument(
        "--echoes",
        nargs="*",
        default=list(ECHOES),
        choices=[*ECHOES, *H2_ECHOES],
        help="the echo servers to run each round (bench.grpc_echo, bench.grpc_h2echo forms); "
        "default: grpcio's forms",
    )
    parser.add_argument(
        "--other-bin",
        type=Path,
        default=None,
        help="another installation's bin folder (e.g. /work/main/.venv/bin): its server's "
        "gRPC stream and its dataplane are measured too, each round, for a before/after",
    )
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
        other = None
        if args.other_bin is not None:
            command = [str(args.other_bin / "gruserve"), "serve", "--port", str(OTHER_PORT)]
            other = Server(
                ["taskset", "-c", "0", *command] if two_cores else command,
                {**env, "GRUSERVE_GRPC_PORT": str(OTHER_GRPC_PORT)},
                OTHER_PORT,
                "/readyz",
            )
        try:
            if two_cores:
                os.sched_setaffinity(0, {1})
            for round_ in range(args.rounds):
                ws = server.measure(
                    model="demo", transport="ws", sessions=args.sessions, seconds=args.seconds
                )
                first_id = 1 + round_ * args.sessions
                stream = _stream(server, GRPC_PORT, args.sessions, args.seconds, first_id)
                others = []
                if other is not None:
                    others.append(
                        _stream(other, OTHER_GRPC_PORT, args.sessions, args.seconds, first_id)
                    )
                    others[0]["transport"] = OTHER_STREAM
                echoes = [
                    _echo(form, args.seconds, args.sessions, two_cores, models_dir)
                    for form in args.echoes
                ]
                for run in (ws, stream, *others, *echoes):
                    run["server_us_per_step"] = _per_step_us(run, args.seconds)
                    runs.append({"round": round_, **run})
                    print(
                        f"round {round_} {run['transport']:>11}: {run['steps_per_s']:8.0f} "
                        f"steps/s  p50 {run['p50_ms']:6.2f} ms  p99 {run['p99_ms']:6.2f} ms  "
                        f"server CPU {run['server_cpu_s']:.1f} s "
                        f"({run['server_us_per_step']:.0f} us/step)  client CPU "
                        f"{run['client_cpu_s']:.1f} s",
                        flush=True,
                    )
                insides = [_dataplane(models_dir, args.seconds, args.sessions, two_cores)]
                if args.other_bin is not None:
                    python = str(args.other_bin / "python")
                    insides.append(
                        _dataplane(models_dir, args.seconds, args.sessions, two_cores, python)
                    )
                    insides[1]["transport"] = OTHER_DATAPLANE
                for inside in insides:
                    runs.append({"round": round_, **inside})
                    print(
                        f"round {round_} {inside['transport']}: {inside['steps_per_s']:8.0f} "
                        f"steps/s  ({inside['server_us_per_step']:.0f} us/step)",
                        flush=True,
                    )
        finally:
            server.stop()
            if other is not None:
                other.stop()
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
    echo_names = [f"grpc-echo {form}" for form in args.echoes]
    olds = [OTHER_STREAM, OTHER_DATAPLANE] if args.other_bin is not None else []
    for transport in ("ws", "grpc-stream", *echo_names, DATAPLANE, *olds):
        mine = [r for r in runs if r["transport"] == transport]
        summary[f"{transport} server_us_per_step"] = float(
            np.median([r["server_us_per_step"] for r in mine])
        )
        if transport.startswith("grpc-echo"):
            by_round = {w["round"]: w for _, w in pairs}
            summary[f"{transport} / ws steps_per_s"] = float(
                np.median([r["steps_per_s"] / by_round[r["round"]]["steps_per_s"] for r in mine])
            )
    for new, old in (("grpc-stream", OTHER_STREAM), (DATAPLANE, OTHER_DATAPLANE)):
        if args.other_bin is None:
            break
        by_round = {r["round"]: r for r in runs if r["transport"] == old}
        ratios = [
            (
                r["server_us_per_step"] / by_round[r["round"]]["server_us_per_step"],
                r["steps_per_s"] / by_round[r["round"]]["steps_per_s"],
            )
            for r in runs
            if r["transport"] == new
        ]
        summary[f"{new} / other server_us_per_step"] = float(np.median([a for a, _ in ratios]))
        summary[f"{new} / other steps_per_s"] = float(np.median([b for _, b in ratios]))
    print(json.dumps(summary, indent=2))
    args.out.write_text(json.dumps({"runs": runs, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
