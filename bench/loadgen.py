"""Closed-loop load generator: C sessions, each sending one single-timestep step at a time.

Runs in its own process(es), never inside the server. To keep the client's
share of a small machine low it speaks HTTP/1.1 (keep-alive) and WebSocket
(RFC 6455, binary frames, masked as the RFC requires) directly over asyncio
protocols on uvloop, instead of a general-purpose client library. Every
session has its own connection; a step is timed from writing the request to
reading the whole reply.

    python -m bench.loadgen --url http://127.0.0.1:8000 --model demo \
        --transport ws --sessions 64 --seconds 5

prints one JSON object: steps, steps/s, p50/p99 latency (ms), client CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import numpy as np

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
    uvloop = None  # type: ignore[assignment]  # the module or None, tested before use


def create_session(base: str, model: str) -> str:
    req = urllib.request.Request(
        f"{base}/v1/models/{model}/sessions",
        data=b"{}",
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return str(json.loads(resp.read())["session_id"])


class _Conn(asyncio.Protocol):
    """One keep-alive connection; ``exchange`` writes bytes and waits for one full reply."""

    accepted = b"HTTP/1.1 200"
    """How a good HTTP reply starts; anything else stops the run (a benchmark of errors
    measures nothing)."""

    def __init__(self, websocket: bool) -> None:
        self.websocket = websocket
        self.handshaking = False
        self.buffer = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.handshaking:
            return
        reply = self._ws_frame() if self.websocket else self._http_reply()
        if reply is not None and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    def _http_reply(self) -> bytes | None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.buffer[:end]).lower()
        start = head.find(b"content-length:")
        stop = head.find(b"\r\n", start)
        length = int(head[start + 15 : stop if stop > 0 else None]) if start >= 0 else 0
        if len(self.buffer) < end + 4 + length:
            return None
        reply = bytes(self.buffer[: end + 4 + length])
        del self.buffer[: end + 4 + length]
        if not reply.startswith(self.accepted):
            raise RuntimeError(f"server answered {reply[:200]!r}")
        return reply

    def _ws_frame(self) -> bytes | None:
        b = self.buffer
        if len(b) < 2:
            return None
        length, offset = b[1] & 0x7F, 2
        if length == 126:
            if len(b) < 4:
                return None
            length, offset = int.from_bytes(b[2:4], "big"), 4
        elif length == 127:
            if len(b) < 10:
                return None
            length, offset = int.from_bytes(b[2:10], "big"), 10
        if len(b) < offset + length:
            return None
        if b[0] & 0x0F != 0x2:
            raise RuntimeError(f"unexpected WebSocket frame: {bytes(b[: offset + length])!r}")
        payload = bytes(b[offset : offset + length])
        del b[: offset + length]
        return payload

    async def exchange(self, data: bytes) -> bytes:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)  # type: ignore[union-attr]
        return await self.waiter


def _ws_frame(payload: bytes) -> bytes:
    """A masked binary client frame (RFC 6455 §5.2) with a fresh random key."""
    key = os.urandom(4)
    n = len(payload)
    head = bytes([0x82, 0x80 | n]) if n < 126 else bytes([0x82, 0x80 | 126]) + n.to_bytes(2, "big")
    mask = int.from_bytes(key * (n // 4 + 1), "little") & ((1 << (8 * n)) - 1)
    return head + key + (int.from_bytes(payload, "little") ^ mask).to_bytes(n, "little")


async def _open(host: str, port: int, websocket: bool, path: str) -> _Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: _Conn(websocket=False), host, port)
    if websocket:
        key = base64.b64encode(os.urandom(16)).decode()
        hello = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        conn.handshaking = True
        conn.transport.write(hello)  # type: ignore[union-attr]
        while b"\r\n\r\n" not in conn.buffer:
            await asyncio.sleep(0.001)
        head, _, rest = bytes(conn.buffer).partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise RuntimeError(f"WebSocket upgrade refused: {head[:200]!r}")
        conn.buffer = bytearray(rest)
        conn.websocket, conn.handshaking = True, False
    return conn


async def _session_loop(
    host: str,
    port: int,
    transport: str,
    session_id: str,
    features: int,
    until: float,
    warm_until: float,
    latencies: list[float],
    seed: int,
) -> int:
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(16, features)).astype(np.float32)
    requests: list[bytes] = []  # REST: each row's whole HTTP request
    payloads: list[bytes] = []  # WebSocket: each row's frame payload
    if transport == "ws":
        conn = await _open(host, port, True, f"/v1/sessions/{session_id}/ws")
        payloads = [row.tobytes() for row in rows]
    else:
        conn = await _open(host, port, False, "")
        for row in rows:
            body = json.dumps({"inputs": [round(float(v), 6) for v in row]}).encode()
            requests.append(
                (
                    f"POST /v1/sessions/{session_id}/step HTTP/1.1\r\nHost: {host}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode()
                + body
            )
    clock = time.perf_counter
    steps, i = 0, 0
    while True:
        now = clock()
        if now >= until:
            break
        data = _ws_frame(payloads[i]) if transport == "ws" else requests[i]
        await conn.exchange(data)
        done = clock()
        if now >= warm_until:
            latencies.append(done - now)
            steps += 1
        i = (i + 1) % len(rows)
    conn.transport.close()  # type: ignore[union-attr]
    return steps


def _worker(args: dict[str, Any], session_ids: list[str], start_at: float, out: Any) -> None:
    if uvloop is not None:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    latencies: list[float] = []
    cpu = time.process_time()

    async def main() -> int:
        url = urlsplit(args["url"])
        while time.time() < start_at:
            await asyncio.sleep(0.005)
        t0 = time.perf_counter()
        warm_until, until = t0 + args["warmup"], t0 + args["warmup"] + args["seconds"]
        counts = await asyncio.gather(
            *(
                _session_loop(
                    url.hostname or "127.0.0.1",
                    url.port or 80,
                    args["transport"],
                    sid,
                    args["features"],
                    until,
                    warm_until,
                    latencies,
                    seed,
                )
                for seed, sid in enumerate(session_ids)
            )
        )
        return sum(counts)

    steps = asyncio.run(main())
    out.put({"steps": steps, "latencies": latencies, "cpu_s": time.process_time() - cpu})


def run(
    url: str,
    model: str,
    transport: str,
    sessions: int,
    seconds: float,
    warmup: float = 1.0,
    features: int = 32,
    procs: int = 1,
) -> dict[str, Any]:
    """Run the closed loop and summarise it (used by ``bench.run_all`` and the CLI)."""
    ids = [create_session(url, model) for _ in range(sessions)]
    procs = max(1, min(procs, sessions))
    args = {
        "url": url,
        "transport": transport,
        "seconds": seconds,
        "warmup": warmup,
        "features": features,
    }
    return fan_out(_worker, args, ids, procs, transport, sessions, seconds, warmup)


def fan_out(
    worker: Callable[..., None],
    args: dict[str, Any],
    ids: list[Any],
    procs: int,
    transport: str,
    sessions: int,
    seconds: float,
    warmup: float,
) -> dict[str, Any]:
    """Run ``worker(args, ids_share, start_at, out)`` in ``procs`` spawned processes, each
    on its share of ``ids``, started together; summarise their latencies and steps (the
    HTTP/WebSocket loop here and ``bench.grpc_loadgen`` share it)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 1.0
    workers = [
        ctx.Process(target=worker, args=(args, ids[i::procs], start_at, out)) for i in range(procs)
    ]
    for w in workers:
        w.start()
    results = [out.get(timeout=seconds + warmup + 120) for _ in workers]
    for w in workers:
        w.join()
    latencies = np.concatenate([np.asarray(r["latencies"]) for r in results]) * 1000
    steps = sum(r["steps"] for r in results)
    return {
        "transport": transport,
        "sessions": sessions,
        "steps": steps,
        "seconds": seconds,
        "steps_per_s": steps / seconds,
        "p50_ms": float(np.percentile(latencies, 50)) if steps else float("nan"),
        "p99_ms": float(np.percentile(latencies, 99)) if steps else float("nan"),
        "client_cpu_s": sum(r["cpu_s"] for r in results),
        "client_procs": procs,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--transport", choices=["rest", "ws"], default="ws")
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--procs", type=int, default=1)
    a = parser.parse_args(argv)
    result = run(a.url, a.model, a.transport, a.sessions, a.seconds, a.warmup, a.features, a.procs)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
