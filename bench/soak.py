"""Soak run: one ``gruserve serve`` under a steady mixed load for minutes; do RSS and open
sessions stay flat?

    python -m bench.soak                       # 10 minutes, memory store
    python -m bench.soak --duration 60 --store redis://127.0.0.1:6379/0

The load is a closed loop of ``--concurrency`` workers in this process (asyncio); each
repeats a session's life: create it, step it (one timestep per step, over REST, or over a
WebSocket in binary float32 frames or JSON text, each step's reply checked), then delete
it or abandon it to expire after the short ``GRUSERVE_SESSION_TTL_S`` (``--ttl``). Some
iterations are stateless predict calls instead. Every ``--interval`` seconds the server
process's RSS (``/proc/PID/status``), CPU, the open sessions (the ``gruserve_sessions``
gauge of ``GET /metrics``, which also sweeps expired ones), sessions expired so far, and
steps/s and step latency over the interval are sampled and printed.

At the end: after a warm-up (``--warmup``), the mean of the last third of the samples is
compared with the mean of the first third, and a least-squares slope per minute is fitted,
for RSS and open sessions. The raw open-session count follows the load (abandoned sessions
x TTL), so flatness is judged on it relative to the expiry rate: open sessions over the
sessions expiring within one TTL, about 1 while expiry keeps up, whatever the throughput.
Then the load stops, and one TTL later every session left must have expired. Writes
everything to ``--out`` (``bench/soak.json``); exits 1 if something was not flat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
from rich.console import Console
from rich.table import Table
from websockets.asyncio.client import connect

from bench.run_all import BIN, Server, _cpu_seconds, _machine_busy_seconds

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
    uvloop = None  # type: ignore[assignment]  # the module or None, tested before use

REPO = Path(__file__).resolve().parents[1]
console = Console(highlight=False, width=None if sys.stdout.isatty() else 132)


@dataclass
class Mix:
    """What one worker iteration does (probabilities) and how long a session lives."""

    predict: float = 0.1  # a stateless predict instead of a session
    websocket: float = 0.5  # of sessions: stepped over a WebSocket (else REST)
    binary: float = 0.7  # of WebSocket sessions: binary float32 frames (else JSON text)
    delete: float = 0.5  # of sessions: deleted at the end (else left to expire)
    steps: tuple[int, int] = (5, 60)  # steps per session, uniform
    predict_shape: tuple[int, int] = (4, 16)  # sequences x timesteps per predict


@dataclass
class Load:
    """Client-side counts, and step latencies of the current sampling interval."""

    created: int = 0
    deleted: int = 0
    abandoned: int = 0
    rest_steps: int = 0
    ws_steps: int = 0
    predicts: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    def error(self, kind: str) -> None:
        self.errors[kind] += 1


# -- the load ----------------------------------------------------------------------------------
class Http:
    """One keep-alive HTTP/1.1 connection (a worker's own): a JSON request, the status and body.

    httpx costs about a millisecond of client CPU per request, which on a small machine
    leaves the server waiting for the client; this costs a fraction (bench/loadgen.py
    makes the same choice). Replies always carry a Content-Length here (or are 204).
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        data = b"" if body is None else orjson.dumps(body)
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        ).encode()
        for attempt in (1, 2):  # the server may have closed an idle keep-alive connection
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            assert self.reader is not None
            try:
                self.writer.write(head + data)
                status_line = await self.reader.readline()
                if not status_line:
                    raise ConnectionResetError("closed by the server")
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if attempt == 2:
                    raise
                continue
            length, close = 0, False
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            reply = await self.reader.readexactly(length) if length else b""
            if close:
                self.close()
            return int(status_line.split()[1]), reply
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class Worker:
    def __init__(
        self,
        base: str,
        model: str,
        features: int,
        load: Load,
        mix: Mix,
        seed: int,
        compression: str | None,
    ) -> None:
        self.base, self.model, self.features = base, model, features
        host, port = base.removeprefix("http://").rsplit(":", 1)
        self.http = Http(host, int(port))
        self.load, self.mix = load, mix
        self.rng = random.Random(seed)
        self.values = np.random.default_rng(seed).normal(size=(64, features)).astype(np.float32)
        self.compression = compression

    def _row(self) -> np.ndarray:
        return self.values[self.rng.randrange(len(self.values))]

    async def run(self, until: float) -> None:
        while time.monotonic() < until:
            try:
                if self.rng.random() < self.mix.predict:
                    await self._predict()
                else:
                    await self._session()
            except Exception as exc:  # a transport error, a bad reply: counted, never fatal
                self.load.error(type(exc).__name__)
                self.http.close()
        self.http.close()

    async def _predict(self) -> None:
        batch, timesteps = self.mix.predict_shape
        inputs = [[self._row().tolist() for _ in range(timesteps)] for _ in range(batch)]
        status, _ = await self.http.request(
            "POST", f"/v1/models/{self.model}/predict", {"inputs": inputs}
        )
        if status != 200:
            self.load.error(f"predict {status}")
            return
        self.load.predicts += 1

    async def _session(self) -> None:
        status, reply = await self.http.request("POST", f"/v1/models/{self.model}/sessions", {})
        if status != 201:
            self.load.error(f"create {status}")
            return
        self.load.created += 1
        sid = orjson.loads(reply)["session_id"]
        steps = self.rng.randint(*self.mix.steps)
        if self.rng.random() < self.mix.websocket:
            await self._websocket(sid, steps, binary=self.rng.random() < self.mix.binary)
        else:
            await self._rest(sid, steps)
        if self.rng.random() < self.mix.delete:
            status, _ = await self.http.request("DELETE", f"/v1/sessions/{sid}")
            if status != 204:
                self.load.error(f"delete {status}")
            else:
                self.load.deleted += 1
        else:
            self.load.abandoned += 1  # expires after the TTL

    async def _rest(self, sid: str, steps: int) -> None:
        clock, latencies = time.perf_counter, self.load.latencies
        for n in range(1, steps + 1):
            started = clock()
            status, reply = await self.http.request(
                "POST", f"/v1/sessions/{sid}/step", {"inputs": [self._row().tolist()]}
            )
            latencies.append(clock() - started)
            if status != 200:
                self.load.error(f"step {status}")
                return
            if orjson.loads(reply)["step"] != n:
                self.load.error("step count wrong")
                return
            self.load.rest_steps += 1

    async def _websocket(self, sid: str, steps: int, binary: bool) -> None:
        clock, latencies = time.perf_counter, self.load.latencies
        url = self.base.replace("http://", "ws://") + f"/v1/sessions/{sid}/ws"
        async with connect(url, compression=self.compression, proxy=None, open_timeout=30) as ws:
            for n in range(1, steps + 1):
                row = self._row()
                started = clock()
                if binary:
                    await ws.send(row.tobytes())
                    reply = await asyncio.wait_for(ws.recv(), 30)
                    ok = isinstance(reply, bytes) and len(reply) > 0
                else:
                    await ws.send(orjson.dumps({"inputs": [row.tolist()], "step": n - 1}).decode())
                    reply = await asyncio.wait_for(ws.recv(), 30)
                    ok = isinstance(reply, str) and orjson.loads(reply).get("step") == n
                latencies.append(clock() - started)
                if not ok:
                    self.load.error("ws reply wrong")
                    return
                self.load.ws_steps += 1


# -- sampling ----------------------------------------------------------------------------------
def _rss_mib(pid: int) -> float:
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(match.group(1)) / 1024 if match else float("nan")


def _metric(text: str, name: str, labels: str = "") -> float:
    """One sample of the Prometheus text ``text`` (0 if absent)."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _redis_mib(url: str) -> float | None:
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    import redis.asyncio as redis

    client = redis.Redis.from_url(url)
    try:
        return float((await client.info("memory"))["used_memory"]) / 2**20
    finally:
        await client.aclose()


class Sampler:
    def __init__(self, server: Server, client: httpx.AsyncClient, load: Load, args: Any) -> None:
        self.server, self.client, self.load, self.args = server, client, load, args
        self.samples: list[dict[str, Any]] = []
        self.start = time.monotonic()
        # (time, server CPU s, steps, sessions expired, machine busy s) at the last sample
        self._last: tuple[float, float, float | None, float, float] = (
            self.start,
            _cpu_seconds(server.proc.pid),
            None,
            0.0,
            _machine_busy_seconds(),
        )

    async def sample(self) -> dict[str, Any]:
        text = (await self.client.get("/metrics")).text
        now, busy = time.monotonic(), _machine_busy_seconds()
        cpu = _cpu_seconds(self.server.proc.pid)
        steps = _metric(text, "gruserve_steps_total", f'model="{self.args.model}"')
        expired = _metric(text, "gruserve_sessions_expired_total", 'reason="idle"')
        sessions = int(_metric(text, "gruserve_sessions"))
        then, cpu_then, steps_then, expired_then, busy_then = self._last
        self._last = (now, cpu, steps, expired, busy)
        seconds = now - then
        expiring = (expired - expired_then) / seconds * self.args.ttl  # expire within one TTL
        latencies = np.asarray(self.load.latencies) * 1000
        self.load.latencies.clear()
        row = {
            "t_s": round(now - self.start, 1),
            "rss_mib": round(_rss_mib(self.server.proc.pid), 1),
            "sessions": sessions,
            "expired": int(expired),
            "expired_per_s": round((expired - expired_then) / seconds, 1),
            # open sessions over those expiring within one TTL at the current rate: about 1
            # plus the in-flight share while expiry keeps up, whatever the load; it grows
            # without bound if abandoned sessions stop expiring
            "sessions_per_ttl_expiry": round(sessions / expiring, 3) if expiring else None,
            "steps_per_s": (
                None if steps_then is None else round((steps - steps_then) / seconds, 1)
            ),
            "p50_ms": round(float(np.percentile(latencies, 50)), 2) if latencies.size else None,
            "p99_ms": round(float(np.percentile(latencies, 99)), 2) if latencies.size else None,
            "server_cpu": round((cpu - cpu_then) / seconds, 2),
            "machine_busy": round((busy - busy_then) / seconds, 2),
            "created": self.load.created,
            "errors": sum(self.load.errors.values()),
            "server_errors": int(
                sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith("gruserve_http_requests_total{") and 'status="5' in line
                )
            ),
        }
        redis_mib = await _redis_mib(self.args.store)
        if redis_mib is not None:
            row["redis_mib"] = round(redis_mib, 1)
        return row

    async def run(self, until: float) -> None:
        await self.sample()  # the baseline of the interval counters
        self.start = time.monotonic()
        while True:
            await asyncio.sleep(max(0.0, min(self.args.interval, until - time.monotonic())))
            row = await self.sample()
            self.samples.append(row)
            _print_row(row, header=len(self.samples) == 1)
            if time.monotonic() >= until - 0.5:
                return


COLUMNS = [
    ("t_s", "t s", "{:.0f}"),
    ("rss_mib", "RSS MiB", "{:.1f}"),
    ("sessions", "sessions", "{}"),
    ("expired", "expired", "{}"),
    ("expired_per_s", "expired/s", "{:.1f}"),
    ("steps_per_s", "steps/s", "{:.0f}"),
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
    ("server_cpu", "server CPU", "{:.0%}"),
    ("machine_busy", "busy", "{:.0%}"),
    ("errors", "errors", "{}"),
]


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def _print_row(row: dict[str, Any], header: bool) -> None:
    columns = COLUMNS + ([("redis_mib", "Redis MiB", "{:.1f}")] if "redis_mib" in row else [])
    if header:
        console.print("  ".join(f"{title:>10}" for _, title, _ in columns), style="bold")
    console.print("  ".join(f"{_cell(row, k, f):>10}" for k, _, f in columns))


# -- the verdict -------------------------------------------------------------------------------
def trend(samples: list[dict[str, Any]], key: str, warmup_s: float) -> dict[str, Any]:
    """First third vs last third (means) of the samples after the warm-up, and the slope."""
    kept = [(s["t_s"], s[key]) for s in samples if s["t_s"] >= warmup_s and s[key] is not None]
    if len(kept) < 3:
        return {"samples": len(kept)}
    third = len(kept) // 3
    first = statistics.fmean(v for _, v in kept[:third])
    last = statistics.fmean(v for _, v in kept[-third:])
    t = np.array([k[0] for k in kept]) / 60
    slope = float(np.polyfit(t, np.array([k[1] for k in kept], float), 1)[0])
    return {
        "samples": len(kept),
        "first_third_mean": round(first, 4),
        "last_third_mean": round(last, 4),
        "change": round(last - first, 4),
        "change_pct": round(100 * (last - first) / first, 2) if first else None,
        "slope_per_min": round(slope, 4),
        "min": min(v for _, v in kept),
        "max": max(v for _, v in kept),
    }


def verdict(rss: dict[str, Any], sessions: dict[str, Any], args: Any) -> dict[str, bool | None]:
    """Flat: the last third within the tolerance of the first: RSS in MiB, open sessions as a
    fraction, taken relative to the expiry rate (``sessions_per_ttl_expiry``), since the
    raw count follows the load, which a shared machine makes vary."""
    if "change" not in rss or "change" not in sessions:
        return {"rss_flat": None, "sessions_flat": None}
    first = sessions["first_third_mean"]
    return {
        "rss_flat": abs(rss["change"]) <= args.rss_tolerance_mib,
        "sessions_flat": abs(sessions["change"]) <= first * args.sessions_tolerance,
    }


# -- main --------------------------------------------------------------------------------------
async def soak(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.concurrency + 2)
    async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:
        features = (await client.get(f"/v1/models/{args.model}")).json()["features"]
        load, mix = Load(), Mix()
        compression = None if args.ws_compression == "none" else "deflate"
        workers = [
            Worker(server.url, args.model, features, load, mix, seed, compression)
            for seed in range(args.concurrency)
        ]
        sampler = Sampler(server, client, load, args)
        until = time.monotonic() + args.duration
        await asyncio.gather(sampler.run(until), *(w.run(until) for w in workers))
        samples = sampler.samples
        # the load has stopped: one TTL (plus a sweep's slack) later, nothing is left open
        await asyncio.sleep(args.ttl + 2)
        after = await sampler.sample()
    warmup = min(args.warmup, args.duration / 5)
    rss, sessions = trend(samples, "rss_mib", warmup), trend(samples, "sessions", warmup)
    relative = trend(samples, "sessions_per_ttl_expiry", warmup)
    measured = [s["steps_per_s"] for s in samples if s["t_s"] >= warmup and s["steps_per_s"]]
    return {
        "config": {
            "duration_s": args.duration,
            "warmup_s": warmup,
            "interval_s": args.interval,
            "concurrency": args.concurrency,
            "session_ttl_s": args.ttl,
            "store": args.store,
            "model": args.model,
            "models_dir": str(args.models_dir),
            "ws_compression": args.ws_compression,
            "mix": asdict(mix),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "load": {
            "sessions_created": load.created,
            "sessions_deleted": load.deleted,
            "sessions_abandoned": load.abandoned,
            "rest_steps": load.rest_steps,
            "ws_steps": load.ws_steps,
            "predicts": load.predicts,
            "errors": dict(load.errors),
            "steps_per_s_mean": round(statistics.fmean(measured), 1) if measured else None,
        },
        "rss_mib": rss,
        "sessions": sessions,
        "sessions_per_ttl_expiry": relative,
        "verdict": verdict(rss, relative, args),
        "after_load": {
            "waited_s": args.ttl + 2,
            "sessions": after["sessions"],
            "expired_total": after["expired"],
            "rss_mib": after["rss_mib"],
            "all_expired": after["sessions"] == 0,
        },
        "server_errors": after["server_errors"],
        "samples": samples,
    }


def _summary(result: dict[str, Any]) -> None:
    table = Table(title="soak summary (after warm-up)")
    for title in ("", "first third", "last third", "change", "slope / min", "min", "max", "flat?"):
        table.add_column(title, justify="right")
    rows = (
        ("rss_mib", "RSS MiB", "rss_flat", "{:.1f}"),
        ("sessions", "open sessions", None, "{:.1f}"),
        ("sessions_per_ttl_expiry", "open / expiring in a TTL", "sessions_flat", "{:.3f}"),
    )
    for key, label, flat, fmt in rows:
        t = result[key]
        if "change" not in t:
            continue
        table.add_row(
            label,
            fmt.format(t["first_third_mean"]),
            fmt.format(t["last_third_mean"]),
            "+" * (t["change"] >= 0) + fmt.format(t["change"]),
            f"{t['slope_per_min']:+.3f}",
            fmt.format(t["min"]),
            fmt.format(t["max"]),
            "-" if flat is None else "yes" if result["verdict"][flat] else "NO",
        )
    console.print(table)
    load, after = result["load"], result["after_load"]
    console.print(
        f"sessions created {load['sessions_created']} (deleted {load['sessions_deleted']}, "
        f"left to expire {load['sessions_abandoned']}), steps REST {load['rest_steps']} + "
        f"WebSocket {load['ws_steps']}, predicts {load['predicts']}; "
        f"steps/s {load['steps_per_s_mean']}; client errors {sum(load['errors'].values())}"
        f"{' ' + str(load['errors']) if load['errors'] else ''}; "
        f"server 5xx {result['server_errors']}"
    )
    console.print(
        f"{after['waited_s']:.0f} s after the load stopped: {after['sessions']} sessions open "
        f"({'all expired' if after['all_expired'] else 'NOT all expired'}), "
        f"RSS {after['rss_mib']} MiB"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument(
        "--warmup",
        type=float,
        default=60.0,
        help="seconds left out of the trend (at most a fifth of --duration)",
    )
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--concurrency", type=int, default=8, help="workers (closed loop)")
    parser.add_argument("--ttl", type=float, default=5.0, help="GRUSERVE_SESSION_TTL_S")
    parser.add_argument("--store", default="memory", help="memory or a redis:// URL")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--model", default="demo")
    parser.add_argument(
        "--ws-compression",
        choices=["deflate", "none"],
        default="deflate",
        help="permessage-deflate on the WebSockets (browsers negotiate it)",
    )
    parser.add_argument("--port", type=int, default=8321)
    parser.add_argument("--rss-tolerance-mib", type=float, default=10.0)
    parser.add_argument(
        "--sessions-tolerance",
        type=float,
        default=0.25,
        help="flat: last third within this fraction of the first",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/soak.json"))
    args = parser.parse_args(argv)
    env = {
        "GRUSERVE_MODELS_DIR": str(args.models_dir),
        "GRUSERVE_PROVIDER": "cpu",
        "GRUSERVE_LOG_LEVEL": "warning",
        "GRUSERVE_GRPC_PORT": "0",
        "GRUSERVE_SESSION_STORE": args.store,
        "GRUSERVE_SESSION_TTL_S": str(args.ttl),
        "GRUSERVE_PORT": str(args.port),
    }
    console.print(
        f"soak: {args.duration:.0f} s, {args.concurrency} workers, store {args.store}, "
        f"session TTL {args.ttl:g} s, sample every {args.interval:g} s"
    )
    server = Server([str(BIN / "gruserve"), "serve"], env, args.port, "/readyz")
    try:
        if uvloop is not None:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        result = asyncio.run(soak(args, server))
    finally:
        server.stop()
    _summary(result)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    flat = result["verdict"]
    if not (flat["rss_flat"] and flat["sessions_flat"] and result["after_load"]["all_expired"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
