"""Optional API keys: one ASGI middleware in front of every route and WebSocket.

With keys configured (``GRUSERVE_API_KEYS``, ``GRUSERVE_API_KEYS_FILE``), a request must
carry one, as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``, except on the
liveness and readiness routes (and ``/metrics`` with ``GRUSERVE_METRICS_PUBLIC``);
``/readyz`` without a valid key says only ready or not ready, its details (model paths,
load and store errors) need one (:data:`AUTHENTICATED`):

- no key, an empty one, or an ``Authorization`` header of another scheme: 401
  ``MissingApiKey`` with ``WWW-Authenticate: Bearer``;
- a key that is not one of the server's: 403 ``InvalidApiKey``.

A key may carry a name and a role: ``name:key`` or ``name:key:admin`` (a bare ``key`` has
no name). The name is the tenant the request acts for (:class:`~gruserve.sessions.owner.Caller`,
put in the scope as :data:`CALLER`): a session belongs to the name that created it, each
name has its own namespace of session ids, and other names' sessions do not exist for it;
``admin`` sees and manages every session (:mod:`gruserve.sessions.owner`).
Without keys every request is :data:`~gruserve.sessions.owner.ANYONE`.

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
import re
from collections.abc import Iterable
from pathlib import Path

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from gruserve.api import encode
from gruserve.api._request_id import HEADER, REQUEST_ID
from gruserve.api.errors import counted_error, shaped_for
from gruserve.errors import ConfigError, GruServeError, InvalidApiKey, MissingApiKey
from gruserve.metrics import Metrics
from gruserve.sessions.owner import ANYONE, Caller

PUBLIC = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
DETAILED = frozenset({"/readyz"})
"""Public paths whose reply has details for key holders only."""
AUTHENTICATED = "gruserve.authenticated"
"""Scope key: on a :data:`DETAILED` path, whether the request presented a valid key (absent
when the server has no keys: everyone may see the details then)."""
METRICS = "/metrics"
_BEARER = b"bearer "
CALLER = "gruserve.caller"
"""Scope key: the :class:`Caller` whose key the request presented."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def caller_of(scope: Scope) -> Caller:
    """The request's tenant (:data:`ANYONE` on a server without keys)."""
    caller: Caller = scope.get(CALLER, ANYONE)
    return caller


def parse_key(entry: str, number: int) -> tuple[str, Caller]:
    """``key``, ``name:key`` or ``name:key:admin`` as the key and who presents it.

    Raises:
        ConfigError: a name outside letters, digits, ``.``, ``_``, ``-`` (64 at most), an
            empty key, or a role other than ``admin`` (the key itself is never shown).
    """
    parts = entry.split(":")
    if len(parts) == 1:
        return entry, Caller("")
    name, key, *role = parts
    if not _NAME.fullmatch(name):
        raise ConfigError(
            "API keys",
            f"key {number}: the name before ':' must be 1-64 letters, digits, '.', '_' or "
            f"'-'. Received: {name!r}",
        )
    if not key or role not in ([], ["admin"]):
        raise ConfigError(
            "API keys", f"key {number} ({name!r}): expected name:key or name:key:admin"
        )
    return key, Caller(name, admin=bool(role))


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
    """A set of keys, checked in constant time, each with the caller it stands for.

    Args:
        keys: at least one non-empty entry: ``key``, ``name:key`` or ``name:key:admin``.

    Raises:
        ConfigError: an entry :func:`parse_key` refuses.
    """

    def __init__(self, keys: Iterable[str]) -> None:
        parsed = [parse_key(k, n) for n, k in enumerate(keys, start=1)]
        self._digests = [hashlib.sha256(k.encode()).digest() for k, _ in parsed]
        self._callers = [caller for _, caller in parsed]
        if not self._digests:
            raise ValueError("ApiKeys needs at least one key")

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, presented: bytes) -> bool:
        return self.caller(presented) is not None

    def caller(self, presented: bytes) -> Caller | None:
        """Who ``presented`` stands for, or None if it is no key of this server."""
        given = hashlib.sha256(presented).digest()
        found = None
        for digest, caller in zip(self._digests, self._callers, strict=True):
            if hmac.compare_digest(given, digest):  # every key, every time
                found = caller
        return found

    def identify(self, headers: list[tuple[bytes, bytes]]) -> Caller | GruServeError:
        """The caller a request with ``headers`` acts as, or why it is refused."""
        presented = presented_keys(headers)
        if presented is None:
            return MissingApiKey()
        found = None
        for key in presented:
            found = self.caller(key) or found
        return InvalidApiKey() if found is None else found

    def refusal(self, headers: list[tuple[bytes, bytes]]) -> GruServeError | None:
        """Why a request with ``headers`` is refused, or None if it presents a valid key."""
        found = self.identify(headers)
        return found if isinstance(found, GruServeError) else None


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
            if path in DETAILED:
                scope[AUTHENTICATED] = self.keys.refusal(scope["headers"]) is None
            await self.app(scope, receive, send)
            return
        refusal = self.keys.identify(scope["headers"])
        if isinstance(refusal, Caller):
            scope[CALLER] = refusal
            await self.app(scope, receive, send)
            return
        status, body = counted_error(refusal, self.metrics)
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
