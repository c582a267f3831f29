"""A session's record in Redis, read and edited the way another replica or an operator would.

Tests that reach past the server into Redis (to plant another tenant's record, or to check
what a refused step left behind) go through these, so they hold for either record layout:
the packed ``record`` field that servers write by default, or the ten fields of servers
before 0.2.0 (``GRUSERVE_STORE_PACKED_RECORDS=false``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gruserve.sessions.redis_store._record import pack_record, unpack_record


def stored_field(client: Any, key: str, name: str) -> str | None:
    """Field ``name`` of the record in hash ``key`` as text (None: no such session)."""
    packed = client.hget(key, "record")
    if packed is None or client.hexists(key, "model"):  # readers prefer the fields
        value = client.hget(key, name)
        return None if value is None else value.decode()
    return str(getattr(unpack_record(key, packed), name))


def set_stored_field(client: Any, key: str, name: str, value: Any) -> None:
    """Set field ``name`` of the record in hash ``key``, in the layout it is stored in."""
    packed = client.hget(key, "record")
    if packed is None or client.hexists(key, "model"):
        client.hset(key, name, value)
        return
    record = dataclasses.replace(unpack_record(key, packed), **{name: value})
    client.hset(key, "record", pack_record(record))
