"""Closed-loop gRPC load: C Triton sequences, each stepped one timestep at a time over its
own ``ModelStreamInfer`` stream (``bench.loadgen``'s WebSocket loop, over gRPC).

The client is ``grpc.aio`` with the protocol's own stubs (from ``tritonclient[grpc]``) and
requests built once up front (raw contents, as ``tritonclient`` sends them), so the client
spends little per step; ``tritonclient.grpc``'s thread-and-callback stream would cost the
client more than the server on a small machine. A step is timed from writing the request
to reading its answer. C streams share one channel per client process (HTTP/2
multiplexes them), as an application holding one client would.

    python -m bench.grpc_loadgen --address 127.0.0.1:8001 --model demo --sessions 64

prints one JSON object: steps, steps/s, p50/p99 latency (ms), client CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from bench.loadgen import fan_out


def _requests(model: str, sequence_id: int, features: int, seed: int) -> list[Any]:
    """16 one-timestep requests of one sequence; the first starts it."""
    rows = np.random.default_rng(seed).normal(size=(16, features)).astype(np.float32)
    made = []
    for i, row in enumerate(rows):
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name="inputs", datatype="FP32", shape=[1, 1, features])
        request.raw_input_contents.append(row.tobytes())
        request.parameters["sequence_id"].int64_param = sequence_id
        request.parameters["sequence_start"].bool_param = i == 0
        made.append(request)
    return made


async def _sequence_loop(
    stub: Any,
    requests: list[Any],
    until: float,
    warm_until: float,
    latencies: list[float],
) -> int:
    call = stub.ModelStreamInfer()
    clock = time.perf_counter
    steps, i, first = 0, 0, True
    while True:
        now = clock()
        if now >= until:
            break
        request = requests[i]
        if not first and i == 0:  # wrap around without restarting the sequence
            request = requests[1]
        await call.write(request)
        reply = await call.read()
        if reply.error_message:
            raise RuntimeError(reply.error_message)
        done = clock()
        first = False
        if now >= warm_until:
            latencies.append(done - now)
            steps += 1
        i = (i + 1) % len(requests)
    await call.done_writing()
    return steps


def _worker(args: dict[str, Any], ids: list[int], start_at: float, out: Any) -> None:
    latencies: list[float] = []
    cpu = time.process_time()

    async def main() -> int:
        async with grpc.aio.insecure_channel(args["address"]) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            requests = [_requests(args["model"], i, args["features"], i) for i in ids]
            while time.time() < start_at:
                await asyncio.sleep(0.005)
            t0 = time.perf_counter()
            warm_until, until = t0 + args["warmup"], t0 + args["warmup"] + args["seconds"]
            counts = await asyncio.gather(
                *(_sequence_loop(stub, r, until, warm_until, latencies) for r in requests)
            )
            return sum(counts)

    steps = asyncio.run(main())
    out.put({"steps": steps, "latencies": latencies, "cpu_s": time.process_time() - cpu})


def run(
    address: str,
    model: str,
    sessions: int,
    seconds: float,
    warmup: float = 1.0,
    features: int = 32,
    procs: int = 1,
    first_id: int = 1,
) -> dict[str, Any]:
    """Run the closed loop and summarise it as ``bench.loadgen.run`` does."""
    ids = list(range(first_id, first_id + sessions))
    procs = max(1, min(procs, sessions))
    args = {
        "address": address,
        "model": model,
        "seconds": seconds,
        "warmup": warmup,
        "features": features,
    }
    return fan_out(_worker, args, ids, procs, "grpc-stream", sessions, seconds, warmup)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="127.0.0.1:8001")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--procs", type=int, default=1)
    a = parser.parse_args(argv)
    result = run(a.address, a.model, a.sessions, a.seconds, a.warmup, a.features, a.procs)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
