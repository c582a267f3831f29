"""Session churn: short-lived sessions per second, explicit and in band, in one run.

    python -m bench.churn --seconds 5 --rounds 3

A closed loop of C=64 virtual users, each on its own keep-alive connection, repeats one
short session as fast as the server answers:

- ``explicit``: ``POST /v1/models/demo/sessions``, one single-timestep step, ``DELETE``
  (three requests a session), against gruserve on the memory store, gruserve on Redis
  and the naive FastAPI + torch peer (bench/baseline_torch.py, a dict of states);
- ``in band``: one request that creates the session, steps it and ends it
  (``"create": {"model": "demo"}, "end": true``), gruserve memory store;
- ``steady``: long-lived sessions' single-timestep steps (bench/loadgen.py), the rate
  the in-band figure is compared with.

Every server runs on core 0 and the load generator on core 1 (two cores or more); a
private ``redis-server`` (no persistence) backs the Redis server and floats. Each round
measures every case back to back, so drift moves both sides of a ratio alike; ratios are
medians of the rounds'. Writes bench/churn.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import loadgen
from bench.models import FEATURES, build
from bench.run_all import BIN, Server
from bench.stores import _redis

PORT = 8341
MODEL = "demo"


def _request(method: str, path: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
    if body:
        head += "Content-Type: application/json\r\n"
    return (head + "\r\n").encode() + body


def _body(reply: bytes) -> bytes:
    return reply[reply.find(b"\r\n\r\n") + 4 :]


class _Conn(loadgen._Conn):
    """The load generator's connection, taking any 2xx reply (201 Created, 204 No Content)."""

    accepted = b"HTTP/1.1 2"


async def _user(
    port: int, mode: str, user: int, until: float, warm_until: float, latencies: list[float]
) -> int:
    """One virtual user's loop; returns the sessions it completed after the warm-up."""
    _, conn = await asyncio.get_running_loop().create_connection(
        lambda: _Conn(websocket=False), "127.0.0.1", port
    )
    rng = np.random.default_rng(user)
    rows = [[round(float(v), 6) for v in rng.normal(size=FEATURES)] for _ in range(16)]
    steps = [json.dumps({"inputs": row}).encode() for row in rows]
    clock, done, i = time.perf_counter, 0, 0
    while True:
        started = clock()
        if started >= until:
            break
        if mode == "explicit":
            created = await conn.exchange(_request("POST", f"/v1/models/{MODEL}/sessions", b"{}"))
            sid = json.loads(_body(created))["session_id"]
            await conn.exchange(_request("POST", f"/v1/sessions/{sid}/step", steps[i % 16]))
            await conn.exchange(_request("DELETE", f"/v1/sessions/{sid}"))
        else:
            body = json.dumps(
                {"inputs": rows[i % 16], "create": {"model": MODEL}, "end": True}
            ).encode()
            await conn.exchange(_request("POST", f"/v1/sessions/u{user}-{i}/step", body))
        finished = clock()
        if started >= warm_until:
            latencies.append(finished - started)
            done += 1
        i += 1
    conn.transport.close()  # type: ignore[union-attr]
    return done


def _worker(port: int, mode: str, users: int, seconds: float, warmup: float, out: Any) -> None:
    if loadgen.uvloop is not None:
        asyncio.set_event_loop_policy(loadgen.uvloop.EventLoopPolicy())
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {1})
    latencies: list[float] = []

    async def main() -> int:
        t0 = time.perf_counter()
        warm_until, until = t0 + warmup, t0 + warmup + seconds
        counts = await asyncio.gather(
            *(_user(port, mode, u, until, warm_until, latencies) for u in range(users))
        )
        return sum(counts)

    sessions = asyncio.run(main())
    out.put({"sessions": sessions, "latencies": latencies})


def churn(port: int, mode: str, users: int, seconds: float, warmup: float = 1.0) -> dict[str, Any]:
    """Short sessions per second (``mode``: explicit or inband) against the server on ``port``."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(port, mode, users, seconds, warmup, out))
    proc.start()
    result = out.get(timeout=seconds + warmup + 120)
    proc.join()
    latencies = np.asarray(result["latencies"]) * 1000
    return {
        "sessions_per_s": result["sessions"] / seconds,
        "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else float("nan"),
        "p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else float("nan"),
    }


def _pinned(command: list[str]) -> list[str]:
    return ["taskset", "-c", "0", *command] if (os.cpu_count() or 1) >= 2 else command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/churn.json"))
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gruserve-churn-") as tmp:
        models_dir = Path(tmp) / "models"
        weights = build(models_dir)
        redis_port = PORT + 9
        redis = _redis(Path(tmp), redis_port)
        env = {
            "GRUSERVE_MODELS_DIR": str(models_dir),
            "GRUSERVE_PROVIDER": "cpu",
            "GRUSERVE_LOG_LEVEL": "warning",
        }
        redis_env = {"GRUSERVE_SESSION_STORE": f"redis://127.0.0.1:{redis_port}/0"}
        servers: dict[str, Server] = {}
        try:
            for i, (name, extra) in enumerate((("memory", {}), ("redis", redis_env))):
                port = PORT + i
                command = [str(BIN / "gruserve"), "serve", "--port", str(port)]
                servers[name] = Server(_pinned(command), {**env, **extra}, port, "/readyz")
            naive = [sys.executable, "-m", "bench.baseline_torch", "--weights", str(weights)]
            servers["naive"] = Server(
                _pinned([*naive, "--port", str(PORT + 2)]), {}, PORT + 2, "/docs"
            )
            cases = [
                ("explicit", "memory"),
                ("explicit", "redis"),
                ("explicit", "naive"),
                ("inband", "memory"),
                ("steady", "memory"),
            ]
            for round_ in range(args.rounds):
                for mode, name in cases:
                    server = servers[name]
                    port = int(server.url.rsplit(":", 1)[1])
                    if mode == "steady":
                        run = loadgen.run(
                            server.url, MODEL, "rest", args.users, args.seconds, features=FEATURES
                        )
                        rate = run["steps_per_s"]
                    else:
                        run = churn(port, mode, args.users, args.seconds)
                        rate = run["sessions_per_s"]
                    runs.append(
                        {
                            "round": round_,
                            "mode": mode,
                            "server": name,
                            "rate": rate,
                            "p50_ms": run["p50_ms"],
                            "p99_ms": run["p99_ms"],
                        }
                    )
                    print(
                        f"round {round_} {mode:>8} {name:>7}: {rate:8.0f}/s  "
                        f"p50 {run['p50_ms']:6.2f} ms  p99 {run['p99_ms']:6.2f} ms",
                        flush=True,
                    )
        finally:
            for server in servers.values():
                server.stop()
            redis.terminate()
            redis.wait(timeout=10)

    def rate_of(mode: str, name: str, round_: int) -> float:
        return next(
            r["rate"] for r in runs if (r["mode"], r["server"], r["round"]) == (mode, name, round_)
        )

    def median(mode: str, name: str) -> float:
        return float(np.median([rate_of(mode, name, k) for k in range(args.rounds)]))

    def ratio(a: tuple[str, str], b: tuple[str, str]) -> float:
        return float(np.median([rate_of(*a, k) / rate_of(*b, k) for k in range(args.rounds)]))

    summary = {
        "explicit memory sessions/s": median("explicit", "memory"),
        "explicit redis sessions/s": median("explicit", "redis"),
        "explicit naive sessions/s": median("explicit", "naive"),
        "inband memory sessions/s": median("inband", "memory"),
        "steady memory steps/s": median("steady", "memory"),
        "explicit memory / naive": ratio(("explicit", "memory"), ("explicit", "naive")),
        "explicit redis / memory": ratio(("explicit", "redis"), ("explicit", "memory")),
        "inband memory / steady steps": ratio(("inband", "memory"), ("steady", "memory")),
    }
    print(json.dumps(summary, indent=2))
    args.out.write_text(json.dumps({"runs": runs, "summary": summary}, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
