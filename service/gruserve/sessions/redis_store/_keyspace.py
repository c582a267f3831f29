"""Where a session's Redis keys live: one bucket on a single Redis, several on a cluster.

A Lua script may only touch keys of one hash slot on a Redis Cluster, and every
store script touches a session's hash together with the sorted sets that index it
(idle deadlines, lifetimes, ids). So the keys are split into buckets, each sharing
a hash tag: ``<prefix>{<b>}:session:<id>`` and ``<prefix>{<b>}:sessions`` (and
``lifetimes``, ``ids``) all hash to the slot of ``<b>``. A session's bucket is
``crc32(id) % buckets``: every replica finds it without asking Redis. The id here is
the store key (``~acme~station-7`` for a named tenant's, see
:mod:`gruserve.sessions.owner`): ``~`` needs no escaping and no key holds ``{``, so the
bucket's tag is the only one.

On a single Redis there is one bucket without a tag, which is exactly the layout
stores wrote before clusters were supported (nothing to migrate).

What the split costs: the index is per bucket, so the ``max_sessions`` limit and
LRU eviction hold per bucket (each gets ``ceil(max_sessions / buckets)``), a count
adds up one call per bucket, and a listing merges one page per bucket.

>>> Keyspace("gruserve:").bucket("abc").session_key("abc")
'gruserve:session:abc'
>>> Keyspace("gruserve:", buckets=16).bucket("abc").session_key("abc")
'gruserve:{2}:session:abc'
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

CLUSTER_BUCKETS = 16
"""Buckets on a Redis Cluster: the slots of ``{0}``..``{15}`` fall on every master of a
3-master cluster (6, 6 and 4 of them with the default slot ranges)."""


@dataclass(frozen=True, slots=True)
class Bucket:
    """The keys one script call may touch together.

    Attributes:
        index: the bucket's number (0 on a single Redis).
        prefix: a session hash's key is ``prefix + session_id``.
        sets: the idle-deadline, lifetime and id sorted sets (``KEYS[1..3]`` of the scripts).
    """

    index: int
    prefix: str
    sets: tuple[str, str, str]

    def session_key(self, session_id: str) -> str:
        return self.prefix + session_id


class Keyspace:
    """The buckets of a store's keys.

    Args:
        prefix: the key prefix (``gruserve:``), to share a database between deployments.
        buckets: 1 for a single Redis (untagged keys); more for a Redis Cluster.

    Raises:
        ValueError: ``buckets`` < 1.
    """

    def __init__(self, prefix: str, buckets: int = 1) -> None:
        if buckets < 1:
            raise ValueError(f"Keyspace needs buckets >= 1. Received: buckets={buckets!r}")
        tags = [""] if buckets == 1 else [f"{{{b}}}:" for b in range(buckets)]
        self.buckets = [
            Bucket(
                b,
                f"{prefix}{tag}session:",
                (f"{prefix}{tag}sessions", f"{prefix}{tag}lifetimes", f"{prefix}{tag}ids"),
            )
            for b, tag in enumerate(tags)
        ]

    def bucket(self, session_id: str) -> Bucket:
        if len(self.buckets) == 1:
            return self.buckets[0]
        return self.buckets[zlib.crc32(session_id.encode()) % len(self.buckets)]

    def share(self, max_sessions: int) -> int:
        """Each bucket's part of ``max_sessions`` (rounded up: the buckets hold at least it)."""
        return math.ceil(max_sessions / len(self.buckets))

    def group_by(
        self, items: Iterable[T], session_id_of: Callable[[T], str]
    ) -> dict[Bucket, list[int]]:
        """The positions of ``items`` by the bucket of ``session_id_of(item)``, in order."""
        groups: dict[Bucket, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(self.bucket(session_id_of(item)), []).append(i)
        return groups
