"""Optional API keys: one ASGI middleware in front of every route and WebSocket.

With keys configured (``GRUSERVE_API_KEYS``, ``GRUSERVE_API_KEYS_FILE``), a request must
carry one, as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``, except on the
liveness and readiness routes (and ``/metrics`` with ``GRUSERVE_METRICS_PUBLIC``):

- no key, an empty one, or an ``Authorization`` header of another scheme: 401
  ``MissingApiKey`` with ``WWW-Authenticate: Bearer``;
- a key that is not one of the server's: 403 ``InvalidApiKey``.

A WebSocket handshake is checked the same way and refused before it is accepted, with
that HTTP status (ASGI's WebSocket denial response; a server without it closes the
handshake, which clients see as 403). The docs pages, their assets and the OpenAPI
schema need no key (api/docs.py).

Keys are compared as SHA-256 digests with :func:`hmac.compare_digest`, against every
configured key whatever the outcome, so the time taken says nothing about which key,
or how much of one, matched. Keys are never logged or echoed: errors say only that a
key is missing or wrong. Without keys this middleware is not installed at all.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from gruserve.api import encode
from gruserve.api._request_id import HEADER, REQUEST_ID
from gruserve.api.errors import error_payload, shaped_for
from gruserve.errors import ConfigError, GruServeError, InvalidApiKey, MissingApiKey
from gruserve.metrics import Metrics

PUBLIC = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
METRICS = "/metrics"
_BEARER = b"bearer "


def load_keys(inline: SecretStr | None, file: Path | None) -> list[str]:
    """The keys of ``GRUSERVE_API_KEYS`` (comma-separated) and ``GRUSERVE_API_KEYS_FILE``
    (one per line; blank lines and ``#`` comments ignored), without duplicates.

    Raises:
        ConfigError: the file cannot be read or holds no key (a server told to read keys
            from a file never starts open), or a key has whitespace or non-ASCII characters.
    """
    keys = [] if inline is None else inline.get_secret_value().split(",")
    if file is not None:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                "GRUSERVE_API_KEYS_FILE", f"cannot read {file}: {type(exc).__name__}"
            ) from None
        lines = [line for line in text.splitlines() if not line.strip().startswith("#")]
        if not any(line.strip() for line in lines):  # fail closed: a file meant keys
            raise ConfigError(
                "GRUSERVE_API_KEYS_FILE",
                f"{file} holds no key; add keys (one per line) or unset the setting",
            )
        keys += lines
    found: list[str] = []
    for number, raw in enumerate(keys, start=1):
        key = raw.strip()
        if not key:
            continue
        if not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
            raise ConfigError(
                "API keys",
                f"key {number} has whitespace or characters outside printable ASCII "
                "(value not shown)",
            )
        if key not in found:
            found.append(key)
    return found


class ApiKeys:
    """A set of keys, checked in constant time.

    Args:
        keys: at least one non-empty key.
    """

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]
        if not self._digests:
            raise ValueError("ApiKeys needs at least one key")

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, presented: bytes) -> bool:
        given = hashlib.sha256(presented).digest()
        matched = False
        for digest in self._digests:  # every key, every time
            matched |= hmac.compare_digest(given, digest)
        return matched

    def refusal(self, headers: list[tuple[bytes, bytes]]) -> GruServeError | None:
        """Why a request with ``headers`` is refused, or None if it presents a valid key."""
        presented = presented_keys(headers)
        if presented is None:
            return MissingApiKey()
        accepted = False
        for key in presented:
            accepted |= self.accepts(key)
        return None if accepted else InvalidApiKey()


def presented_keys(headers: list[tuple[bytes, bytes]]) -> list[bytes] | None:
    """The keys a request presents, or None if it presents none (or only malformed ones)."""
    found = []
    for name, value in headers:
        if name == b"authorization":
            if value[:7].lower() == _BEARER and value[7:].strip():
                found.append(value[7:].strip())
        elif name == b"x-api-key" and value.strip():
            found.append(value.strip())
    return found or None


class ApiKeyMiddleware:
    """Refuse HTTP requests and WebSocket handshakes without a valid key (see the module).

    Args:
        app: the rest of the ASGI stack.
        keys: the accepted keys.
        metrics: refusals are counted in ``gruserve_errors_total`` by type.
        public: paths that need no key.
        public_prefix: paths starting with it need no key either (the docs' assets).
    """

    def __init__(
        self,
        app: ASGIApp,
        keys: ApiKeys,
        metrics: Metrics,
        public: frozenset[str] = PUBLIC,
        public_prefix: str | None = None,
    ) -> None:
        self.app, self.keys, self.metrics, self.public = app, keys, metrics, public
        self.public_prefix = (public_prefix,) if public_prefix else ()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        path = self._path(scope) if kind in ("http", "websocket") else ""
        if (
            kind not in ("http", "websocket")
            or path in self.public
            or (kind == "http" and path.startswith(self.public_prefix))
        ):
            await self.app(scope, receive, send)
            return
        refusal = self.keys.refusal(scope["headers"])
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, body = error_payload(refusal)
        self.metrics.errors.labels(body["error"]["type"]).inc()
        content = encode.dumps(shaped_for(scope["path"], body))
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(content)),
        ]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="gruserve"'))
        if kind == "http":
            prefix = "http.response"
        else:
            if (await receive())["type"] != "websocket.connect":
                return
            if "websocket.http.response" not in scope.get("extensions", {}):
                # without ASGI's denial response, a close before accept is answered 403
                await send({"type": "websocket.close", "code": 1008})
                return
            prefix = "websocket.http.response"
            headers.append((HEADER, REQUEST_ID.get().encode()))  # the edge adds it for HTTP
        await send({"type": f"{prefix}.start", "status": status, "headers": headers})
        await send({"type": f"{prefix}.body", "body": content})

    @staticmethod
    def _path(scope: Scope) -> str:
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            return path[len(root) :]
        return path
