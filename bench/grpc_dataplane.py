"""gruserve's own cost of a gRPC stream step, with grpcio taken out.

    python -m bench.grpc_dataplane --models-dir DIR --sessions 64 --seconds 4

Builds the production app (``create_app``, its lifespan: batchers, store) and answers the
benchmark's ``ModelStreamInfer`` requests (``bench.grpc_loadgen``'s messages) by calling
the service's per-message answer (``InferenceService._stream_answer``: decode, sequence
step through the batcher and onnxruntime, reply message) from C closed loops in this
process, with no network and no grpcio call machinery. Prints one JSON object: steps/s and
the process's CPU microseconds per step (onnxruntime's threads included), the figure to
set beside a server's CPU per step over WebSocket and over gRPC.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from bench.grpc_loadgen import _requests


async def measure(models_dir: Path, sessions: int, seconds: float) -> dict[str, Any]:
    from gruserve.api.app import create_app
    from gruserve.api.v2.grpc_service import InferenceService
    from gruserve.server import build_services
    from gruserve.sessions.owner import ANYONE
    from gruserve.settings import Settings

    settings = Settings(_env_file=None, models_dir=models_dir, provider="cpu", grpc_port=0)
    services = build_services(settings)
    app = create_app(settings, services)
    async with app.router.lifespan_context(app):
        service = InferenceService(services, None)
        streams = [_requests("demo", i, 32, i) for i in range(1, sessions + 1)]
        counts = [0] * sessions

        async def loop(n: int, until: float) -> None:
            requests, i = streams[n], 0
            while time.perf_counter() < until:
                with service.telemetry.call("ModelStreamInfer", None) as call:
                    answer = await service._stream_answer(requests[i], ANYONE, call)
                if answer.error_message:
                    raise RuntimeError(answer.error_message)
                i = i % 15 + 1  # after the first (start) request, never restart
                counts[n] += 1

        await asyncio.gather(*(loop(n, time.perf_counter() + 0.5) for n in range(sessions)))
        counts[:] = [0] * sessions  # warm-up done
        cpu, start = time.process_time(), time.perf_counter()
        await asyncio.gather(*(loop(n, start + seconds) for n in range(sessions)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - start
    steps = sum(counts)
    return {"steps_per_s": steps / wall, "cpu_us_per_step": 1e6 * cpu / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.models_dir, args.sessions, args.seconds))))


if __name__ == "__main__":
    main()
