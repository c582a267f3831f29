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

- compare-and-set, which also creates: a write with expected revision -1 creates its
  session if the id is free (a taken id loses, as a race does), and when the store looks
  full it sweeps expired ids first (reporting them), then refuses or evicts the least
  recently used sessions. Expired ids are otherwise swept in the background
  (:meth:`RedisSessionStore.sweep`), so a create does no work per expired session.
  Otherwise a write is made only if the stored ``revision`` is the one the writer read.
  Two replicas that read revision 7 both try to write revision 8; exactly one wins, the
  other re-reads and recomputes. Each write also stores a random
  ``writer`` token, so a write retried after a lost reply recognises itself
  instead of being reported as a conflict (which would apply the step twice).
  State, counters and the stored result are one ``HSET``: a session is never seen
  half written. A write may also end its session (remove hash and index entries instead
  of storing it): a step that starts or ends its session costs no extra round trip;
- delete: remove hashes and index entries, for every delete of one pass at once.

Reads and compare-and-sets travel per batch, not per step: the reads issued in one pass
of the event loop go out as one ``READ`` script call (the scripts are
:mod:`._scripts`), and so do the writes (one ``CAS`` call
deciding each session's write on its own, so a lost race fails only that session's).
The batcher wakes a batch's steps in one pass, so a batch of 64 steps costs two round
trips instead of 128 (:mod:`._coalesce`; figures in bench/README.md).
Each write travels as one packed argument (:mod:`._packing`),
which the script splits into the same hash fields, so redis-py packs two values per
session (its key and that argument) instead of sixteen. With ``packed`` records
(``GRUSERVE_STORE_PACKED_RECORDS``, the default from 0.2.0) the hash holds one binary
``record`` field beside ``revision`` and ``writer`` instead of the ten fields of servers
before it, which the script stores without splitting (:mod:`._record`, which also says
what it saves); every store reads both layouts. Index entries of one call's writes are added
with one ``ZADD`` per sorted set.
Creates travel with the writes (a creating compare-and-set) and deletes with each other
(one ``DELETE`` call per wave), so short-lived sessions are batched as steps are.

Kept records (``recent``, ``GRUSERVE_STORE_RECENT_RECORDS``): the store remembers the
records its successful writes stored, with each write's ``writer`` token
(:mod:`._recent`); :meth:`RedisSessionStore.recent` hands one out once,
and a compare-and-set with its token as ``base`` also requires the stored ``writer`` to be
that token, so a step can skip reading a record this server wrote last and still never
write over anybody else's write (not even a re-created session at the same revision).

Idle times come from Redis's own clock (``TIME``), so replicas with skewed clocks
agree; the lifetime counts from the record's ``created_at``, the creating replica's
clock.

On a Redis Cluster (``redis+cluster://``) the keys are split into hash-tagged buckets
(:mod:`._keyspace`): each script call touches one bucket, so a wave
of reads or writes becomes one call per bucket it touches, and a wave's calls go out as
one pipeline per master, the masters at once (:mod:`._master_pipelines`,
which also says what a redirection or a failed master does). With ``min_replicas`` set,
a write counts as done only once ``WAIT`` says that many replicas have it: the write
and its ``WAIT`` share one connection (one pipeline per master), and a shortfall
raises StoreUnavailable (503), so a failover never loses a step a client was told
about; the client's numbered resend then finds the step stored, or applies it anew.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, NamedTuple, TypeVar

import numpy as np
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import OutOfMemoryError, RedisError

from gruserve.errors import (
    SessionExists,
    SessionNotFound,
    StoreDenied,
    StoreFull,
    StoreUnavailable,
    TooManySessions,
)
from gruserve.sessions.events import IDLE, LIFETIME, SessionEvents
from gruserve.sessions.redis_store._client import (
    SCRIPT_DENIED,
    cannot_answer,
    connect,
    denied,
    is_cluster_url,
)
from gruserve.sessions.redis_store._coalesce import Coalescer
from gruserve.sessions.redis_store._keyspace import CLUSTER_BUCKETS, Bucket, Keyspace
from gruserve.sessions.redis_store._master_pipelines import Call, MasterPipelines
from gruserve.sessions.redis_store._packing import (
    history_value,
    packed_write,
)
from gruserve.sessions.redis_store._recent import RecentRecords
from gruserve.sessions.redis_store._record import (
    packed_record_write,
    unpack_record,
)
from gruserve.sessions.redis_store._scripts import (
    COUNT,
    DELETE,
    PAGE,
    PERMISSIONS,
    PROBE_ID,
    scripts,
)
from gruserve.sessions.store import (
    CREATE,
    Kept,
    SessionPage,
    SessionRecord,
    SessionSummary,
    Write,
)

T = TypeVar("T")
C = TypeVar("C")
R = TypeVar("R")
SCAN_PER_PAGE_REDIS = 2_000
"""Most ids one listing page examines in Redis (one Lua call: it holds Redis that long)."""


def _record(session_id: str, values: list[bytes | None]) -> SessionRecord | None:
    """The record of one session as ``READ`` answers it: the :data:`READ_FIELDS` values
    (then ``history``), or a packed record's ``[record, nil(, history)]``; None: missing."""
    if len(values) <= 3:  # a packed record (the packed layout's read script)
        record = unpack_record(session_id, values[0])  # type: ignore[arg-type]
        return _with_history(record, values[2] if len(values) > 2 else None)
    if values[0] is None:  # no fields: a packed record read by the fields layout's script
        packed = values[10]
        if packed is None:
            return None
        record = unpack_record(session_id, packed)
        return _with_history(record, values[11] if len(values) > 11 else None)
    model, version, state, step, timesteps, revision, created_at, last_used_at, result, owner = (
        values[:10]
    )
    history = values[11] if len(values) > 11 else None  # absent: history off, or older record
    if history and int.from_bytes(history[:8], "little") != int(revision):  # type: ignore[arg-type]
        history = None  # written before a time with history off: stale
    return SessionRecord(
        session_id=session_id,
        model=model.decode(),  # type: ignore[union-attr]
        version=int(version),  # type: ignore[arg-type]
        state=np.frombuffer(state, "<f4"),  # type: ignore[arg-type]
        step=int(step),  # type: ignore[arg-type]
        timesteps=int(timesteps),  # type: ignore[arg-type]
        revision=int(revision),  # type: ignore[arg-type]
        created_at=float(created_at),  # type: ignore[arg-type]
        last_used_at=float(last_used_at),  # type: ignore[arg-type]
        last_result=result or None,
        owner=(owner or b"").decode(),  # absent in records written before tenants
        history=history[8:] if history else None,
    )


def _with_history(record: SessionRecord, history: bytes | None) -> SessionRecord:
    """``record`` with the inputs ``history`` keeps, unless they are stale (written at
    another revision: by a write with history off since)."""
    if not history or int.from_bytes(history[:8], "little") != record.revision:
        return record
    return dataclasses.replace(record, history=history[8:])


def _summary(row: list[bytes]) -> SessionSummary:
    """A listing row of ``PAGE``: an id and the six listing fields, or an id and a packed
    record (no owner: the session service fills it in)."""
    if len(row) == 2:
        record = unpack_record(row[0].decode(), row[1])
        return dataclasses.replace(SessionSummary.of(record), owner="")
    session_id, model, version, step, timesteps, created_at, last_used_at = row
    return SessionSummary(
        session_id.decode(),
        model.decode(),
        int(version),
        int(step),
        int(timesteps),
        float(created_at),
        float(last_used_at),
    )


class _Write(NamedTuple):
    record: SessionRecord
    expected_revision: int
    end: bool = False
    base: str = ""  # the writer the hash must also hold (a write based on a kept record)


class RedisSessionStore:
    """Sessions in Redis with idle and lifetime expiry, a limit, and atomic compare-and-set.

    Args:
        url: ``redis://host:port/db`` (``rediss://`` for TLS, ``unix://`` for a socket), or
            ``redis+cluster://host:port[,host:port...]`` for a Redis Cluster.
        ttl_s: idle time to live in seconds.
        max_sessions: most sessions across every replica sharing this Redis (on a cluster,
            each of the key buckets holds ``ceil(max_sessions / buckets)``).
        prefix: key prefix, to share one database between deployments.
        timeout_s: connect and socket timeout; a call that takes longer (Redis down or
            hung) raises StoreUnavailable. One retry on a fresh connection (what a Redis
            restart needs) means up to two reads and two connects: about 4x this at worst
            when Redis hangs (measured 1-2 s at 0.5 s in tests/faults). On a cluster a
            master's pipeline without ``WAIT`` is not retried itself: its calls are sent
            again through the cluster client, which retries once (up to three reads).
        max_lifetime_s: seconds from ``created_at`` after which a session expires (0: none).
        eviction: ``"reject"`` or ``"lru"`` (evict the least recently used session), atomic
            across replicas.
        events: told about expired and evicted sessions, or None.
        batch_limit: most reads (or writes) sent in one script call; the reads and writes
            issued in one pass of the event loop travel together (:mod:`._coalesce`).
        min_replicas: a write (create, step, reset, delete) succeeds only once this many
            replicas of its master acknowledged it (Redis ``WAIT``); 0: no waiting.
        wait_ms: how long ``WAIT`` waits for them before the write raises StoreUnavailable.
        history: store each record's kept inputs (a ``history`` field); off, the hashes and
            scripts are those of a server without history.
        packed: write each record as one ``record`` field (:mod:`._record`) instead
            of ten (False: the layout of servers before 0.2.0, some of which cannot read
            packed records); reads take either layout.
        recent: most records this store keeps of its own last successful writes, so a
            step can skip reading them (:meth:`recent`, :mod:`._recent`); 0: none.
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
        batch_limit: int = 256,
        min_replicas: int = 0,
        wait_ms: int = 1000,
        history: bool = False,
        packed: bool = True,
        recent: int = 0,
    ) -> None:
        if not ttl_s > 0:
            raise ValueError(f"RedisSessionStore needs ttl_s > 0. Received: ttl_s={ttl_s!r}")
        if eviction not in ("reject", "lru"):
            raise ValueError(
                f"RedisSessionStore eviction is 'reject' or 'lru'. Received: {eviction!r}"
            )
        if min_replicas < 0 or wait_ms < 1:
            raise ValueError(
                "RedisSessionStore needs min_replicas >= 0 and wait_ms >= 1. "
                f"Received: min_replicas={min_replicas!r}, wait_ms={wait_ms!r}"
            )
        self.url, self.max_sessions = url, max_sessions
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._lifetime_ms = round(max_lifetime_s * 1000)
        self._lru = "1" if eviction == "lru" else "0"
        self._events = events if events is not None else SessionEvents()
        self._cluster = is_cluster_url(url)
        self._keyspace = Keyspace(prefix, CLUSTER_BUCKETS if self._cluster else 1)
        self._redis = connect(url, timeout_s)
        # a wave's script calls: one pipeline per master (on one Redis, one call as it is)
        self._masters = MasterPipelines(
            self._redis,
            url,
            self._redis_location(),
            timeout_s,
            min_replicas,
            wait_ms,
            self._unavailable,
        )
        self._history = history  # keep each session's ``history`` (GRUSERVE_SESSION_HISTORY)
        self._packed = packed
        self._recent = RecentRecords(recent, history)
        cas, read = scripts(history, packed)
        self._cas = self._redis.register_script(cas)
        self._read = self._redis.register_script(read)
        self._batch_limit = batch_limit
        self._reads: Coalescer[str, SessionRecord] = Coalescer(self._read_many, batch_limit)
        self._writes: Coalescer[_Write, bool] = Coalescer(self._write_many, batch_limit)
        self._delete = self._redis.register_script(DELETE)
        self._deletes: Coalescer[str, None] = Coalescer(self._delete_many, batch_limit)
        self._count = self._redis.register_script(COUNT)
        self._page = self._redis.register_script(PAGE)
        self._permissions = self._redis.register_script(PERMISSIONS)
        self._waits = "1" if min_replicas > 0 else "0"  # the permission check asks for WAIT

    def _key(self, session_id: str) -> str:
        return self._keyspace.bucket(session_id).session_key(session_id)

    def _deadline_ms(self, record: SessionRecord) -> int:
        """When ``record`` reaches its maximum lifetime, in Unix ms (0: no lifetime)."""
        return int(record.created_at * 1000) + self._lifetime_ms if self._lifetime_ms else 0

    async def _call(self, make: Callable[[], Awaitable[T]]) -> T:
        try:
            return await make()
        except Exception as exc:
            if not cannot_answer(exc):
                raise
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        # not which script and line: nobody acts on it
        said = re.split(r"\.? script: ", str(exc), maxsplit=1)[0]
        if isinstance(exc, OutOfMemoryError):
            return StoreFull(f"redis at {self._redis_location()}", f"OOM {said}")
        if denied(exc):
            if SCRIPT_DENIED in said:  # Redis does not say which command: the check does
                said += "; /readyz and the start-up log name what it denies"
            return StoreDenied(f"redis at {self._redis_location()}", said)
        return StoreUnavailable(f"redis at {self._redis_location()}", said or type(exc).__name__)

    def _redis_location(self) -> str:
        if isinstance(self._redis, RedisCluster):
            nodes = self.url.partition("://")[2].rpartition("@")[2].split(",")
            more = f" and {len(nodes) - 1} more nodes" if len(nodes) > 1 else ""
            return f"cluster {nodes[0]}{more}"
        kwargs = self._redis.connection_pool.connection_kwargs
        return str(kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}")

    def _ended(self, idle: list[bytes], lifetime: list[bytes]) -> None:
        self._events.expired(LIFETIME, [i.decode() for i in lifetime])
        self._events.expired(IDLE, [i.decode() for i in idle])

    async def create(self, record: SessionRecord) -> None:
        # a creating write, batched with the other writes of its pass of the event loop
        if not await self._writes(_Write(record, CREATE)):
            raise SessionExists(record.session_id)

    async def get(self, session_id: str) -> SessionRecord:
        return await self._reads(session_id)

    async def compare_and_set(
        self, record: SessionRecord, expected_revision: int, end: bool = False, base: str = ""
    ) -> bool:
        return await self._writes(_Write(record, expected_revision, end, base))

    def recent(self, session_id: str) -> Kept | None:
        return self._recent.take(session_id)

    async def get_many(self, session_ids: Sequence[str]) -> list[SessionRecord | Exception]:
        """One ``READ`` call per ``batch_limit`` ids (a bulk step's reads, sent as they are
        rather than through the per-pass coalescer)."""
        return await self._chunked(self._read_many, session_ids)

    async def compare_and_set_many(self, writes: Sequence[Write]) -> list[bool | Exception]:
        """One ``CAS`` call per ``batch_limit`` writes, each write decided on its own (one
        with a ``base`` also on the stored writer token, as :meth:`compare_and_set`)."""
        return await self._chunked(
            self._write_many,
            [_Write(record, expected, False, *base) for record, expected, *base in writes],
        )

    async def _chunked(
        self, send: Callable[[Sequence[C]], Awaitable[list[R]]], calls: Sequence[C]
    ) -> list[R]:
        limit = self._batch_limit
        if len(calls) <= limit:
            return await send(calls)
        parts = await asyncio.gather(
            *(send(calls[i : i + limit]) for i in range(0, len(calls), limit))
        )
        return [result for part in parts for result in part]

    async def _read_many(self, session_ids: Sequence[str]) -> list[SessionRecord | Exception]:
        """One ``READ`` call per bucket for the reads of one wave (one call on one Redis)."""
        groups = self._keyspace.group_by(session_ids, lambda session_id: session_id)
        calls = [
            Call(self._read, [bucket.session_key(session_ids[i]) for i in positions], [])
            for bucket, positions in groups.items()
        ]
        answers = await self._call(lambda: self._masters.run(calls))
        results: list[SessionRecord | Exception] = [SessionNotFound("")] * len(session_ids)
        for positions, found in zip(groups.values(), answers, strict=True):
            for n, i in enumerate(positions):
                if isinstance(found, StoreUnavailable):
                    results[i] = found
                    continue
                record = _record(session_ids[i], found[n])
                results[i] = SessionNotFound(session_ids[i]) if record is None else record
        return results

    async def _write_many(self, writes: Sequence[_Write]) -> list[bool | Exception]:
        """One ``CAS`` call per bucket for the compare-and-sets of one wave (every write
        decided on its own: a lost race fails only that session's)."""
        groups = self._keyspace.group_by(writes, lambda write: write.record.session_id)
        share = self._keyspace.share(self.max_sessions)
        writer = os.urandom(8).hex()  # the script makes it one token per write
        calls = []
        for bucket, positions in groups.items():
            keys = list(bucket.sets)
            args: list[Any] = [self._ttl_ms, share, self._lru, bucket.prefix, writer]
            for i in positions:
                record, expected, end, base = writes[i]
                keys.append(bucket.session_key(record.session_id))
                deadline = self._deadline_ms(record)
                if self._packed:
                    kept = history_value(record) if self._history else None
                    args.append(packed_record_write(record, expected, deadline, end, kept, base))
                else:
                    args.append(packed_write(record, expected, deadline, end, self._history, base))
            calls.append(Call(self._cas, keys, args))

        recent = self._recent
        try:
            answers = await self._call(lambda: self._masters.run(calls, wait=True))
        except BaseException:
            for write in writes:  # written or not: nobody knows, so keep nothing
                recent.drop(write.record.session_id)
            raise
        results: list[bool | Exception] = [False] * len(writes)
        for (bucket, positions), found in zip(groups.items(), answers, strict=True):
            if isinstance(found, StoreUnavailable):
                for i in positions:
                    results[i] = found
                    recent.drop(writes[i].record.session_id)
                continue
            outcomes, evicted, idle, lifetime = found
            if evicted or idle or lifetime:
                self._ended(idle, lifetime)
                self._events.evicted([i.decode() for i in evicted])
            for n, i in enumerate(positions):
                write = writes[i]
                results[i] = self._outcome(write, outcomes[n])
                if outcomes[n] == 1 and not write.end:
                    # the token the script stored: its 1-based KEYS position after the sets
                    token = f"{writer}:{len(bucket.sets) + n + 1}"
                    recent.keep(write.record, token, write.expected_revision)
                else:
                    recent.drop(write.record.session_id)
                    if outcomes[n] == 0 and write.base:  # its kept record was stale
                        recent.stray(write.record.session_id)
        return results

    def _outcome(self, write: _Write, outcome: int) -> bool | Exception:
        if outcome == -1:
            return SessionNotFound(write.record.session_id)
        if outcome == -2:
            return TooManySessions(self.max_sessions)
        return outcome == 1

    async def delete(self, session_id: str) -> None:
        await self._deletes(session_id)

    async def _delete_many(self, session_ids: Sequence[str]) -> list[Exception | None]:
        """One ``DELETE`` call per bucket for the deletes of one wave."""
        groups = self._keyspace.group_by(session_ids, lambda session_id: session_id)
        calls = []
        for bucket, positions in groups.items():
            ids = [session_ids[i] for i in positions]
            keys = [*bucket.sets, *(bucket.session_key(session_id) for session_id in ids)]
            calls.append(Call(self._delete, keys, [bucket.prefix, *ids]))
        for session_id in session_ids:  # gone, or going: nothing to step from
            self._recent.drop(session_id)
        answers = await self._call(lambda: self._masters.run(calls, wait=True))
        results: list[Exception | None] = [None] * len(session_ids)
        for positions, existed in zip(groups.values(), answers, strict=True):
            for n, i in enumerate(positions):
                if isinstance(existed, StoreUnavailable):
                    results[i] = existed
                elif not existed[n]:
                    results[i] = SessionNotFound(session_ids[i])
        return results

    async def sweep(self) -> int:
        return await self.count()  # the count script sweeps (up to 1000 ids of each kind)

    async def count(self) -> int:
        answers = await self._call(
            lambda: asyncio.gather(
                *(
                    self._count(keys=list(bucket.sets), args=[bucket.prefix])
                    for bucket in self._keyspace.buckets
                )
            )
        )
        for _, idle, lifetime in answers:
            self._ended(idle, lifetime)
        return sum(int(count) for count, _, _ in answers)

    async def page(self, cursor: str | None, limit: int, model: str | None) -> SessionPage:
        """One page per bucket, merged in id order. A bucket that stopped early (``more``)
        bounds the page: ids past the smallest such stop are left to the next page (that
        bucket has not examined them yet), so pages stay in id order and stable."""
        answers = await self._call(
            lambda: asyncio.gather(
                *(
                    self._page(
                        keys=list(bucket.sets),
                        args=[cursor or "", limit, SCAN_PER_PAGE_REDIS, model or "", bucket.prefix],
                    )
                    for bucket in self._keyspace.buckets
                )
            )
        )
        found, stops = [], []
        for more, rows, idle, lifetime in answers:
            self._ended(idle, lifetime)
            found += rows
            if more:
                stops.append(more)
        stop = min(stops) if stops else None
        rows = sorted(row for row in found if stop is None or row[0] <= stop)
        if len(rows) > limit:
            rows, stop = rows[:limit], rows[limit - 1][0]
        sessions = [_summary(row) for row in rows]
        return SessionPage(sessions, stop.decode() if stop else None)

    async def ping(self) -> None:
        """Redis answers, and (on one Redis) lets gruserve's user run what the store runs.

        Redis checks a user's ACL command by command, so a user denied a command that a
        script calls half-way would have that script stop with its first writes kept: the
        permission check (:data:`PERMISSIONS`, which writes nothing) is the ping, and
        ``/readyz`` fails while it finds a denial. A cluster's ping stays Redis's ``PING``
        (one master failing over must not make every replica unready); :meth:`cautions`
        asks each of its masters at start-up.

        Raises:
            StoreDenied: a wrong password, or an ACL denying a command or key.
            StoreUnavailable: Redis does not answer.
        """
        if isinstance(self._redis, RedisCluster):
            await self._call(self._redis.ping)
            return
        check = self._permission_check(self._keyspace.buckets[0])
        found = await self._call(lambda: check.script(keys=check.keys, args=check.args))
        if found:
            raise self._acl_denies(found)

    def _permission_check(self, bucket: Bucket) -> Call:
        """:data:`PERMISSIONS` asked on ``bucket``'s keys."""
        return Call(self._permissions, [*bucket.sets, bucket.session_key(PROBE_ID)], [self._waits])

    def _acl_denies(self, found: Sequence[bytes], where: str | None = None) -> StoreDenied:
        """What :data:`PERMISSIONS` found denied, as the error naming it (a cluster's bucket
        tags folded: the same denial on each bucket of a master is said once)."""
        calls = sorted({re.sub(r"\{\d+\}", "{*}", c.decode(errors="replace")) for c in found})
        where = where or f"redis at {self._redis_location()}"
        return StoreDenied(where, f"its ACL denies {', '.join(calls)}")

    async def _denials(self) -> list[str]:
        """What a cluster's masters refuse gruserve's user, asked of every bucket: one text
        per master or per different refusal; none where all is allowed or nothing answers
        (an unreachable Redis is the ping's to report). One Redis: none, since its ping asks
        the same and a refused user's start-up stops at the ping."""
        if not isinstance(self._redis, RedisCluster):
            return []
        buckets = self._keyspace.buckets
        calls = [self._permission_check(b) for b in buckets]
        try:
            answers = await self._call(lambda: self._masters.run(calls))
        except StoreUnavailable as exc:
            answers = [exc] * len(buckets)
        texts = {str(answer) for answer in answers if isinstance(answer, StoreDenied)}
        found: dict[str, list[bytes]] = {}
        for bucket, answer in zip(buckets, answers, strict=True):
            if isinstance(answer, list) and answer:
                found.setdefault(self._master_of(bucket), []).extend(answer)
        texts.update(str(self._acl_denies(said, where)) for where, said in found.items())
        return sorted(texts)

    def _master_of(self, bucket: Bucket) -> str:
        """Where ``bucket``'s keys are, for a message: on a cluster, its master's address."""
        if isinstance(self._redis, RedisCluster):
            node = self._redis.get_node_from_key(bucket.sets[0])
            if node is not None:
                return f"redis at {node.name} (a master of {self._redis_location()})"
        return f"redis at {self._redis_location()}"

    async def cautions(self) -> list[str]:
        """A caution for each master of a cluster that refuses gruserve's user a command or
        key (one Redis: its :meth:`ping` says so), and for each Redis (every master of a
        cluster) that evicts keys when full.

        Under an evicting ``maxmemory-policy`` (any but ``noeviction``) a full Redis drops
        keys on its own: sessions' records (they carry a TTL, so the ``volatile-*``
        policies take them first) and, with ``allkeys-*``, the indexes that count and
        list them. Their steps then answer 404 as if the sessions had expired. With
        ``noeviction`` a full Redis refuses the write instead (:class:`StoreFull`, a 503),
        and nothing is lost. Where ``CONFIG`` is not allowed (managed services often rename
        it) nothing can be said, and nothing is.
        """
        return [*await self._denials(), *await self._evictions()]

    async def _evictions(self) -> list[str]:
        configs: list[Any]
        try:
            if isinstance(self._redis, RedisCluster):
                per_node: dict[Any, Any] = await self._redis.config_get(
                    "maxmemory*", target_nodes=RedisCluster.PRIMARIES
                )
                configs = list(per_node.values())  # one answer per master
            else:
                configs = [await self._redis.config_get("maxmemory*")]
        except (RedisError, OSError):  # no answer, or CONFIG renamed or refused
            return []
        policies = {
            str(config.get("maxmemory-policy"))
            for config in configs
            if isinstance(config, dict) and config.get("maxmemory", "0") != "0"
        } - {"noeviction"}
        return [
            f"redis at {self._redis_location()} evicts keys when it reaches its maxmemory "
            f"(maxmemory-policy {policy}): it would drop sessions without a word (their steps "
            "then answer 404 as if expired); set maxmemory-policy noeviction, so that a full "
            "Redis refuses writes instead (503 StoreFull, nothing lost), and bound the "
            "sessions with GRUSERVE_MAX_SESSIONS"
            for policy in sorted(policies)
        ]

    async def close(self) -> None:
        await self._reads.close()
        await self._writes.close()
        await self._deletes.close()
        await self._redis.aclose()
        await self._masters.aclose()
