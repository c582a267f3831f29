"""The tests' view of bench/redis_topology.py: the same real Redis topologies, skipping
the test (rather than failing it) where ``redis-server`` or ``redis-cli`` is missing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from bench import redis_topology
from bench.redis_topology import LocalCluster, MissingRedis, Node, wait_for

__all__ = ["local_cluster", "replicated_redis", "wait_for"]

T = TypeVar("T")


@contextlib.contextmanager
def _skipping(manager: contextlib.AbstractContextManager[T]) -> Iterator[T]:
    """``manager``'s value; a missing Redis binary skips the test."""
    with contextlib.ExitStack() as stack:
        try:
            value = stack.enter_context(manager)
        except MissingRedis as exc:
            pytest.skip(str(exc))
        yield value


def local_cluster(
    workdir: Path, node_timeout_ms: int = 1000
) -> contextlib.AbstractContextManager[LocalCluster]:
    """A Redis Cluster of 3 masters and 3 replicas (:class:`bench.redis_topology.LocalCluster`)."""
    return _skipping(redis_topology.local_cluster(workdir, node_timeout_ms))


def replicated_redis(workdir: Path) -> contextlib.AbstractContextManager[tuple[Node, Node]]:
    """A master and one replica of it, the replica in sync."""
    return _skipping(redis_topology.replicated_redis(workdir))
