"""The Redis session store: one Redis or a Redis Cluster, shared by every replica.

:class:`RedisSessionStore` (:mod:`.store`) is the whole store as the session service sees
it; the modules beside it are its parts, each with one job:

- :mod:`._client`: the redis-py client a store URL names, and which of its errors mean
  "unavailable now" (503, retry);
- :mod:`._keyspace`: where a session's keys live (hash-tagged buckets on a cluster);
- :mod:`._scripts`, :mod:`._packing`, :mod:`._record`: the Lua scripts, a write packed as
  one argument, and a record as one hash field (the layout from 0.2.0);
- :mod:`._coalesce`: the per-session calls of one pass of the event loop sent as one;
- :mod:`._master_pipelines`: a wave's script calls as one pipeline per master;
- :mod:`._recent`: the records this server wrote last, so a step need not read.
"""

from gruserve.sessions.redis_store.store import RedisSessionStore

__all__ = ["RedisSessionStore"]
