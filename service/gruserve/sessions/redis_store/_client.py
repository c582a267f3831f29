"""The Redis client a store URL names (:mod:`gruserve.sessions.store_url`): one server, or a
Redis Cluster.

A cluster client asks the nodes the URL names for the slot map and follows it
(``MOVED``, failovers) by itself, and starts while one of the masters is down
(:class:`_Cluster`). Also here: which redis-py errors mean "the store
cannot answer now" (a 503 and a retry, never a 500), for one server, for a
cluster in the middle of a failover, and for a Redis that is full or refuses writes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    AuthenticationError,
    ClusterDownError,
    ClusterError,
    MasterDownError,
    MaxConnectionsError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gruserve.sessions.store_url import is_cluster_url, parse_cluster_url

UNAVAILABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    # a cluster while a master fails over: no master for a slot yet, slots moving,
    # a demoted master refusing writes, every connection to a node busy
    ClusterError,
    ClusterDownError,
    RedisClusterException,
    TryAgainError,
    AskError,  # and MovedError, its subclass: a MOVED storm outlasting the client's retries
    MasterDownError,
    ReadOnlyError,
    MaxConnectionsError,
    # Redis at its maxmemory with the noeviction policy: it refuses a script's first write,
    # so nothing of the call was stored (the store answers StoreFull, a kind of 503)
    OutOfMemoryError,
    # an ACL that denies gruserve's user a command or key, as a failed script load or WAIT
    # on one master meets it too (a wrong password is an AuthenticationError, a
    # ConnectionError): StoreDenied, a 503 until the user is fixed (see denied)
    NoPermissionError,
)
"""Errors that mean the store cannot answer now (the caller gets 503 and retries)."""

REFUSING = frozenset({"MISCONF", "NOREPLICAS", "BUSY"})
"""Codes of Redis errors that redis-py has no class for, from a Redis that answers but takes
no writes (or no call) now: its snapshots or append-only file fail to reach the disk
(``MISCONF``, with ``stop-writes-on-bgsave-error``), fewer replicas than its
``min-replicas-to-write`` are connected (``NOREPLICAS``), or another script outruns
``busy-reply-threshold`` (``BUSY``). Redis checks the first two at a script's first write
and the third before it runs anything, so nothing of the refused call was stored."""


SCRIPT_DENIED = "The user executing the script can't"
"""How Redis 7.0 words an ACL denial met inside a script (a command, or a key the script
did not declare): a plain ``ERR``, not ``NOPERM``, so redis-py raises a bare
``ResponseError``. The script stops there and keeps what it wrote before, which is why the
store checks its user's permissions before it serves (``RedisSessionStore.ping``)."""


def cannot_answer(exc: BaseException) -> bool:
    """Whether ``exc`` means the store cannot answer now (503 and a retry), not a bug: one
    of :data:`UNAVAILABLE`, a Redis error with a code in :data:`REFUSING` (found at the
    head of its message: redis-py keeps the code there for the errors it has no class for),
    or a denial of gruserve's user (:func:`denied`: StoreDenied, a 503 until the user is
    fixed)."""
    if isinstance(exc, UNAVAILABLE) or denied(exc):
        return True
    return isinstance(exc, ResponseError) and str(exc).split(" ", 1)[0] in REFUSING


def denied(exc: BaseException) -> bool:
    """Whether Redis refused gruserve's user: a wrong name or password (``WRONGPASS``,
    ``NOAUTH``), or an ACL denying a command or key, at the call or inside a script."""
    if isinstance(exc, (AuthenticationError, NoPermissionError)):
        return True
    return isinstance(exc, ResponseError) and SCRIPT_DENIED in str(exc)


class _Cluster(RedisCluster):
    """redis-py's cluster client, able to start while a master is down.

    redis-py's first ``initialize`` reads the slot map from whichever startup node answers,
    but then fetches the command table (``COMMAND``) from one node only: the first master
    of the map, the one serving slot 0. While that master is dead (its failover takes
    ``cluster-node-timeout`` and more), the first initialize fails, and with it every call,
    the sessions on the healthy masters included: a replica started during a failover
    (restarted by the same outage, or scaled up) would serve nothing until it ended.
    Here the table is fetched first from the first startup node that answers; redis-py
    then fetches it no more (it keeps one table per client), and the first initialize
    needs only the slot map. Calls to the dead master's slots fail (503) until its
    replica takes over, as they would on a client started before.
    """

    _table_lock: asyncio.Lock | None = None

    async def initialize(self, *args: Any, **kwargs: Any) -> RedisCluster:
        if not self.commands_parser.commands:
            await self._command_table()
        return await super().initialize(*args, **kwargs)

    async def _command_table(self) -> None:
        """Fetch the command table from the first startup node that answers (none: leave it
        to ``initialize``, which then raises as it would have)."""
        if self._table_lock is None:
            self._table_lock = asyncio.Lock()
        async with self._table_lock:
            for seed in self.startup_nodes:
                if self.commands_parser.commands:
                    return
                node = ClusterNode(seed.host, seed.port, **self.connection_kwargs)
                try:
                    await self.commands_parser.initialize(node)
                except UNAVAILABLE:
                    continue
                finally:
                    await node.disconnect()


def connect(url: str, timeout_s: float) -> aioredis.Redis | RedisCluster:
    """A client for ``url`` (not connected yet: a cluster client connects on first use)."""
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
    }
    if not is_cluster_url(url):
        return aioredis.Redis.from_url(
            url, retry=Retry(NoBackoff(), 1), health_check_interval=30, **options
        )
    parsed = parse_cluster_url(url)
    return _Cluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],
        # one quick retry (a refreshed slot map), then 503: a failover takes seconds, and the
        # client's numbered resend is the retry that may wait that long
        retry=Retry(NoBackoff(), 1),
        username=parsed.username,
        password=parsed.password,
        ssl=parsed.tls,
        **options,
    )


def node_client(url: str, node: ClusterNode, timeout_s: float, retries: int = 1) -> aioredis.Redis:
    """A plain client of one node of the cluster ``url`` names, for the pipelines of its
    buckets' calls (:mod:`._master_pipelines`); ``retries``: sends again on a fresh
    connection after a connection error or timeout."""
    parsed = parse_cluster_url(url)
    return aioredis.Redis(
        host=node.host,
        port=int(node.port),
        username=parsed.username,
        password=parsed.password,
        ssl=parsed.tls,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), retries),
    )
