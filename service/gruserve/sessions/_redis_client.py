"""The Redis client a store URL names: one server, or a Redis Cluster.

``redis://``, ``rediss://`` and ``unix://`` name one server (redis-py's own URL
forms). ``redis+cluster://[user:password@]host:port[,host:port...][/]`` names a
cluster by some of its nodes (``rediss+cluster://`` for TLS): the client asks them
for the slot map and follows it (``MOVED``, failovers) by itself.

Also here: which redis-py errors mean "the store cannot answer now" (a 503 and a
retry, never a 500), for one server and for a cluster in the middle of a failover.

>>> parse_cluster_url("redis+cluster://10.0.0.1:7000,10.0.0.2:7001")
ClusterUrl(nodes=[('10.0.0.1', 7000), ('10.0.0.2', 7001)], username=None, password=None, tls=False)
"""

from __future__ import annotations

from typing import Any, NamedTuple
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    MasterDownError,
    MaxConnectionsError,
    ReadOnlyError,
    RedisClusterException,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
SINGLE_SCHEMES = ("redis://", "rediss://", "unix://")

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
)
"""Errors that mean the store cannot answer now (the caller gets 503 and retries)."""


class ClusterUrl(NamedTuple):
    nodes: list[tuple[str, int]]
    username: str | None
    password: str | None
    tls: bool


def is_cluster_url(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEMES)


def parse_cluster_url(url: str) -> ClusterUrl:
    """The nodes and credentials of a ``redis+cluster://`` URL.

    Raises:
        ValueError: not a cluster URL, no node, a node without a numeric port, or
            query options (none are supported).
    """
    scheme, _, rest = url.partition("://")
    if scheme not in ("redis+cluster", "rediss+cluster"):
        raise ValueError(f"expected a redis+cluster:// URL. Received: {url!r}")
    rest, _, query = rest.partition("?")
    if query:
        raise ValueError(f"a redis+cluster:// URL takes no options. Received: ?{query}")
    rest = rest.rstrip("/")
    userinfo, _, hosts = rest.rpartition("@")
    username = password = None
    if userinfo:
        user, sep, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if sep else None
    nodes = []
    for node in hosts.split(","):
        host, sep, port = node.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"each cluster node is host:port (comma separated). Received: {node!r}"
            )
        nodes.append((host.strip("[]"), int(port)))
    return ClusterUrl(nodes, username, password, scheme == "rediss+cluster")


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
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],
        username=parsed.username,
        password=parsed.password,
        ssl=parsed.tls,
        **options,
    )


def node_client(url: str, node: ClusterNode, timeout_s: float) -> aioredis.Redis:
    """A plain client of one node of the cluster ``url`` names, for a pipeline that must
    share one connection (a write and the ``WAIT`` that counts the replicas it reached)."""
    parsed = parse_cluster_url(url)
    return aioredis.Redis(
        host=node.host,
        port=node.port,
        username=parsed.username,
        password=parsed.password,
        ssl=parsed.tls,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
    )
