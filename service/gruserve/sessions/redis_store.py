"""Redis session store, shared by every replica of the server.

Layout: one hash per session (``<prefix>session:<id>``) holding the metadata
and the state as raw float32 little-endian bytes, with a Redis expiry of the
idle TTL that every write renews; and one sorted set (``<prefix>sessions``)
of session ids scored by expiry time, so the session count and the
``max_sessions`` limit hold across replicas.

Writes are Lua scripts, atomic on the server:

- create: refuse an existing id or a full store, then write hash, expiry and index;
- compare-and-set: write only if the stored ``revision`` is the one the writer
  read. Two replicas that read revision 7 both try to write revision 8; exactly
  one wins, the other re-reads and recomputes. Each write also stores a random
  ``writer`` token, so a write retried after a lost reply recognises itself
  instead of being reported as a conflict (which would apply the step twice).

Times come from Redis's own clock (``TIME``), so replicas with skewed clocks agree.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gruserve.errors import SessionExists, SessionNotFound, StoreUnavailable, TooManySessions
from gruserve.sessions.store import SessionRecord

T = TypeVar("T")

_NOW_MS = (
    "local t = redis.call('TIME') "
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)"
)

_CREATE = (
    _NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[1]) then return -2 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
return 1
"""
)

_CAS = (
    """
local cur = redis.call('HMGET', KEYS[1], 'revision', 'writer')
if not cur[1] then return -1 end
if cur[1] ~= ARGV[1] then
    if cur[1] == ARGV[2] and cur[2] == ARGV[3] then return 1 end
    return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
"""
    + _NOW_MS
    + """
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[5])
return 1
"""
)

_DELETE = """
redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('DEL', KEYS[1])
"""

_COUNT = (
    _NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""
)


def _fields(record: SessionRecord, writer: bytes) -> list[Any]:
    return [
        "model",
        record.model,
        "version",
        record.version,
        "state",
        np.ascontiguousarray(record.state, "<f4").tobytes(),
        "step",
        record.step,
        "timesteps",
        record.timesteps,
        "revision",
        record.revision,
        "created_at",
        repr(record.created_at),
        "last_used_at",
        repr(record.last_used_at),
        "result",
        record.last_result or b"",
        "writer",
        writer,
    ]


def _record(session_id: str, h: dict[bytes, bytes]) -> SessionRecord:
    return SessionRecord(
        session_id=session_id,
        model=h[b"model"].decode(),
        version=int(h[b"version"]),
        state=np.frombuffer(h[b"state"], "<f4"),
        step=int(h[b"step"]),
        timesteps=int(h[b"timesteps"]),
        revision=int(h[b"revision"]),
        created_at=float(h[b"created_at"]),
        last_used_at=float(h[b"last_used_at"]),
        last_result=h.get(b"result") or None,
    )


class RedisSessionStore:
    """Sessions in Redis with idle expiry and atomic compare-and-set.

    Args:
        url: ``redis://host:port/db`` (``rediss://`` for TLS, ``unix://`` for a socket).
        ttl_s: idle time to live in seconds.
        max_sessions: most sessions across every replica sharing this Redis.
        prefix: key prefix, to share one database between deployments.
        timeout_s: socket timeout; an unreachable Redis fails requests with 503 after it.
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        ttl_s: float,
        max_sessions: int,
        prefix: str = "gruserve:",
        timeout_s: float = 2.0,
    ) -> None:
        if not ttl_s > 0:
            raise ValueError(f"RedisSessionStore needs ttl_s > 0. Received: ttl_s={ttl_s!r}")
        self.url, self.max_sessions = url, max_sessions
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._prefix = prefix
        self._index = f"{prefix}sessions"
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
            health_check_interval=30,
        )
        self._create = self._redis.register_script(_CREATE)
        self._cas = self._redis.register_script(_CAS)
        self._delete = self._redis.register_script(_DELETE)
        self._count = self._redis.register_script(_COUNT)

    def _key(self, session_id: str) -> str:
        return f"{self._prefix}session:{session_id}"

    async def _call(self, make: Callable[[], Awaitable[T]]) -> T:
        try:
            return await make()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"redis at {self._redis_location()}", exc) from exc

    def _redis_location(self) -> str:
        kwargs = self._redis.connection_pool.connection_kwargs
        return str(kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}")

    async def create(self, record: SessionRecord) -> None:
        key = self._key(record.session_id)
        args = [self.max_sessions, self._ttl_ms, record.session_id, *_fields(record, b"")]
        outcome = await self._call(lambda: self._create(keys=[key, self._index], args=args))
        if outcome == 0:
            raise SessionExists(record.session_id)
        if outcome == -2:
            raise TooManySessions(self.max_sessions)

    async def get(self, session_id: str) -> SessionRecord:
        h = await self._call(lambda: self._redis.hgetall(self._key(session_id)))
        if not h:
            raise SessionNotFound(session_id)
        return _record(session_id, h)

    async def compare_and_set(self, record: SessionRecord, expected_revision: int) -> bool:
        writer = os.urandom(8).hex().encode()
        args = [
            expected_revision,
            record.revision,
            writer,
            self._ttl_ms,
            record.session_id,
            *_fields(record, writer),
        ]
        key = self._key(record.session_id)
        outcome = await self._call(lambda: self._cas(keys=[key, self._index], args=args))
        if outcome == -1:
            raise SessionNotFound(record.session_id)
        return bool(outcome == 1)

    async def delete(self, session_id: str) -> None:
        key = self._key(session_id)
        removed = await self._call(lambda: self._delete(keys=[key, self._index], args=[session_id]))
        if not removed:
            raise SessionNotFound(session_id)

    async def count(self) -> int:
        return int(await self._call(lambda: self._count(keys=[self._index], args=[])))

    async def ping(self) -> None:
        await self._call(self._redis.ping)

    async def close(self) -> None:
        await self._redis.aclose()
