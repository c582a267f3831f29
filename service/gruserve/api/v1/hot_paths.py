"""The per-step routes, bulk steps, and session create and delete, dispatched before the
framework's own layers.

A session step over REST (``POST /v1/sessions/{id}/step``) or a WebSocket
(``/v1/sessions/{id}/ws``) is what a busy server does thousands of times a second.
FastAPI wraps every request in its own layers before any user middleware runs
(error handling, telemetry, a body limit, routing), each one more coroutine frame
to enter and resume and, for HTTP, another ``send`` wrapper per message. Those
layers do nothing for these routes: their handlers answer every error themselves
in the one JSON shape. So :class:`~gruserve.api.app.GruServeAPI` asks
:meth:`HotPaths.route` first and hands a match to the handler wrapped only in what
every request needs: the edge (request ids, byte limit, HTTP metrics) and the API-key
check, the same middleware classes the framework path uses (measured in
``bench/README.md``).

Creating (``POST /v1/models/{model}/sessions``) and deleting (``DELETE
/v1/sessions/{id}``) a session go the step's way too: a short-lived session is a create,
a step and a delete, so those cost what a step costs.

Bulk steps (``POST /v1/models/{model}/steps``, :class:`~gruserve.api.v1.bulk.BulkEndpoint`)
take the same way: one request carries many steps, but the layers cost as much as on one.

Anything else, including these paths under a ``root_path`` prefix and other methods
on them, goes through FastAPI as usual, and the routes stay declared there, so
OpenAPI documents them.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Scope

STEP = re.compile(r"/v1/sessions/(?P<session_id>[^/]+)/step")  # always fullmatch
SOCKET = re.compile(r"/v1/sessions/(?P<session_id>[^/]+)/ws")
CREATE = re.compile(r"/v1/models/(?P<model>[^/]+)/sessions")
SESSION = re.compile(r"/v1/sessions/(?P<session_id>[^/]+)")
BULK = re.compile(r"/v1/models/(?P<model>[^/]+)/steps")


class HotPaths:
    """Which requests skip the framework, and the handler each one goes to.

    Args:
        step: ASGI app answering ``POST /v1/sessions/{session_id}/step`` (and, when
            ``lifecycle_routes`` are given, ``POST /v1/models/{model}/sessions`` with
            ``path_params["model"]`` and ``DELETE /v1/sessions/{session_id}``).
        sockets: ASGI app serving WebSockets on ``/v1/sessions/{session_id}/ws``.
        step_route: the declared FastAPI route of ``step``, named in ``scope["route"]``
            (the HTTP metrics label requests by it).
        guard: wraps a handler in the middleware every request passes (edge, API keys).
        lifecycle_routes: the declared create and delete routes, or None: those go
            through FastAPI.
        bulk: ASGI app answering ``POST /v1/models/{model}/steps``, or None (left to FastAPI).
        bulk_route: the declared FastAPI route of ``bulk``.
    """

    def __init__(
        self,
        step: ASGIApp,
        sockets: ASGIApp,
        step_route: BaseRoute,
        guard: Callable[[ASGIApp], ASGIApp],
        lifecycle_routes: tuple[BaseRoute, BaseRoute] | None = None,
        bulk: ASGIApp | None = None,
        bulk_route: BaseRoute | None = None,
    ) -> None:
        self.step, self.sockets, self.step_route = step, sockets, step_route
        self._guarded_step, self._guarded_sockets = guard(step), guard(sockets)
        self.lifecycle_routes = lifecycle_routes
        self.bulk, self.bulk_route = bulk, bulk_route
        self._guarded_bulk = None if bulk is None else guard(bulk)

    def route(self, scope: Scope) -> ASGIApp | None:
        """The guarded handler for ``scope``, with its ``path_params`` set; None: not ours."""
        kind = scope["type"]
        if kind == "http":
            method = scope["method"]
            if method == "POST":
                match = STEP.fullmatch(scope["path"])
                if match is not None:
                    scope["path_params"] = {"session_id": match["session_id"]}
                    scope["route"] = self.step_route
                    return self._guarded_step
                bulk = self._bulk(scope)
                if bulk is not None:
                    return bulk
            if self.lifecycle_routes is None:
                return None
            if method == "POST":
                match = CREATE.fullmatch(scope["path"])
                route = self.lifecycle_routes[0]
            elif method == "DELETE":
                match = SESSION.fullmatch(scope["path"])
                route = self.lifecycle_routes[1]
            else:
                return None
            if match is None:
                return None
            scope["path_params"] = match.groupdict()
            scope["route"] = route
            return self._guarded_step
        if kind == "websocket":
            match = SOCKET.fullmatch(scope["path"])
            if match is None:
                return None
            scope["path_params"] = {"session_id": match["session_id"]}
            return self._guarded_sockets
        return None

    def _bulk(self, scope: Scope) -> ASGIApp | None:
        if self._guarded_bulk is None:
            return None
        match = BULK.fullmatch(scope["path"])
        if match is None:
            return None
        scope["path_params"] = {"model": match["model"]}
        scope["route"] = self.bulk_route
        return self._guarded_bulk
