"""A wave's script calls sent as one pipeline per Redis master, not one call per bucket.

On a Redis Cluster a wave of reads, compare-and-sets or deletes is one script call per
key bucket it touches (:mod:`._keyspace`): up to 16 calls, on a cluster of a few
masters. Sent through redis-py's ``RedisCluster`` one by one, each call was its own
task, slot routing, connection, send and reply (bench/README.md, "On a Redis Cluster").
Here a wave's calls are grouped by the master the cluster client's slot map names for
each bucket, and each master's calls go down one pipeline on a connection of that
master's own client (``EVALSHA`` each, then ``WAIT`` when writes must reach replicas),
the masters at once: one round trip per master.

What an error means stays what it meant for one call:

- A master that cannot be reached or does not answer, or that answers a call with a
  redirection or a busy slot (``MOVED``, ``ASK``, ``TRYAGAIN``, ``CLUSTERDOWN``): those
  calls are sent again one by one through the cluster client, exactly as before
  pipelines (it follows the redirection, asks for a fresh slot map, retries once), so a
  failover ends in the right answer or in StoreUnavailable for those calls only, never
  for the other masters' calls; and the cluster client's refreshed map routes the next
  wave.
- ``NOSCRIPT`` (a node that restarted, or never ran the script): the scripts are loaded
  on that node and the calls it refused are sent again (they did not run).
- With ``WAIT``: the writes and their ``WAIT`` must share one connection, so nothing is
  redirected: a call answered with one of the errors above is StoreUnavailable (the client
  resends), and a master that cannot be reached, or whose ``WAIT`` counted too few
  replicas, fails all its calls. The calls it ran beside a redirected one stand: its
  ``WAIT`` counted them.

Why not redis-py's ``ClusterPipeline``: a node whose part of the pipeline cannot be sent
makes ``execute`` raise for the whole pipeline (``PipelineStrategy._execute`` raises the
first node error once every node settled), so one failed master would fail the calls of
every master; it runs ``EVALSHA`` without loading the script (``NOSCRIPT`` comes back as
an error); and its retry routes a keyless ``WAIT`` by the command's own policy (a single
named target node is not kept for the retry), not to the connection of the writes it
must count.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from gruserve.errors import StoreUnavailable
from gruserve.sessions.redis_store._client import UNAVAILABLE, cannot_answer, node_client


class Call(NamedTuple):
    """One script call on one bucket's keys."""

    script: AsyncScript
    keys: list[str]
    args: list[Any]


_UNANSWERED = object()
"""A call whose master's pipeline failed as a whole: it may or may not have run."""


class MasterPipelines:
    """Sends a wave's script calls, one pipeline per master.

    Args:
        client: the store's client: a single Redis, or the cluster client whose slot map
            says which master holds each call's keys.
        url: the store URL (a cluster's nodes get clients with its credentials and TLS).
        location: where a single Redis is, as errors name it (the store's own wording).
        timeout_s: connect and socket timeout of the masters' clients.
        min_replicas: with ``wait``, replicas a master's ``WAIT`` must count (0: no ``WAIT``).
        wait_ms: how long ``WAIT`` waits for them.
        unavailable: the StoreUnavailable a redis-py error becomes.
    """

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        url: str,
        location: str,
        timeout_s: float,
        min_replicas: int,
        wait_ms: int,
        unavailable: Callable[[BaseException], StoreUnavailable],
    ) -> None:
        self._client, self._url, self._timeout_s = client, url, timeout_s
        self._location = location
        self._min_replicas, self._wait_ms = min_replicas, wait_ms
        self._unavailable = unavailable
        # each master's clients by (name, waits): a waiting pipeline retries once on a
        # fresh connection, as the store's own client does; one that does not wait
        # retries through the cluster client instead (one retry in all, not two)
        self._masters: dict[tuple[str, bool], aioredis.Redis] = {}

    async def run(self, calls: Sequence[Call], wait: bool = False) -> list[Any]:
        """Every call's reply, or StoreUnavailable for a call whose Redis cannot answer now
        (on a cluster, a master failing over fails only the calls on its buckets).
        ``wait``: the calls write, and ``min_replicas`` replicas must have them.

        Raises:
            RedisError: a call's script failed (a bug, not the store's state).
        """
        wait = wait and self._min_replicas > 0
        if not isinstance(self._client, RedisCluster) and not wait:
            return await self._each([c.script(keys=c.keys, args=c.args) for c in calls])
        masters = await self._by_master(calls, wait)
        per_master = await self._each(
            [
                self._master(name, client, [calls[i] for i in at], wait)
                for name, client, at in masters
            ]
        )
        answers: list[Any] = [None] * len(calls)
        for (_, _, at), found in zip(masters, per_master, strict=True):
            for n, i in enumerate(at):
                answers[i] = found if isinstance(found, StoreUnavailable) else found[n]
        return answers

    async def _each(self, calls: Sequence[Awaitable[Any]]) -> list[Any]:
        """Every awaitable's answer, or StoreUnavailable for one whose Redis cannot answer."""
        if len(calls) == 1:  # one call: no task to create
            try:
                return [await calls[0]]
            except StoreUnavailable as exc:
                return [exc]
            except Exception as exc:
                if not cannot_answer(exc):
                    raise
                return [self._unavailable(exc)]
        answers: list[Any] = list(await asyncio.gather(*calls, return_exceptions=True))
        for i, answer in enumerate(answers):
            if cannot_answer(answer):
                answers[i] = self._unavailable(answer)
            elif isinstance(answer, BaseException) and not isinstance(answer, StoreUnavailable):
                raise answer
        return answers

    async def _by_master(
        self, calls: Sequence[Call], wait: bool
    ) -> list[tuple[str, aioredis.Redis, list[int]]]:
        """The calls' positions by the master holding their keys, with its client."""
        if not isinstance(self._client, RedisCluster):
            return [(self._location, self._client, list(range(len(calls))))]
        await self._client.initialize()  # the slot map (refreshed when an error asked for it)
        masters: dict[str, tuple[aioredis.Redis, list[int]]] = {}
        for i, call in enumerate(calls):
            node = self._client.get_node_from_key(call.keys[0])
            if node is None:  # no slot map: the cluster client could not reach any node
                raise StoreUnavailable(f"redis at {self._url}", "no slot map yet")
            if (node.name, wait) not in self._masters:
                self._masters[node.name, wait] = node_client(
                    self._url, node, self._timeout_s, retries=1 if wait else 0
                )
            masters.setdefault(node.name, (self._masters[node.name, wait], []))[1].append(i)
        return [(name, client, at) for name, (client, at) in masters.items()]

    async def _master(
        self, name: str, client: aioredis.Redis, calls: Sequence[Call], wait: bool
    ) -> list[Any]:
        """The replies of one master's calls (StoreUnavailable for those it cannot answer)."""
        replies, acked = await self._sent(client, calls, wait)
        unloaded = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if unloaded:  # those did not run: load the scripts there and send them again
            again, acked_again = [_UNANSWERED] * len(unloaded), 0
            try:
                for script in {calls[i].script for i in unloaded}:
                    await client.script_load(script.script)
            except UNAVAILABLE:
                if wait:
                    raise
            else:
                again, acked_again = await self._sent(client, [calls[i] for i in unloaded], wait)
            for i, reply in zip(unloaded, again, strict=True):
                replies[i] = reply
            acked = min(acked, acked_again)  # each pipeline's WAIT counts its own connection
        failed = [i for i, r in enumerate(replies) if r is _UNANSWERED or isinstance(r, RedisError)]
        if wait:  # the writes and their WAIT share one connection: nothing to resend elsewhere
            if acked < self._min_replicas:
                raise StoreUnavailable(
                    f"redis at {name}",
                    f"a write reached {acked} of the {self._min_replicas} replicas it needs "
                    f"within {self._wait_ms} ms",
                )
            for i in failed:  # the others ran, and WAIT counted them
                if not (cannot_answer(replies[i]) or isinstance(replies[i], NoScriptError)):
                    raise replies[i]  # the script itself failed
                replies[i] = self._unavailable(replies[i])
            return replies
        for i in failed:
            if replies[i] is not _UNANSWERED and not (
                cannot_answer(replies[i]) or isinstance(replies[i], NoScriptError)
            ):
                raise replies[i]  # the script itself failed
        if failed:  # through the cluster client, as a call on its own goes: redirections
            # followed, the slot map refreshed, one retry
            resent = await self._each(
                [calls[i].script(keys=calls[i].keys, args=calls[i].args) for i in failed]
            )
            for i, reply in zip(failed, resent, strict=True):
                replies[i] = reply
        return replies

    async def _sent(
        self, client: aioredis.Redis, calls: Sequence[Call], wait: bool
    ) -> tuple[list[Any], int]:
        """One pipeline of ``calls`` (then ``WAIT``) on one connection of ``client``: each
        call's reply or its Redis error, and the replicas ``WAIT`` counted (0 without
        ``wait``). A pipeline that fails as a whole raises with ``wait``; without, each
        call is ``_UNANSWERED`` (it may have run or not)."""
        try:
            async with client.pipeline(transaction=False) as pipe:
                for call in calls:
                    pipe.execute_command(
                        "EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args
                    )
                if wait:
                    pipe.execute_command("WAIT", self._min_replicas, self._wait_ms)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
        except UNAVAILABLE:
            if wait:
                raise
            return [_UNANSWERED] * len(calls), 0
        if not wait:
            return replies, 0
        *replies, acked = replies
        if isinstance(acked, BaseException):
            raise acked
        return replies, int(acked)

    async def aclose(self) -> None:
        for client in self._masters.values():
            await client.aclose()
