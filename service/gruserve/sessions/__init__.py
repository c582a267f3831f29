"""Per-session state: the session service and the stores it keeps records in.

What is where:

- the service: :mod:`.service` (a step, a reset, a create, on any front-end), with what it
  shares with the modules beside it (:mod:`._parts`), its per-session locks
  (:mod:`._locks`), kept results for numbered resends (:mod:`._result`, :mod:`.resend`),
  steps that start or end their session (:mod:`.lifecycle`), tenants (:mod:`.owner`),
  Triton-style sequences (:mod:`.sequences`), a move to another model version
  (:mod:`.upgrade`, warm with :mod:`.history`), and many sessions in one request
  (:mod:`.bulk`, a package: its batch path and its array path);
- the stores: the protocol and the record (:mod:`.store`), the in-process store
  (:mod:`.memory`, saved across restarts by :mod:`.snapshot`), the Redis store for a fleet
  (:mod:`.redis_store`, a package: one Redis or a Redis Cluster), and which one a URL names
  (:mod:`.store_url`);
- around them: sessions a store ends by itself (:mod:`.events`), the background sweep of
  expired ones (:mod:`.sweeper`), and the per-version count for ``/metrics``
  (:mod:`.census`).
"""
