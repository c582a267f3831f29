"""Bulk steps benchmark: 64 sessions per request, a few requests in flight, in one run.

    python -m bench.bulk --seconds 5 --rounds 3 --out bench/bulk.json

Measures, one after the other on this machine:

1. the in-process limit: ``LoadedModel.run`` in a loop at batch 64, single-timestep steps
   (the same loop as ``bench.run_all``'s ``demo_b64``), before and again after each round's
   servers, the round's ratios taken to the mean of the two (a shared VM's speed drifts
   within a round: the limit alone moved by 40 % between rounds on a busy day);
2. ``gruserve serve`` (one process) with the memory store, then one with a Redis store (a
   private ``redis-server`` started here; both servers stay up for the run), each over
   ``POST /v1/models/demo/steps`` in the binary form and in JSON: ``--in-flight`` keep-alive
   connections (4), each a closed loop sending one request of 64 single-timestep steps (its
   own 64 sessions) and waiting for the reply.

Steps/s counts session steps (64 per request); latency is per request. Figures are ratios
to the in-process loop and memory/Redis, as bench/README.md reports them. With ``--rounds``
every point is measured again in each round (both servers stay up), and the ratios are
reported per round, with their median and range: on a shared machine one round moves a lot.

``--other-bin`` adds the same two servers from another installation of gruserve (an older
commit's venv or wrapper scripts), measured in each round beside this one's, for
before/after ratios in one run (``*_other`` keys).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from bench import loadgen
from bench.models import FEATURES, build
from bench.run_all import (
    BIN,
    Server,
    _cpu_seconds,
    _machine_busy_seconds,
    free_port,
    in_process,
)

PER_REQUEST = 64


MEDIA = "application/x-gruserve-steps"


def _bodies(ids: list[str], binary: bool, seed: int, count: int = 8) -> list[bytes]:
    """``count`` request bodies of one single-timestep step per session in ``ids``."""
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(count):
        x = rng.normal(size=(len(ids), FEATURES)).astype(np.float32)
        if binary:
            header = json.dumps(
                {"steps": [{"session_id": sid, "timesteps": 1} for sid in ids]}
            ).encode()
            bodies.append(struct.pack("<I", len(header)) + header + x.astype("<f4").tobytes())
        else:
            steps = [
                {"session_id": sid, "inputs": [round(float(v), 6) for v in row]}
                for sid, row in zip(ids, x, strict=True)
            ]
            bodies.append(json.dumps({"steps": steps}).encode())
    return bodies


async def _loop(
    url: str, bodies: list[bytes], binary: bool, warm_until: float, until: float, out: list[float]
) -> int:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    conn = await loadgen._open(host, port, False, "")
    kind = MEDIA if binary else "application/json"
    requests = [
        (
            f"POST /v1/models/demo/steps HTTP/1.1\r\nHost: {host}\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
        for body in bodies
    ]
    clock, done, i = time.perf_counter, 0, 0
    while (now := clock()) < until:
        await conn.exchange(requests[i])
        if now >= warm_until:
            out.append(clock() - now)
            done += 1
        i = (i + 1) % len(requests)
    conn.transport.close()  # type: ignore[union-attr]
    return done


def _client(
    url: str, groups: list[list[str]], binary: bool, seconds: float, start_at: float, out: Any
) -> None:
    if loadgen.uvloop is not None:
        asyncio.set_event_loop_policy(loadgen.uvloop.EventLoopPolicy())
    latencies: list[float] = []
    cpu = time.process_time()

    async def main() -> int:
        while time.time() < start_at:
            await asyncio.sleep(0.005)
        t0 = time.perf_counter()
        loops = [
            _loop(url, _bodies(ids, binary, n), binary, t0 + 1.0, t0 + 1.0 + seconds, latencies)
            for n, ids in enumerate(groups)
        ]
        return sum(await asyncio.gather(*loops))

    requests = asyncio.run(main())
    out.put({"requests": requests, "latencies": latencies, "cpu_s": time.process_time() - cpu})


def measure(server: Server, binary: bool, in_flight: int, seconds: float) -> dict[str, Any]:
    """Closed loop of ``in_flight`` connections of 64-step bulk requests; one client process."""
    ids = [loadgen.create_session(server.url, "demo") for _ in range(in_flight * PER_REQUEST)]
    groups = [ids[i * PER_REQUEST : (i + 1) * PER_REQUEST] for i in range(in_flight)]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    before, busy = _cpu_seconds(server.proc.pid), _machine_busy_seconds()
    start_at = time.time() + 1.0
    proc = ctx.Process(target=_client, args=(server.url, groups, binary, seconds, start_at, out))
    proc.start()
    result = out.get(timeout=seconds + 120)
    proc.join()
    total = seconds + 1.0
    latencies = np.asarray(result["latencies"]) * 1000
    return {
        "form": "binary" if binary else "json",
        "in_flight": in_flight,
        "steps_per_s": result["requests"] * PER_REQUEST / seconds,
        "requests_per_s": result["requests"] / seconds,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "server_cpu": (_cpu_seconds(server.proc.pid) - before) / total,
        "client_cpu": result["cpu_s"] / total,
        "machine_busy": (_machine_busy_seconds() - busy) / total,
    }


def _print(run: dict[str, Any]) -> None:
    print(
        f"{run['store']:>6} {run['form']:>6}: {run['steps_per_s']:>9,.0f} steps/s "
        f"({run['requests_per_s']:,.0f} requests/s) p50 {run['p50_ms']:.2f} ms "
        f"p99 {run['p99_ms']:.2f} ms  server CPU {run['server_cpu']:.0%}  "
        f"client CPU {run['client_cpu']:.0%}  busy {run['machine_busy']:.0%}",
        flush=True,
    )


def _in_process_cpu(models_dir: Path, seconds: float = 2.0) -> tuple[float, float]:
    """The in-process batch-64 loop: steps per wall second, and per CPU second of this
    process (what a starved run on a shared machine still measures fairly)."""
    cpu = time.process_time()
    start = time.perf_counter()
    rate = in_process(models_dir, "demo", PER_REQUEST, seconds)
    wall, used = time.perf_counter() - start, time.process_time() - cpu
    return rate, rate * wall / used


def _ratios(runs: list[dict[str, Any]], limit: float, per_cpu: bool = False) -> dict[str, float]:
    """The ratios bench/README.md reports; ``per_cpu``: in steps per CPU second of each
    server, against the in-process loop's per CPU second (``limit``): one round's servers
    were starved by other work on the machine when their CPU share fell well below 100 %.
    With ``--other-bin``, the other installation's ratios too (``*_other``)."""
    by = {
        (r["store"], r["form"]): r["steps_per_s"] / (r["server_cpu"] if per_cpu else 1.0)
        for r in runs
    }
    ratios: dict[str, float] = {}
    for tail in ("", " (other)"):
        if ("memory" + tail, "binary") not in by:
            continue
        key = "_other" if tail else ""
        memory, redis = "memory" + tail, "redis" + tail
        ratios |= {
            f"memory_binary_vs_in_process_b64{key}": by[(memory, "binary")] / limit,
            f"memory_json_vs_in_process_b64{key}": by[(memory, "json")] / limit,
            f"redis_vs_memory_binary{key}": by[(redis, "binary")] / by[(memory, "binary")],
            f"redis_vs_memory_json{key}": by[(redis, "json")] / by[(memory, "json")],
        }
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="each round measures every point")
    parser.add_argument("--out", type=Path, default=Path("bench/bulk.json"))
    parser.add_argument("--other-bin", type=Path, default=None)
    args = parser.parse_args()
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        sys.exit("bench.bulk needs redis-server (apt-get install redis-server)")
    results: dict[str, Any] = {"load_before": os.getloadavg(), "rounds": []}
    with tempfile.TemporaryDirectory(prefix="gruserve-bulk-") as tmp:
        models_dir = Path(tmp)
        build(models_dir)
        redis_port = free_port()
        redis = subprocess.Popen(
            [redis_server, "--port", str(redis_port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        servers: dict[str, Server] = {}
        try:
            bins = [(BIN, "")] + ([(args.other_bin, " (other)")] if args.other_bin else [])
            for (bin_dir, tail), store in (
                (b, s) for b in bins for s in ("memory", f"redis://127.0.0.1:{redis_port}/0")
            ):
                port = free_port()
                env = {
                    "GRUSERVE_MODELS_DIR": str(models_dir),
                    "GRUSERVE_PROVIDER": "cpu",
                    "GRUSERVE_LOG_LEVEL": "warning",
                    "GRUSERVE_GRPC_PORT": "0",
                    "GRUSERVE_PORT": str(port),
                    "GRUSERVE_SESSION_STORE": store,
                }
                name = store.split(":")[0] + tail
                servers[name] = Server([str(bin_dir / "gruserve"), "serve"], env, port, "/readyz")
            for round_ in range(args.rounds):
                first = _in_process_cpu(models_dir)
                print(
                    f"round {round_ + 1}: in-process loop, batch 64: {first[0]:,.0f} steps/s "
                    f"({first[1]:,.0f} per CPU second), load average {os.getloadavg()[0]:.1f}"
                )
                runs = []
                for name, server in servers.items():
                    for binary in (True, False):
                        run = {
                            "store": name,
                            **measure(server, binary, args.in_flight, args.seconds),
                        }
                        runs.append(run)
                        _print(run)
                # the loop again once the servers ran: a VM whose speed drifted during the
                # round moves the limit as it moved the servers, so the ratio is to the mean
                last = _in_process_cpu(models_dir)
                print(
                    f"round {round_ + 1}: in-process loop again: {last[0]:,.0f} steps/s "
                    f"({last[1]:,.0f} per CPU second)"
                )
                limit, per_cpu = (first[0] + last[0]) / 2, (first[1] + last[1]) / 2
                ratios, cpu_ratios = _ratios(runs, limit), _ratios(runs, per_cpu, per_cpu=True)
                print(json.dumps({"wall": ratios, "per_cpu": cpu_ratios}, indent=2), flush=True)
                results["rounds"].append(
                    {
                        "in_process_b64_steps_per_s": limit,
                        "in_process_b64_steps_per_cpu_s": per_cpu,
                        "in_process_b64_before_after": [first[0], last[0]],
                        "load_average": os.getloadavg(),
                        "runs": runs,
                        "ratios": ratios,
                        "ratios_per_cpu": cpu_ratios,
                    }
                )
        finally:
            for server in servers.values():
                server.stop()
            redis.terminate()
            redis.wait()
    for field in ("ratios", "ratios_per_cpu"):
        values = [r[field] for r in results["rounds"]]
        results[f"{field}_median"] = {
            k: float(np.median([v[k] for v in values])) for k in values[0]
        }
        results[f"{field}_range"] = {
            k: [min(v[k] for v in values), max(v[k] for v in values)] for k in values[0]
        }
    results["load_after"] = os.getloadavg()
    print("median:", json.dumps(results["ratios_median"], indent=2))
    print("median per CPU second:", json.dumps(results["ratios_per_cpu_median"], indent=2))
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
