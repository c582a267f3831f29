"""REST routes of the KServe v2 / Triton HTTP protocol, beside v1 and on the same core.

Existing Triton and KServe clients (``tritonclient.http`` included) work
unchanged: server and model metadata, health, a Triton-style model config, and
``infer`` with JSON or binary tensors. A request without a sequence id is a
stateless predict; one with ``sequence_id`` is one step of a sequence, kept as
an ordinary session (:mod:`gruserve.api.v2.params` gives the id mapping), so
v2 shares v1's models, sessions, batching and stores and none of the math is
repeated here. Each route parses, makes one call into the core, and encodes;
errors are raised, and ``api/errors.py`` answers them as ``{"error": "..."}``.
"""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Request
from starlette.responses import Response

from gruserve import __version__
from gruserve.api import encode
from gruserve.api._auth import caller_of
from gruserve.api.protocols._disconnect import unless_disconnected
from gruserve.api.v2 import infer as v2_infer
from gruserve.api.v2 import request as v2_request
from gruserve.api.v2 import schemas as s
from gruserve.api.v2 import tensors as v2_tensors
from gruserve.api.v2.model import wire_model
from gruserve.api.v2.triton_config import PLATFORM
from gruserve.runtime.model import LoadedModel
from gruserve.services import Services

router = APIRouter(prefix="/v2", tags=["v2 (KServe / Triton)"], responses=s.ERRORS)
EXTENSIONS = [
    "binary_tensor_data",
    "model_configuration",
    "model_repository",
    "sequence",
    "sequence(string_id)",
]


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def _model(request: Request, name: str, version: str | None) -> LoadedModel:
    """The served model: its default version, or the version in the path (loaded first when
    it is on disk only)."""
    return await v2_infer.find_model(_services(request), name, version)


# -- server --------------------------------------------------------------------------------
@router.get("", response_model=s.ServerMetadata)
async def server_metadata() -> Response:
    """Server name, version and the protocol extensions it supports."""
    return encode.json_response(
        {"name": "gruserve", "version": __version__, "extensions": EXTENSIONS}
    )


@router.get("/health/live", response_model=s.Live)
async def live() -> Response:
    """The process is alive."""
    return encode.json_response({"live": True})


@router.get("/health/ready", response_model=s.Ready, responses={503: {"model": s.Ready}})
async def ready(request: Request) -> Response:
    """200 when a model is loaded and the session store answers (as ``/readyz``), else 503."""
    ok = await v2_infer.server_ready(_services(request))
    return encode.json_response({"ready": ok}, status=200 if ok else 503)


# -- models ----------------------------------------------------------------------------------
async def _metadata(request: Request, name: str, version: str | None) -> Response:
    model = await _model(request, name, version)
    return encode.json_response(wire_model(model).metadata(PLATFORM))


@router.get("/models/{model}", response_model=s.ModelMetadata)
async def model_metadata(model: str, request: Request) -> Response:
    """Name, versions, platform, inputs and outputs (batch-major, -1: any size)."""
    return await _metadata(request, model, None)


@router.get("/models/{model}/versions/{version}", response_model=s.ModelMetadata)
async def model_version_metadata(model: str, version: str, request: Request) -> Response:
    """As ``GET /v2/models/{model}``, for that version."""
    return await _metadata(request, model, version)


async def _ready(request: Request, name: str, version: str | None) -> Response:
    model = await _model(request, name, version)
    return encode.json_response({"name": model.name, "ready": True})


@router.get("/models/{model}/ready", response_model=s.ModelReady)
async def model_ready(model: str, request: Request) -> Response:
    """200 when the model is loaded; 404 unknown, 503 failed to load."""
    return await _ready(request, model, None)


@router.get("/models/{model}/versions/{version}/ready", response_model=s.ModelReady)
async def model_version_ready(model: str, version: str, request: Request) -> Response:
    """As ``GET /v2/models/{model}/ready``, for that version."""
    return await _ready(request, model, version)


async def _config(request: Request, name: str, version: str | None) -> Response:
    model = await _model(request, name, version)
    return encode.json_response(v2_infer.config_of(_services(request), model))


@router.get("/models/{model}/config", response_model=s.ModelConfig)
async def config(model: str, request: Request) -> Response:
    """Triton-style config: ``max_batch_size``, ``sequence_batching`` with implicit states."""
    return await _config(request, model, None)


@router.get("/models/{model}/versions/{version}/config", response_model=s.ModelConfig)
async def version_config(model: str, version: str, request: Request) -> Response:
    """As ``GET /v2/models/{model}/config``, for that version."""
    return await _config(request, model, version)


# -- inference -------------------------------------------------------------------------------
async def _infer(request: Request, name: str, version: str | None) -> Response:
    services = _services(request)
    model = await _model(request, name, version)
    body = v2_request.decompress(
        await request.body(),
        request.headers.get("content-encoding"),
        services.settings.max_request_bytes,
    )
    parsed = v2_request.parse(body, request.headers.get(v2_tensors.HEADER_LENGTH))
    done = await v2_infer.infer(
        services,
        model,
        parsed,
        caller_of(request.scope),
        partial(unless_disconnected, request),
        pinned=version is not None,
    )
    return v2_tensors.reply(model.name, done.version, parsed.id, done.outputs, done.parameters)


@router.post(
    "/models/{model}/infer",
    response_model=s.InferResponse,
    openapi_extra=s.INFER_BODY,
)
async def infer(model: str, request: Request) -> Response:
    """Stateless inference, or one step of a sequence (``parameters.sequence_id``).

    Stateless: ``inputs`` [batch, timesteps, features] (+ ``mask``, ``initial_state/<key>``).
    Sequence: batch 1; ``sequence_start`` (re)starts it, ``sequence_end`` ends it after
    this step. Tensors may be JSON ``data`` or binary; so may outputs.
    """
    return await _infer(request, model, None)


@router.post(
    "/models/{model}/versions/{version}/infer",
    response_model=s.InferResponse,
    openapi_extra=s.INFER_BODY,
)
async def version_infer(model: str, version: str, request: Request) -> Response:
    """As ``POST /v2/models/{model}/infer``, for that version."""
    return await _infer(request, model, version)
