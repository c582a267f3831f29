"""Redis session store, shared by every replica of the server.

Layout: one hash per session (``<prefix>session:<id>``) holding the metadata, the
state as raw float32 little-endian bytes and the last numbered step's result, with a
Redis expiry at the earlier of its idle deadline (renewed by every write) and its
lifetime deadline; and three sorted sets: ``<prefix>sessions`` (ids by idle
deadline, which is also least-recently-used order), ``<prefix>lifetimes`` (ids by
lifetime deadline, when a lifetime is set) and ``<prefix>ids`` (every id, for
listing by id with ``ZRANGEBYLEX``). The sets make the session count, the
``max_sessions`` limit and LRU eviction hold across replicas.

Writes are Lua scripts, atomic on the server:

- create: sweep expired ids (reporting them), refuse an existing id, refuse a full
  store or evict its least recently used sessions, then write hash, expiry and sets;
- compare-and-set: write only if the stored ``revision`` is the one the writer
  read. Two replicas that read revision 7 both try to write revision 8; exactly
  one wins, the other re-reads and recomputes. Each write also stores a random
  ``writer`` token, so a write retried after a lost reply recognises itself
  instead of being reported as a conflict (which would apply the step twice).
  State, counters and the stored result are one ``HSET``: a session is never seen
  half written.

Idle times come from Redis's own clock (``TIME``), so replicas with skewed clocks
agree; the lifetime counts from the record's ``created_at``, the creating replica's
clock. (Scripts touch keys they build from the prefix, so this needs one Redis, not
a Redis Cluster.)
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gruserve.errors import SessionExists, SessionNotFound, StoreUnavailable, TooManySessions
from gruserve.sessions.events import IDLE, LIFETIME, SessionEvents
from gruserve.sessions.store import SessionPage, SessionRecord, SessionSummary

T = TypeVar("T")
SCAN_PER_PAGE_REDIS = 2_000
"""Most ids one listing page examines in Redis (one Lua call: it holds Redis that long)."""

_NOW_MS = (
    "local t = redis.call('TIME') "
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
)

# KEYS[1] index (ids by idle deadline), KEYS[2] lifetimes (ids by lifetime deadline),
# KEYS[3] ids (every id, score 0: listed by ZRANGEBYLEX). A swept session's hash has already
# expired (its PEXPIREAT is the earlier deadline); the DEL keeps that true whatever happened.
_FORGET = """
local function forget(ids, prefix)
    if #ids == 0 then return end
    redis.call('ZREM', KEYS[1], unpack(ids))
    redis.call('ZREM', KEYS[2], unpack(ids))
    redis.call('ZREM', KEYS[3], unpack(ids))
    local keys = {}
    for i, id in ipairs(ids) do keys[i] = prefix .. id end
    redis.call('DEL', unpack(keys))
end
local function sweep(now, prefix)
    local lifetime = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)
    forget(lifetime, prefix)
    local idle = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1000)
    forget(idle, prefix)
    return {idle, lifetime}
end
local function expire(key, id, now, ttl, deadline)
    local idle_at = now + ttl
    local expire_at = idle_at
    if deadline > 0 then
        redis.call('ZADD', KEYS[2], deadline, id)
        if deadline < expire_at then expire_at = deadline end
    end
    redis.call('PEXPIREAT', key, expire_at)
    redis.call('ZADD', KEYS[1], idle_at, id)
end
"""

# KEYS[4] the hash. ARGV: max_sessions, ttl_ms, id, lru (1/0), lifetime deadline_ms (0: none),
# hash key prefix, fields...
_CREATE = (
    _FORGET
    + _NOW_MS
    + """
local ended = sweep(now, ARGV[6])
if redis.call('EXISTS', KEYS[4]) == 1 then return {0, {}, ended[1], ended[2]} end
local evicted = {}
while redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) do
    if ARGV[4] ~= '1' then return {-2, {}, ended[1], ended[2]} end
    local victim = redis.call('ZRANGE', KEYS[1], 0, 0)
    forget(victim, ARGV[6])
    evicted[#evicted + 1] = victim[1]
end
redis.call('HSET', KEYS[4], unpack(ARGV, 7))
expire(KEYS[4], ARGV[3], now, tonumber(ARGV[2]), tonumber(ARGV[5]))
redis.call('ZADD', KEYS[3], 0, ARGV[3])
return {1, evicted, ended[1], ended[2]}
"""
)

# ARGV: expected revision, new revision, writer token, ttl_ms, id, deadline_ms, fields...
_CAS = (
    _FORGET
    + """
local cur = redis.call('HMGET', KEYS[4], 'revision', 'writer')
if not cur[1] then return -1 end
if cur[1] ~= ARGV[1] then
    if cur[1] == ARGV[2] and cur[2] == ARGV[3] then return 1 end
    return 0
end
redis.call('HSET', KEYS[4], unpack(ARGV, 7))
"""
    + _NOW_MS
    + """
expire(KEYS[4], ARGV[5], now, tonumber(ARGV[4]), tonumber(ARGV[6]))
return 1
"""
)

_DELETE = (
    _FORGET
    + """
local existed = redis.call('EXISTS', KEYS[4])
forget({ARGV[1]}, ARGV[2])
return existed
"""
)

_COUNT = (
    _FORGET
    + _NOW_MS
    + """
local ended = sweep(now, ARGV[1])
return {redis.call('ZCARD', KEYS[1]), ended[1], ended[2]}
"""
)

# ARGV: cursor ('' = from the start), limit, ids to examine at most, model ('' = any), prefix
_PAGE = (
    _FORGET
    + _NOW_MS
    + """
local ended = sweep(now, ARGV[5])
local low = '-'
if ARGV[1] ~= '' then low = '(' .. ARGV[1] end
local ids = redis.call('ZRANGEBYLEX', KEYS[3], low, '+', 'LIMIT', 0, tonumber(ARGV[3]))
local limit, found, last = tonumber(ARGV[2]), {}, ''
for _, id in ipairs(ids) do
    if #found >= limit then break end
    last = id
    local h = redis.call('HMGET', ARGV[5] .. id,
        'model', 'version', 'step', 'timesteps', 'created_at', 'last_used_at')
    if h[1] and (ARGV[4] == '' or h[1] == ARGV[4]) then
        found[#found + 1] = {id, h[1], h[2], h[3], h[4], h[5], h[6]}
    end
end
local more = ''
if last ~= '' and #redis.call('ZRANGEBYLEX', KEYS[3], '(' .. last, '+', 'LIMIT', 0, 1) > 0 then
    more = last
end
return {more, found, ended[1], ended[2]}
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
        "owner",
        record.owner,
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
        owner=h.get(b"owner", b"").decode(),
    )


class RedisSessionStore:
    """Sessions in Redis with idle and lifetime expiry, a limit, and atomic compare-and-set.

    Args:
        url: ``redis://host:port/db`` (``rediss://`` for TLS, ``unix://`` for a socket).
        ttl_s: idle time to live in seconds.
        max_sessions: most sessions across every replica sharing this Redis.
        prefix: key prefix, to share one database between deployments.
        timeout_s: connect and socket timeout; a call that takes longer (Redis down or
            hung) raises StoreUnavailable. One retry on a fresh connection (what a Redis
            restart needs) means up to two reads and two connects: about 4x this at worst
            when Redis hangs (measured 1-2 s at 0.5 s in tests/faults).
        max_lifetime_s: seconds from ``created_at`` after which a session expires (0: none).
        eviction: ``"reject"`` or ``"lru"`` (evict the least recently used session), atomic
            across replicas.
        events: told about expired and evicted sessions, or None.
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        ttl_s: float,
        max_sessions: int,
        prefix: str = "gruserve:",
        timeout_s: float = 2.0,
        *,
        max_lifetime_s: float = 0.0,
        eviction: Literal["reject", "lru"] = "reject",
        events: SessionEvents | None = None,
    ) -> None:
        if not ttl_s > 0:
            raise ValueError(f"RedisSessionStore needs ttl_s > 0. Received: ttl_s={ttl_s!r}")
        if eviction not in ("reject", "lru"):
            raise ValueError(
                f"RedisSessionStore eviction is 'reject' or 'lru'. Received: {eviction!r}"
            )
        self.url, self.max_sessions = url, max_sessions
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._lifetime_ms = round(max_lifetime_s * 1000)
        self._lru = "1" if eviction == "lru" else "0"
        self._events = events if events is not None else SessionEvents()
        self._prefix = f"{prefix}session:"
        self._keys = [f"{prefix}sessions", f"{prefix}lifetimes", f"{prefix}ids"]
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
        self._page = self._redis.register_script(_PAGE)

    def _key(self, session_id: str) -> str:
        return self._prefix + session_id

    def _deadline_ms(self, record: SessionRecord) -> int:
        """When ``record`` reaches its maximum lifetime, in Unix ms (0: no lifetime)."""
        return int(record.created_at * 1000) + self._lifetime_ms if self._lifetime_ms else 0

    async def _call(self, make: Callable[[], Awaitable[T]]) -> T:
        try:
            return await make()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"redis at {self._redis_location()}", exc) from exc

    def _redis_location(self) -> str:
        kwargs = self._redis.connection_pool.connection_kwargs
        return str(kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}")

    def _ended(self, idle: list[bytes], lifetime: list[bytes]) -> None:
        self._events.expired(LIFETIME, [i.decode() for i in lifetime])
        self._events.expired(IDLE, [i.decode() for i in idle])

    async def create(self, record: SessionRecord) -> None:
        keys = [*self._keys, self._key(record.session_id)]
        args = [
            self.max_sessions,
            self._ttl_ms,
            record.session_id,
            self._lru,
            self._deadline_ms(record),
            self._prefix,
            *_fields(record, b""),
        ]
        outcome, evicted, idle, lifetime = await self._call(
            lambda: self._create(keys=keys, args=args)
        )
        self._ended(idle, lifetime)
        self._events.evicted([i.decode() for i in evicted])
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
            self._deadline_ms(record),
            *_fields(record, writer),
        ]
        keys = [*self._keys, self._key(record.session_id)]
        outcome = await self._call(lambda: self._cas(keys=keys, args=args))
        if outcome == -1:
            raise SessionNotFound(record.session_id)
        return bool(outcome == 1)

    async def delete(self, session_id: str) -> None:
        keys = [*self._keys, self._key(session_id)]
        existed = await self._call(
            lambda: self._delete(keys=keys, args=[session_id, self._prefix])
        )
        if not existed:
            raise SessionNotFound(session_id)

    async def count(self) -> int:
        count, idle, lifetime = await self._call(
            lambda: self._count(keys=self._keys, args=[self._prefix])
        )
        self._ended(idle, lifetime)
        return int(count)

    async def page(self, cursor: str | None, limit: int, model: str | None) -> SessionPage:
        args = [cursor or "", limit, SCAN_PER_PAGE_REDIS, model or "", self._prefix]
        more, found, idle, lifetime = await self._call(
            lambda: self._page(keys=self._keys, args=args)
        )
        self._ended(idle, lifetime)
        sessions = [
            SessionSummary(
                session_id.decode(),
                model_name.decode(),
                int(version),
                int(step),
                int(timesteps),
                float(created_at),
                float(last_used_at),
            )
            for session_id, model_name, version, step, timesteps, created_at, last_used_at in found
        ]
        return SessionPage(sessions, more.decode() or None)

    async def ping(self) -> None:
        await self._call(self._redis.ping)

    async def close(self) -> None:
        await self._redis.aclose()
