"""A bare ``ModelStreamInfer`` server: grpcio's own cost per streamed message, no gruserve.

    python -m bench.grpc_echo --port 8333 --form read-write

Answers every request of a stream with one reply message built once up front (the size of
a ``demo`` step's reply), so what the server spends per message is grpcio's asyncio
machinery, HTTP/2 and protobuf parsing only: the ceiling any Python ``grpc.aio`` service
can reach for Triton streaming on this machine. ``--form`` picks how the handler reads
and answers, the ways grpcio offers:

- ``read-yield``: ``context.read()`` and ``yield`` (gruserve's form);
- ``read-write``: ``context.read()`` and ``await context.write()`` (a coroutine handler);
- ``iterate-yield``: ``async for request in request_iterator`` and ``yield``;
- ``read-wait-yield``: as ``read-yield``, but each request waits for its answer on a future
  that a stand-in batcher resolves, for every stream waiting, in the next pass of the
  event loop, as gruserve's batcher wakes a batch's steps. This is the shape of a real
  step's await, with no work in it: what suspending a stream's task costs in grpcio.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

FORMS = ("read-yield", "read-write", "iterate-yield", "read-wait-yield")


def _reply() -> Any:
    answer = pb.ModelInferResponse(model_name="demo", model_version="1")
    answer.outputs.add(name="outputs", datatype="FP32", shape=[1, 1])
    answer.raw_output_contents.append(np.zeros(1, np.float32).tobytes())
    answer.parameters["sequence_id"].int64_param = 1
    answer.parameters["step"].int64_param = 1
    return pb.ModelStreamInferResponse(infer_response=answer)


class ReadYield(service_pb2_grpc.GRPCInferenceServiceServicer):
    reply = _reply()

    async def ModelStreamInfer(self, requests: Any, context: Any) -> AsyncIterator[Any]:
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                return
            yield self.reply


class ReadWrite(service_pb2_grpc.GRPCInferenceServiceServicer):
    reply = _reply()

    async def ModelStreamInfer(self, requests: Any, context: Any) -> None:  # type: ignore[override]
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                return
            await context.write(self.reply)


class IterateYield(service_pb2_grpc.GRPCInferenceServiceServicer):
    reply = _reply()

    async def ModelStreamInfer(self, requests: Any, context: Any) -> AsyncIterator[Any]:
        async for _ in requests:
            yield self.reply


class ReadWaitYield(service_pb2_grpc.GRPCInferenceServiceServicer):
    reply = _reply()

    def __init__(self) -> None:
        self._waiting: list[asyncio.Future[Any]] = []

    def _flush(self) -> None:
        waiting, self._waiting = self._waiting, []
        for future in waiting:
            future.set_result(self.reply)

    async def ModelStreamInfer(self, requests: Any, context: Any) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                return
            future = loop.create_future()
            if not self._waiting:
                loop.call_soon(self._flush)
            self._waiting.append(future)
            yield await future


async def serve(port: int, form: str) -> None:
    server = grpc.aio.server()
    servicer = {
        "read-yield": ReadYield,
        "read-write": ReadWrite,
        "iterate-yield": IterateYield,
        "read-wait-yield": ReadWaitYield,
    }
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer[form](), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8333)
    parser.add_argument("--form", choices=FORMS, default="read-yield")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.form))


if __name__ == "__main__":
    main()
