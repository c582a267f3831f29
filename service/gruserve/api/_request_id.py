"""Request ids: the client's ``X-Request-ID`` (or a new one), echoed on every response.

:class:`~gruserve.api.protocols._edge.EdgeMiddleware` picks the id of each HTTP request and
WebSocket handshake, puts it in :data:`REQUEST_ID` for the task answering it (so error
logs can name it) and adds it to the response headers. A received id is kept if it is
1-200 printable ASCII characters without spaces; anything else (or none) is replaced by
32 random hex digits, the form nginx's ``$request_id`` has.
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar

HEADER = b"x-request-id"
REQUEST_ID: ContextVar[str] = ContextVar("gruserve_request_id", default="-")
_VALID = re.compile(rb"[\x21-\x7e]{1,200}")


def new_id() -> bytes:
    return os.urandom(16).hex().encode()


def chosen(received: bytes | None) -> bytes:
    """``received`` if it is a usable id, else a new one."""
    if received is not None and _VALID.fullmatch(received):
        return received
    return new_id()
