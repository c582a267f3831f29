"""The gRPC server beside uvicorn: v2 inference, health and reflection, one event loop.

Started by the app's lifespan (:func:`gruserve.api.app.create_app`) when
``GRUSERVE_GRPC_PORT`` is not 0, so ``gruserve serve``, ``--workers`` and
``uvicorn --factory`` all get it, on the same services, batchers, store and limits as
HTTP. Needs the ``gruserve[grpc]`` extra (grpcio, grpcio-health-checking,
grpcio-reflection, and ``tritonclient[grpc]`` for the protocol's published stubs).

- ``inference.GRPCInferenceService`` (:mod:`gruserve.api.v2.grpc_service`);
- ``grpc.health.v1.Health``: ``""`` and the inference service answer SERVING when
  ``/v2/health/ready`` would answer 200 (a model loaded, the store answering), checked
  at each call; NOT_SERVING from the start of shutdown. No API key needed, as probes.
- server reflection (``grpcurl``, ``grpcui``), no key needed either.

A message larger than ``GRUSERVE_MAX_REQUEST_BYTES`` is refused by gRPC itself with
RESOURCE_EXHAUSTED. With ``--workers`` each process binds the port with
``SO_REUSEPORT`` (the kernel spreads connections); a single process binds it alone, so
a port already taken fails start-up instead of sharing it unnoticed.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gruserve.api._auth import ApiKeys
from gruserve.api.v2 import infer as v2_infer
from gruserve.api.v2.grpc_service import InferenceService
from gruserve.errors import GruServeError
from gruserve.services import Services
from gruserve.settings import Settings

log = logging.getLogger(__name__)
INFERENCE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class PortInUse(GruServeError):
    """The gRPC port cannot be bound."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(
            f"cannot serve gRPC on {address}: {reason}; set GRUSERVE_GRPC_PORT to a free port, "
            "or 0 for no gRPC"
        )


class ReadyHealth(health.aio.HealthServicer):  # type: ignore[misc]
    """``Check`` answers from the server's readiness at the time of the call."""

    def __init__(self, services: Services) -> None:
        super().__init__()
        self._services = services
        self._stopping = False

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:
        if request.service not in ("", INFERENCE):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        ready = not self._stopping and await v2_infer.server_ready(self._services)
        status = health_pb2.HealthCheckResponse
        return status(status=status.SERVING if ready else status.NOT_SERVING)

    async def shut_down(self) -> None:
        self._stopping = True
        await self.enter_graceful_shutdown()


class GrpcServer:
    """A started gRPC server; :meth:`stop` ends it gracefully."""

    def __init__(self, server: grpc.aio.Server, inference: InferenceService, health: ReadyHealth):
        self._server, self._inference, self._health = server, inference, health

    async def stop(self, grace_s: float) -> None:
        """End streams after their running request, let unary calls finish for ``grace_s``."""
        self._inference.end_streams()
        await self._health.shut_down()
        await self._server.stop(grace_s)


def address_of(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start(settings: Settings, services: Services, keys: ApiKeys | None) -> GrpcServer:
    """Serve gRPC on ``settings.host``:``settings.grpc_port`` in the running event loop.

    Raises:
        PortInUse: the port cannot be bound.
    """
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        ]
    )
    inference = InferenceService(services, keys)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)
    ready = ReadyHealth(services)
    for name in ("", INFERENCE):
        await ready.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(ready, server)
    reflection.enable_server_reflection((INFERENCE, HEALTH, reflection.SERVICE_NAME), server)
    address = address_of(settings.host, settings.grpc_port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise PortInUse(address, str(exc)) from None
    if not bound:
        raise PortInUse(address, "the port is taken")
    await server.start()
    log.info("serving KServe v2 gRPC on %s", address)
    return GrpcServer(server, inference, ready)
