"""Session store URLs: which say one Redis, which a Redis Cluster (no redis import here:
the settings check URLs with it).

``redis://``, ``rediss://`` and ``unix://`` name one server (redis-py's own URL
forms). ``redis+cluster://[user:password@]host:port[,host:port...][/]`` names a
cluster by some of its nodes (``rediss+cluster://`` for TLS).

>>> parse_cluster_url("redis+cluster://10.0.0.1:7000,10.0.0.2:7001")
ClusterUrl(nodes=[('10.0.0.1', 7000), ('10.0.0.2', 7001)], username=None, password=None, tls=False)
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import unquote

CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
SINGLE_SCHEMES = ("redis://", "rediss://", "unix://")


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
