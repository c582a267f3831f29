"""The one place that maps exceptions to HTTP statuses, and the one error shape.

Every error body, whatever raised it, is::

    {"error": {"type": "InvalidInput", "message": "inputs[2][1]: ...", "field": "inputs[2][1]"}}

``field`` is null when no single field is at fault; a ``StepOutOfOrder`` or
``StepMismatch`` error also has ``current_step``, the session's step count, so a client
can resynchronise. WebSocket and NDJSON replies reuse :func:`error_payload` so a client
parses errors one way. Routes under ``/v2`` speak the KServe v2 / Triton protocol, whose
clients expect ``{"error": "<message>"}``: they get the same message and the same status
in that shape (:func:`shaped`), so the mapping below stays the only one. Our own
exceptions carry messages written for people; anything else is a bug and
answers 500 without leaking internals (the traceback goes to the log).

Every error answered is logged at info (a 5xx at warning, a bug at error with its
traceback) with the request id, so a client's report ("request 3f2a... got 409") can be
found in the log: ``answered 409 StepOutOfOrder (request 3f2a...): session ...``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from gruserve import errors as e
from gruserve.api._request_id import REQUEST_ID
from gruserve.metrics import Metrics

log = logging.getLogger(__name__)

STATUS: dict[type[e.GruServeError], int] = {
    e.InvalidInput: 422,
    e.PayloadTooLarge: 413,
    e.ModelNotFound: 404,
    e.SessionNotFound: 404,
    e.SequenceNotStarted: 404,
    e.SessionNotOnModel: 404,
    e.SessionExists: 409,
    e.SessionConflict: 409,
    e.SessionModelMismatch: 409,
    e.StepOutOfOrder: 409,
    e.StepMismatch: 409,
    e.MissingApiKey: 401,
    e.InvalidApiKey: 403,
    e.AdminOnly: 403,
    e.TooManySessions: 429,
    e.ModelUnavailable: 503,
    e.ModelVersionGone: 410,
    e.StoreUnavailable: 503,
}
CLIENT_CLOSED = 499  # nginx's "client closed request": nobody receives it, but metrics count it


class ClientDisconnected(e.GruServeError):
    """The client went away before its reply; nobody reads the answer (logged as 499)."""

    def __init__(self) -> None:
        super().__init__("the client disconnected before the reply")


def status_of(exc: BaseException) -> int:
    if isinstance(exc, ClientDisconnected):
        return CLIENT_CLOSED
    for kind in type(exc).__mro__:
        status = STATUS.get(kind)  # type: ignore[call-overload]
        if status is not None:
            return status
    return 500


def log_answer(status: int, kind: str, message: str) -> None:
    """Log one error answered (see the module docstring), with the request id."""
    request_id = REQUEST_ID.get()
    log.log(
        logging.WARNING if status >= 500 else logging.INFO,
        "answered %d %s (request %s): %s",
        status,
        kind,
        request_id,
        message,
        extra={"request_id": request_id},
    )


def error_type(exc: BaseException) -> str:
    """The ``type`` an error body names (and ``gruserve_errors_total`` counts) for ``exc``."""
    return type(exc).__name__ if isinstance(exc, e.GruServeError) else "InternalError"


def count_answered(metrics: Metrics | None, answers: Iterable[object]) -> None:
    """Count in ``gruserve_errors_total`` each exception among ``answers``: a gRPC call's or
    stream message's error, and the errors a stream or a bulk reply carries inside a 200 (a
    WebSocket's error messages, NDJSON error lines, a bulk request's failed steps), as an
    HTTP request's own error is counted, so that an alert on an error type sees every
    client it answers."""
    if metrics is None:
        return
    for answer in answers:
        if isinstance(answer, BaseException):
            metrics.errors.labels(error_type(answer)).inc()


def error_payload(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """``(status, body)`` for any exception; unexpected ones are logged and hidden, the
    others logged as :func:`log_answer` says."""
    if isinstance(exc, e.GruServeError):
        status, kind, message = status_of(exc), error_type(exc), str(exc)
        log_answer(status, kind, message)
    else:
        request_id = REQUEST_ID.get()
        log.error(
            "unexpected error (request %s)",
            request_id,
            exc_info=exc,
            extra={"request_id": request_id},
        )
        status, kind, message = (
            500,
            "InternalError",
            f"internal server error; the server log has the details (request {request_id})",
        )
    error: dict[str, Any] = {"type": kind, "message": message, "field": getattr(exc, "field", None)}
    if isinstance(exc, e.StepOutOfOrder | e.StepMismatch):
        error["current_step"] = exc.current_step
    return status, {"error": error}


def counted_error(exc: BaseException, metrics: Metrics | None) -> tuple[int, dict[str, Any]]:
    """:func:`error_payload`, counted in ``gruserve_errors_total``: the one way an error
    answered on its own is answered and counted, a request's (the framework's handlers, the
    fast step and bulk routes, the edge, the API-key check) or a message's (a WebSocket's
    error message, an NDJSON error line). A bulk reply's failed steps and gRPC errors are
    counted by :func:`count_answered`, where their answers are built."""
    status, body = error_payload(exc)
    count_answered(metrics, [exc])
    return status, body


def json_error(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(body), status_code=status, media_type="application/json", headers=headers
    )


def is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def shaped_for(path: str, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` as the protocol of ``path`` words errors: v2 routes take the message alone."""
    if is_v2(path):
        return {"error": body["error"]["message"]}
    return body


def shaped(request: Request, body: dict[str, Any]) -> dict[str, Any]:
    return shaped_for(request.scope["path"], body)


def _loc(loc: tuple[Any, ...]) -> str:
    parts = list(loc[1:]) if loc and loc[0] in ("body", "query", "path", "header") else list(loc)
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def install(app: FastAPI, metrics: Metrics | None = None) -> None:
    """Register the handlers that give every error the one JSON shape."""

    def count(kind: str) -> None:
        if metrics is not None:
            metrics.errors.labels(kind).inc()

    @app.exception_handler(e.GruServeError)
    async def _ours(request: Request, exc: e.GruServeError) -> Response:
        status, body = counted_error(exc, metrics)
        return json_error(status, shaped(request, body))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request"}
        field = _loc(tuple(first.get("loc", ())))
        count("InvalidInput")
        log_answer(422, "InvalidInput", f"{field}: {first.get('msg')}")
        return json_error(
            422,
            shaped(
                request,
                {
                    "error": {
                        "type": "InvalidInput",
                        "message": f"{field}: {first.get('msg')}",
                        "field": field,
                    }
                },
            ),
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        message = (
            f"no route {request.method} {request.url.path}; see /docs"
            if exc.status_code == 404
            else str(exc.detail)
        )
        count(kind)
        log_answer(exc.status_code, kind, message)
        return json_error(
            exc.status_code,
            shaped(request, {"error": {"type": kind, "message": message, "field": None}}),
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        status, body = counted_error(exc, metrics)
        return json_error(status, shaped(request, body))
