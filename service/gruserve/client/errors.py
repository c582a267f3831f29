"""The exceptions :mod:`gruserve.client` raises.

An error the server answered becomes an :class:`ApiError` subclass named after the
server's error ``type`` (``SessionNotFound``, ``InvalidInput``, ``StepOutOfOrder``, ...),
carrying the HTTP status, the message, the ``field`` at fault and, for
``StepOutOfOrder``, the session's ``current_step``: code catches the one case it can act
on and lets the rest through. A type this client does not know (a newer server) still
arrives as a plain :class:`ApiError` with its ``type`` string.

:class:`ConnectionLost` is what is left when every retry of a request failed without an
answer (timeouts, refused or dropped connections, 502/503/504 from a proxy).
"""

from __future__ import annotations

from typing import Any

import orjson


class ClientError(Exception):
    """Base class of every error :mod:`gruserve.client` raises."""


class ConnectionLost(ClientError):
    """No answer after every retry: the last attempt's failure is ``__cause__``."""

    def __init__(self, what: str, attempts: int, last: str) -> None:
        self.attempts = attempts
        super().__init__(f"{what}: no answer after {attempts} attempts (last: {last})")


class ApiError(ClientError):
    """The server answered with an error.

    Attributes:
        status: the HTTP status (or the ``status`` of a WebSocket error message).
        type: the server's error type, e.g. ``"InvalidInput"``.
        message: the server's message, written for a person.
        field: the request field at fault (``"inputs[2][1]"``), or None.
        body: the whole error object as the server sent it.
    """

    def __init__(self, status: int, type: str, message: str, field: str | None, body: Any) -> None:
        self.status, self.type, self.message, self.field, self.body = (
            status,
            type,
            message,
            field,
            body,
        )
        super().__init__(f"{status} {type}: {message}")


class ModelNotFound(ApiError):
    """No model of that name (or version) is served."""


class SessionNotFound(ApiError):
    """The session does not exist, or expired."""


class NotFound(ApiError):
    """No such route."""


class SessionExists(ApiError):
    """A session with that id exists already."""


class SessionConflict(ApiError):
    """Another replica kept winning the update race on the session."""


class SessionModelMismatch(ApiError):
    """The session's model version is not the one served."""


class StepOutOfOrder(ApiError):
    """The step number is neither the next step nor the last one.

    Attributes:
        current_step: the steps the session has applied.
    """

    @property
    def current_step(self) -> int | None:
        value = self.body.get("current_step") if isinstance(self.body, dict) else None
        return None if value is None else int(value)


class InvalidInput(ApiError):
    """The request is malformed: ``field`` names the element."""


class PayloadTooLarge(ApiError):
    """The body or the number of timesteps is over the server's limits."""


class MissingApiKey(ApiError):
    """The server needs an API key and the client sent none."""


class InvalidApiKey(ApiError):
    """The API key is not one of the server's."""


class TooManySessions(ApiError):
    """The server holds its maximum number of sessions."""


class StoreUnavailable(ApiError):
    """The session store (Redis) did not answer; retried before this is raised."""


class StoreFull(StoreUnavailable):
    """The session store (Redis) is full and refuses writes until memory is freed; retried
    before this is raised, as any 503 is."""


class StoreDenied(StoreUnavailable):
    """The session store (Redis) refuses the server's Redis user (a wrong password, or an
    ACL denying a command or key) until an operator fixes it; retried before this is
    raised, as any 503 is."""


class ModelUnavailable(ApiError):
    """The model failed to load on the server."""


class InternalError(ApiError):
    """A server bug; its log has the traceback for the request id in the message."""


_TYPES: dict[str, type[ApiError]] = {
    cls.__name__: cls
    for cls in (
        ModelNotFound,
        SessionNotFound,
        NotFound,
        SessionExists,
        SessionConflict,
        SessionModelMismatch,
        StepOutOfOrder,
        InvalidInput,
        PayloadTooLarge,
        MissingApiKey,
        InvalidApiKey,
        TooManySessions,
        StoreUnavailable,
        StoreFull,
        StoreDenied,
        ModelUnavailable,
        InternalError,
    )
}


def api_error(status: int, content: bytes | bytearray | str) -> ApiError:
    """The typed exception for an error reply: ``{"error": {"type", "message", ...}}``.

    A body that is not that shape (a proxy's HTML page, say) becomes a plain
    :class:`ApiError` of type ``"HTTPError"`` with the body's start as its message.
    """
    try:
        body = orjson.loads(content)
        error = body["error"]
        kind, message = str(error["type"]), str(error["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        # a WebSocket handshake's refusal carries its body as a bytearray
        text = content if isinstance(content, str) else content.decode(errors="replace")
        return ApiError(status, "HTTPError", text[:200], None, None)
    return _TYPES.get(kind, ApiError)(
        int(error.get("status", status)), kind, message, error.get("field"), error
    )
