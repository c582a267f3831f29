"""The OpenAPI schema as clients read it, and the docs pages, served with no network.

FastAPI's own ``/docs`` and ``/redoc`` load Swagger UI and ReDoc from a CDN, so
they are blank pages offline. Here the pages load the copies that the
``fastapi-offline`` package ships (MIT; Swagger UI itself is Apache-2.0, ReDoc
MIT), from ``/docs/assets/``. The pages, their assets and ``/openapi.json`` need
no API key (:data:`PUBLIC_PATHS`, :data:`PUBLIC_PREFIX`): they hold nothing
secret, and a reader must see the docs to learn how to send a key.

What FastAPI generates is then corrected where the routes decode their input
themselves (:func:`finish_schema`):

- ``{version}`` path parameters are integers (the routes take a string so that a
  bad one is answered 400 naming ``version``, as on every gruserve route);
- a body schema written from a pydantic model (``schemas.request_body``) keeps its
  nested models under ``$defs``, which references in an OpenAPI document cannot reach
  (ReDoc stops at them): they move to ``components/schemas``;
- with keys set, the two ways to send one are declared (Swagger UI's
  *Authorize* button) and every operation needs one but the probes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.staticfiles import StaticFiles
from starlette.requests import Request
from starlette.responses import HTMLResponse

DOCS = "/docs"
REDOC = "/redoc"
OPENAPI = "/openapi.json"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"
PUBLIC_PREFIX = "/docs/assets/"
PUBLIC_PATHS = frozenset({DOCS, REDOC, OPENAPI, OAUTH2_REDIRECT})
SECURITY_SCHEMES: dict[str, Any] = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <key>` (a key of GRUSERVE_API_KEYS).",
    },
    "apiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "`X-API-Key: <key>` (a key of GRUSERVE_API_KEYS).",
    },
}
INTEGER_PATH_PARAMETERS = frozenset({"version"})


def assets_dir() -> str:
    """The folder of Swagger UI's and ReDoc's files inside the ``fastapi-offline`` package."""
    return str(resources.files("fastapi_offline") / "static")


def install(app: FastAPI, keys_required: bool, public: Iterable[str]) -> None:
    """Serve ``/docs`` and ``/redoc`` from local assets and correct the schema.

    Args:
        app: built with ``docs_url=None, redoc_url=None`` (this module serves both).
        keys_required: whether the server has API keys (declares them in the schema).
        public: the paths that need no key (they are marked so in the schema).
    """
    assets = PUBLIC_PREFIX.rstrip("/")
    app.mount(assets, StaticFiles(directory=assets_dir()), name="docs-assets")

    @app.get(DOCS, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + OPENAPI,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=root + OAUTH2_REDIRECT,
            swagger_js_url=f"{root}{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{assets}/swagger-ui.css",
            swagger_favicon_url=f"{root}{assets}/favicon.png",
            swagger_ui_parameters={"persistAuthorization": True},
        )

    @app.get(OAUTH2_REDIRECT, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=root + OPENAPI,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{assets}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{assets}/favicon.png",
            with_google_fonts=False,
        )

    app.openapi = _cached(app, app.openapi, keys_required, frozenset(public))  # type: ignore[method-assign]


def _cached(
    app: FastAPI, generate: Callable[[], dict[str, Any]], keys: bool, public: frozenset[str]
) -> Callable[[], dict[str, Any]]:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = finish_schema(generate(), keys, public)
        return app.openapi_schema

    return openapi


def finish_schema(schema: dict[str, Any], keys: bool, public: frozenset[str]) -> dict[str, Any]:
    """``schema`` corrected as the module says (changed in place and returned)."""
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and parameter["name"] in INTEGER_PATH_PARAMETERS:
                    parameter["schema"] = {
                        "type": "integer",
                        "minimum": 0,
                        "title": parameter["schema"].get("title", "Version"),
                    }
            if keys and path in public:
                operation["security"] = []  # no key needed: overrides the global requirement
    _hoist_defs(
        schema.get("paths", {}), schema.setdefault("components", {}).setdefault("schemas", {})
    )
    if keys:
        schema["components"]["securitySchemes"] = SECURITY_SCHEMES
        schema["security"] = [{"bearer": []}, {"apiKey": []}]
    return schema


def _hoist_defs(node: Any, components: dict[str, Any]) -> None:
    """Move every nested ``$defs`` into ``components`` and point ``#/$defs/`` refs there."""
    if isinstance(node, dict):
        for name, definition in node.pop("$defs", {}).items():
            if components.setdefault(name, definition) != definition:
                raise ValueError(f"two different schemas are both called {name!r}")
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            node["$ref"] = "#/components/schemas/" + ref.removeprefix("#/$defs/")
        for value in node.values():
            _hoist_defs(value, components)
    elif isinstance(node, list):
        for value in node:
            _hoist_defs(value, components)
