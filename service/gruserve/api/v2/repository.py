"""The model repository extension of the v2 protocol (Triton's ``model_repository``).

``POST /v2/repository/index`` lists every model version with its state (READY,
LOADING, UNAVAILABLE) and, when not ready, why; ``.../models/{model}/load`` rescans
that model's folder and applies its version policy (new versions load, verify and warm
up before one becomes the default); ``.../unload`` unloads the model. The lifecycle
itself lives in :mod:`gruserve.runtime.registry`; this module only translates.
With API keys, only an admin key may call these routes.

A server serves one repository (``GRUSERVE_MODELS_DIR``) and, as Triton does, names it
by the empty ``repository_name``: Triton's optional path segment
(``/v2/repository/{repository_name}/...``) and the gRPC RPCs' ``repository_name`` field
take no other name. The folder's own name is not accepted as one: it is where an image
or volume happens to mount it, which clients should not have to know.
"""

from __future__ import annotations

from typing import Any, NoReturn

from fastapi import APIRouter, Request
from starlette.responses import Response

from gruserve.api import decode, encode
from gruserve.api._auth import caller_of
from gruserve.errors import AdminOnly, InvalidInput, ModelNotFound, RepositoryError
from gruserve.repository import validate_model_name
from gruserve.runtime.registry import IndexEntry
from gruserve.services import Services
from gruserve.sessions.owner import Caller

router = APIRouter(prefix="/v2/repository", tags=["v2 repository"])


def admin_only(caller: Caller) -> None:
    """Only an admin key may use the repository API, over HTTP and gRPC alike.

    Raises:
        AdminOnly: ``caller`` is a tenant.
    """
    if not caller.admin:
        raise AdminOnly("the model repository API")


def _services(request: Request) -> Services:
    admin_only(caller_of(request.scope))
    services: Services = request.app.state.services
    return services


def _entry(entry: IndexEntry) -> dict[str, Any]:
    return {
        "name": entry.name,
        "version": str(entry.version),  # Triton's index gives versions as strings
        "state": entry.state,
        "reason": entry.reason,
        "default": entry.default,
    }


def model_name(services: Services, name: str) -> str:
    """``name`` when the repository knows it.

    Raises:
        InvalidInput: not a model name; ModelNotFound: no such model folder.
    """
    try:
        validate_model_name(name)
    except RepositoryError as exc:
        raise InvalidInput("model", str(exc)) from None
    known = {e.name for e in services.registry.index()}
    if name not in known:
        raise ModelNotFound(name, available=sorted(known))
    return name


def the_repository(name: str) -> None:
    """Accept ``name`` when it names this server's one repository: only ``""`` does.

    Raises:
        InvalidInput: any other name (``repository_name``).
    """
    if name:
        _not_this(name)


def _not_this(name: str) -> NoReturn:
    raise InvalidInput(
        "repository_name",
        "this server serves one model repository, named by an empty repository_name "
        f"(or none at all). Received: {name!r}",
    )


@router.post("/index")
async def index(request: Request) -> Response:
    """Every model version on disk or loaded: ``state`` READY, LOADING or UNAVAILABLE, the
    ``reason`` when not ready, and ``default`` for the version new sessions get. Body
    (optional): ``{"ready": true}`` lists only READY versions."""
    services = _services(request)
    raw = await request.body()
    ready_only = False
    if raw.strip():
        body = decode.json_object(raw, {"ready": None})
        ready_only = body.get("ready", False)
        if not isinstance(ready_only, bool):
            raise InvalidInput("ready", f"expected true or false, got {decode.shown(ready_only)}")
    entries = [_entry(e) for e in services.registry.index() if not ready_only or e.state == "READY"]
    return encode.json_response(entries)


@router.post("/models/{model}/load")
async def load(model: str, request: Request) -> Response:
    """Rescan the model's folder and apply its version policy: new versions are loaded,
    checked (sha256), warmed up, and only then made the default; a version that fails is
    listed UNAVAILABLE with the reason while the previous default keeps serving."""
    services = _services(request)
    name = model_name(services, model)
    entries = await reload(services, name)
    return encode.json_response(
        {
            "name": name,
            "default_version": services.registry.default_version(name),
            "versions": [_entry(e) for e in entries],
        }
    )


@router.post("/models/{model}/unload")
async def unload(model: str, request: Request) -> Response:
    """Unload every version of the model: its requests answer 503 until it is loaded again
    (its sessions stay in the store)."""
    services = _services(request)
    name = model_name(services, model)
    take_down(services, name)
    return encode.json_response({"name": name})


async def reload(services: Services, name: str) -> list[IndexEntry]:
    """Rescan model ``name``'s folder and apply its version policy (the ``load`` call)."""
    entries = await services.registry.refresh_async(name)
    services.batchers.prune()
    return entries


def take_down(services: Services, name: str) -> None:
    """Unload every version of model ``name`` (the ``unload`` call)."""
    services.registry.unload(name)
    services.batchers.prune()


@router.post("/{repository_name}/index", include_in_schema=False)
@router.post("/{repository_name}/models/{model}/load", include_in_schema=False)
@router.post("/{repository_name}/models/{model}/unload", include_in_schema=False)
async def named(repository_name: str, request: Request) -> Response:
    """Triton's routes that name a repository: refused with 422 naming ``repository_name``
    (a path segment is never empty, so no name here is this server's)."""
    _services(request)
    _not_this(repository_name)
