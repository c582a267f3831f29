"""Liveness, readiness and Prometheus metrics.

``/healthz`` answers as long as the event loop runs. ``/readyz`` answers 200
only when at least one model is loaded and the session store answers a ping (on one
Redis, a ping that also asks whether gruserve's user may run the store's commands):
a load balancer should send traffic only then. Failed models are listed but
do not make the server unready while others serve. When the server has API keys, the
list and the reasons (model paths, onnxruntime and store errors) go only to a request
with a valid key; without one, ``/readyz`` says ready or not ready and nothing else.
"""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from gruserve.api import encode
from gruserve.api._auth import AUTHENTICATED
from gruserve.errors import GruServeError
from gruserve.services import Services

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> Response:
    """The process is alive."""
    return encode.json_response({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    """Models loaded and session store reachable (200), else 503 with the reasons (the
    reasons and models only for a valid key, when keys are set)."""
    services: Services = request.app.state.services
    statuses = services.registry.statuses()
    store: dict[str, object] = {"kind": services.store.name, "reachable": True}
    try:
        await services.store.ping()
    except GruServeError as exc:
        store.update(reachable=False, error=str(exc))
    loaded = [st for st in statuses if st.ready]
    ready = bool(loaded) and bool(store["reachable"])
    status = 200 if ready else 503
    if not request.scope.get(AUTHENTICATED, True):
        return encode.json_response({"status": "ready" if ready else "not ready"}, status=status)
    body = {
        "status": "ready" if ready else "not ready",
        "models": [encode.model_status(st) for st in statuses],
        "store": store,
    }
    if not loaded:
        body["reason"] = "no model loaded: check GRUSERVE_MODELS_DIR and the errors listed"
    return encode.json_response(body, status=status)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text format (batch sizes, latencies, sessions, errors)."""
    services: Services = request.app.state.services
    with contextlib.suppress(GruServeError):  # the scrape reports the rest; /readyz the store
        services.metrics.sessions.set(await services.store.count())
    return Response(services.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
