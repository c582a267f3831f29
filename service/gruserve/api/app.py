"""The FastAPI application factory: routers, error handlers, edge middleware, lifespan.

``create_app`` wires what it is given and builds nothing itself; the
composition root (:mod:`gruserve.server`) makes the :class:`~gruserve.services.Services`.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.middleware import Middleware
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from gruserve import __version__
from gruserve.api import docs, errors, health
from gruserve.api._auth import METRICS, PUBLIC, ApiKeyMiddleware, ApiKeys, load_keys
from gruserve.api.protocols._edge import EdgeMiddleware
from gruserve.api.v1 import bulk, stream
from gruserve.api.v1 import routes as v1
from gruserve.api.v1.fast_step import DirectStep, StepEndpoint
from gruserve.api.v1.hot_paths import HotPaths
from gruserve.api.v1.ws import SessionSockets
from gruserve.api.v2 import repository
from gruserve.api.v2 import routes as v2
from gruserve.errors import GruServeError
from gruserve.services import Services
from gruserve.settings import Settings

log = logging.getLogger("gruserve")
STREAM_PATHS = re.compile(r"^/v1/sessions/[^/]+/stream$")

DESCRIPTION = """Serve Keras GRU models exported to ONNX, statelessly (`predict`) or as sessions
whose state carries over between calls exactly like a Keras `stateful=True` layer.
Steps of different sessions are batched into one onnxruntime run. Every error body is
`{"error": {"type", "message", "field"}}`; every response carries an `X-Request-ID`.

### WebSocket: `/v1/sessions/{session_id}/ws`

OpenAPI cannot list WebSocket routes, so this one is described here. Open
`ws://HOST:PORT/v1/sessions/{session_id}/ws` (with keys set, send one in the handshake's
`Authorization: Bearer` or `X-API-Key` header); every message is one step of that session,
answered in the order sent:

- **text**: a JSON step body as for `POST /v1/sessions/{session_id}/step`
  (`{"inputs": ..., "mask": ..., "step": n}`), answered with `{"outputs": ..., "step": n}`;
- **binary**: raw little-endian float32 values, (timesteps x features) row-major (int64
  ids for a token model), answered with the outputs' raw float32 bytes. With the
  `gruserve-step` subprotocol, each binary message and reply starts with the step number
  as a little-endian u64 (as `"step"` in JSON).

A bad message is answered with the usual error object (plus `"status"`) and the connection
stays open; a session that disappears closes it with code 4404; a server shutting down
closes it with 1012."""


# Metrics are Prometheus (/metrics). FastAPI's native OpenTelemetry hooks (FastAPI versions that
# have them) look up tracer providers on every request (measured: ~8% of the REST step path).
_NO_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


class GruServeAPI(FastAPI):
    """FastAPI, with the per-step routes (:mod:`gruserve.api.v1.hot_paths`) answered first.

    ``direct_routes`` is what ``gruserve serve``'s HTTP protocol answers without ASGI
    (:mod:`gruserve.api.protocols._http11`); other servers never look at it.
    """

    hot_paths: HotPaths | None = None
    direct_routes: DirectStep | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self.hot_paths.route(scope) if self.hot_paths is not None else None
        if handler is not None:
            await handler(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, services: Services) -> GruServeAPI:
    """The ASGI app serving ``services``; closing the app (lifespan end) closes them."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        grpc_server = None
        try:
            await _check_store(services)
            services.start()
            grpc_server = await _start_grpc(settings, services, accepted)
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(settings.shutdown_grace_s)
            await services.aclose()

    app = GruServeAPI(
        title="gruserve",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served from local assets by api/docs.py
        redoc_url=None,
        **_NO_TELEMETRY,
    )
    app.state.services = services
    app.state.settings = settings
    app.include_router(health.router)
    app.include_router(v1.router)
    app.include_router(bulk.router)
    app.include_router(stream.router)
    app.include_router(v2.router)
    app.include_router(repository.router)
    errors.install(app, services.metrics)
    # What every request passes, from the outside in: the edge (request ids, byte limit,
    # metrics), then API keys. The framework's routes get them as middleware; the per-step
    # routes get the same two classes around their handlers, outside the framework.
    keys = load_keys(settings.api_keys, settings.api_keys_file)
    accepted = ApiKeys(keys) if keys else None
    public = PUBLIC | docs.PUBLIC_PATHS | ({METRICS} if settings.metrics_public else set())
    docs.install(app, keys_required=accepted is not None, public=public)
    guard = [
        Middleware(
            EdgeMiddleware,
            max_bytes=settings.max_request_bytes,
            metrics=services.metrics,
            unbounded=STREAM_PATHS,
        )
    ]
    if accepted is not None:
        guard.append(
            Middleware(
                ApiKeyMiddleware,
                keys=accepted,
                metrics=services.metrics,
                public=public,
                public_prefix=docs.PUBLIC_PREFIX,
            )
        )
    if services.tracing is not None:  # outermost: its span times the whole answer
        from gruserve.api._tracing import TracingMiddleware

        guard.insert(0, Middleware(TracingMiddleware, tracing=services.tracing))
    for layer in reversed(guard):
        app.add_middleware(layer.cls, *layer.args, **layer.kwargs)

    def guarded(handler: ASGIApp) -> ASGIApp:
        for cls, args, kwargs in reversed(guard):
            handler = cls(handler, *args, **kwargs)
        return handler

    step_route = next(
        r for r in v1.router.routes if isinstance(r, APIRoute) and r.endpoint is v1.step
    )
    step = StepEndpoint(services.sessions, services.metrics, settings)
    lifecycle = (_route(v1.create_session), _route(v1.delete_session))
    bulk_route = next(
        r for r in bulk.router.routes if getattr(r, "endpoint", None) is bulk.bulk_steps
    )
    app.hot_paths = HotPaths(
        step,
        SessionSockets(services),
        step_route,
        guarded,
        lifecycle,
        bulk.BulkEndpoint(services),
        bulk_route,
    )
    if services.tracing is None:  # the HTTP protocol's answers pass no middleware: untraced
        app.direct_routes = DirectStep(step, step_route.path, settings.max_request_bytes, accepted)
    return app


async def _check_store(services: Services) -> None:
    """Say at start-up when the session store does not answer or refuses gruserve's user
    (the server starts anyway), or when its own configuration can lose sessions."""
    try:
        await services.store.ping()
    except GruServeError as exc:
        log.warning(
            "the session store (%s) is not ready at start-up: %s; /readyz answers 503 and "
            "session requests 503 until it is",
            services.store.name,
            exc,
        )
        return
    for caution in await services.store.cautions():
        log.warning("session store: %s", caution)


def keys_enabled(settings: Settings) -> bool:
    """Whether the server needs API keys (for the start-up summary)."""
    return bool(load_keys(settings.api_keys, settings.api_keys_file))


async def _start_grpc(settings: Settings, services: Services, keys: ApiKeys | None) -> Any:
    """The gRPC server (:mod:`gruserve.api.v2.grpc_server`) when ``grpc_port`` is set and the
    ``grpc`` extra is installed; without the extra, a warning and HTTP only."""
    if settings.grpc_port == 0:
        return None
    try:
        from gruserve.api.v2 import grpc_server
    except ImportError as exc:
        log.warning(
            "GRUSERVE_GRPC_PORT=%d but gRPC is not installed (%s): serving HTTP only. Install "
            "'gruserve[grpc]', or set GRUSERVE_GRPC_PORT=0 to turn gRPC off",
            settings.grpc_port,
            exc,
        )
        return None
    return await grpc_server.start(settings, services, keys)


def _route(endpoint: object) -> BaseRoute:
    """The declared v1 route whose handler is ``endpoint``."""
    return next(r for r in v1.router.routes if getattr(r, "endpoint", None) is endpoint)
