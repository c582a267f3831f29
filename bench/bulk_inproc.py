"""Bulk steps without the network: the server's bulk endpoint driven in this process.

    python -m bench.bulk_inproc --seconds 3 --rounds 5 --other-python /work/main/.venv/bin/python

Builds the services as ``gruserve serve`` does (memory store unless ``--store`` names a
Redis URL), creates ``--in-flight`` x 64 sessions, and drives
:class:`gruserve.api.v1.bulk.BulkEndpoint` (decode, session path, encode: everything a
binary bulk request costs the server but HTTP parsing and the socket) from ``--in-flight``
concurrent loops, each sending one binary request of 64 single-timestep steps on its own
64 sessions and awaiting its reply. Reports steps per CPU second of this process (steady on
a shared machine, where wall time is not) and per wall second.

``--other-python`` runs the same measurement under another installation's interpreter (an
older commit's venv) in alternate rounds, so before and after come from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from bench.bulk import MEDIA, PER_REQUEST, _bodies


async def _drive(store: str, models_dir: Path, in_flight: int, seconds: float) -> dict[str, float]:
    from gruserve.api.v1.bulk import BulkEndpoint
    from gruserve.server import build_services
    from gruserve.settings import Settings

    settings = Settings(models_dir=models_dir, provider="cpu", session_store=store)
    services = build_services(settings)
    ids = [
        (await services.sessions.create("demo")).session_id for _ in range(in_flight * PER_REQUEST)
    ]
    endpoint = BulkEndpoint(services)
    scope = {
        "type": "http",
        "headers": [(b"content-type", MEDIA.encode())],
        "path_params": {"model": "demo"},
    }
    never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def one(body: bytes) -> int:
        """One request through the endpoint; its status."""
        sent, status = False, []

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return await never  # type: ignore[no-any-return]
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await endpoint(scope, receive, send)
        return status[0]

    async def loop(bodies: list[bytes], until: float, counter: list[int]) -> None:
        i = 0
        while time.perf_counter() < until:
            answered = await one(bodies[i])
            if answered != 200:
                raise RuntimeError(f"bulk request answered {answered}")
            counter[0] += 1
            i = (i + 1) % len(bodies)

    groups = [ids[i * PER_REQUEST : (i + 1) * PER_REQUEST] for i in range(in_flight)]
    bodies = [_bodies(group, True, n) for n, group in enumerate(groups)]
    warm = [0]
    await asyncio.gather(*(loop(b, time.perf_counter() + 0.5, warm) for b in bodies))
    done = [0]
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(loop(b, wall + seconds, done) for b in bodies))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    services.executor.shutdown(wait=True)
    steps = done[0] * PER_REQUEST
    return {"steps_per_cpu_s": steps / cpu, "steps_per_s": steps / wall, "cpu_share": cpu / wall}


def _one(args: argparse.Namespace) -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a server dependency
        pass
    result = asyncio.run(_drive(args.store, args.models_dir, args.in_flight, args.seconds))
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--store", default="memory")
    parser.add_argument("--other-python", type=Path, default=None)
    parser.add_argument("--models-dir", type=Path, default=None)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.one:
        _one(args)
        return
    from bench.models import build

    with tempfile.TemporaryDirectory(prefix="gruserve-bulk-inproc-") as tmp:
        models_dir = Path(tmp)
        build(models_dir)
        pythons = [("this", Path(sys.executable))]
        if args.other_python is not None:
            pythons.append(("other", args.other_python))
        rounds: list[dict[str, Any]] = []
        for round_ in range(args.rounds):
            entry: dict[str, Any] = {"load_average": os.getloadavg()[0]}
            order = pythons if round_ % 2 == 0 else list(reversed(pythons))
            for name, python in order:
                cmd = [str(python), "-m", "bench.bulk_inproc", "--one", "--store", args.store]
                cmd += ["--seconds", str(args.seconds), "--in-flight", str(args.in_flight)]
                cmd += ["--models-dir", str(models_dir)]
                env = {**os.environ, "GRUSERVE_LOG_LEVEL": "warning"}
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                entry[name] = json.loads(out.stdout.strip().splitlines()[-1])
            line = f"round {round_ + 1} (load {entry['load_average']:.1f}):"
            for name, _ in pythons:
                line += f"  {name} {entry[name]['steps_per_cpu_s']:,.0f} steps/CPU-s"
            if args.other_python is not None:
                ratio = entry["this"]["steps_per_cpu_s"] / entry["other"]["steps_per_cpu_s"]
                entry["this_vs_other_per_cpu"] = ratio
                line += f"  ratio {ratio:.2f}"
            print(line, flush=True)
            rounds.append(entry)
    if args.out is not None:
        args.out.write_text(json.dumps({"store": args.store, "rounds": rounds}, indent=2) + "\n")


if __name__ == "__main__":
    main()
