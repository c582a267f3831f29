"""Who is asking, and where its sessions live: tenants and their session id namespaces.

A session belongs to the tenant (API key name) that created it (``SessionRecord.owner``),
and each tenant has its own namespace of session ids: tenant ``acme``'s ``station-7``
and tenant ``zeta``'s ``station-7`` are two sessions. To any other non-admin tenant a
session does not exist (the same ``SessionNotFound`` as a session never made), and a
create never collides with another tenant's id, so nothing tells a guessed id from a
free one. Without API keys every request is :data:`ANYONE`, an admin with no name:
sessions are owned by ``""`` and everyone sees everything, as before tenants existed.
Bare keys (no name) act for the tenant ``""``, which owns those same sessions.

**Store keys.** :meth:`Caller.key` is the one place a client's id becomes the id a store
keeps (``SessionRecord.session_id``, Redis keys, locks, snapshots): tenant ``""`` keeps
the client's id unchanged (stores hold exactly what they held before tenants), a named
tenant's id is ``~{tenant}~{id}``. ``~`` is neither in a session id nor in a key name,
so no client id can be, or collide with, a scoped key, and every scoped key sorts after
every id of tenant ``""`` (``~`` is above the letters): a tenant's listing is one range.

**Admins** address another tenant's session with the qualified id ``{tenant}~{id}``
(``~{id}`` for tenant ``""``); :meth:`Caller.shown` is the inverse of :meth:`Caller.key`,
so ids an admin lists are ids it can send back. Their own sessions keep plain ids.

**Before namespaces**, a named tenant's session was stored under its plain id (and a
v2 sequence under ``v2:{model}:t.{tenant}:{n}``), with ``owner`` set. :func:`legacy_key`
names where such a record would be; the session service looks there when the scoped
key misses and the record found is the tenant's own (a fallback instead of a start-up
migration: a migration races with replicas still running the old code on the same Redis,
and a fallback is correct whatever runs beside it; it costs one more read only when a
named tenant's id is absent, and nothing once those sessions expire).

>>> acme, root = Caller("acme"), Caller("root", admin=True)
>>> acme.key("station-7"), Caller("").key("station-7"), root.key("acme~station-7")
('~acme~station-7', 'station-7', '~acme~station-7')
>>> root.shown("~acme~station-7"), acme.shown("~acme~station-7"), client_id("~acme~s-7")
('acme~station-7', 'station-7', 's-7')
>>> Caller("acme").sees("acme"), Caller("acme").sees(""), ANYONE.sees("acme")
(True, False, True)
"""

from __future__ import annotations

from dataclasses import dataclass

SEP = "~"
"""Between a tenant and an id, in store keys and in an admin's qualified ids."""


@dataclass(frozen=True, slots=True)
class Caller:
    """A request's tenant: ``name`` owns what it creates; ``admin`` sees every session."""

    name: str = ""
    admin: bool = False

    def sees(self, owner: str) -> bool:
        """Whether a session owned by ``owner`` exists for this caller."""
        return self.admin or owner == self.name

    def key(self, session_id: str) -> str:
        """The store key of ``session_id`` as this caller names it (see the module).

        A non-admin's id with ``~`` in it maps to a key no session has (``~~...``)."""
        if SEP in session_id:
            if not self.admin:
                return SEP + SEP + session_id
            tenant, _, plain = session_id.partition(SEP)
            return scoped(tenant, plain)
        return scoped(self.name, session_id)

    def shown(self, key: str, owner: str = "") -> str:
        """The id this caller names the session stored at ``key`` by (its plain id when the
        caller's own; ``tenant~id`` for an admin looking at another tenant's); ``owner``:
        the record's, for a record stored before namespaces (whose key has no tenant)."""
        tenant = tenant_of(key) or owner
        plain = client_id(key)
        return plain if tenant == self.name else f"{tenant}{SEP}{plain}"


ANYONE = Caller("", admin=True)
"""The caller of a server without API keys."""


def scoped(tenant: str, session_id: str) -> str:
    """The store key of ``tenant``'s ``session_id``."""
    return f"{SEP}{tenant}{SEP}{session_id}" if tenant else session_id


def tenant_of(key: str) -> str:
    """The tenant whose namespace ``key`` is in (``""``: the unscoped one)."""
    return key[1:].partition(SEP)[0] if key.startswith(SEP) else ""


def client_id(key: str) -> str:
    """The id a tenant sent for ``key`` (what errors show: never the tenant's prefix)."""
    return key[1:].partition(SEP)[2] if key.startswith(SEP) else key


def legacy_key(key: str) -> str | None:
    """Where a named tenant's session ``key`` was stored before namespaces (None for the
    unscoped namespace, which did not move): its plain id, or for a v2 sequence id
    ``v2:{model}:{n}`` the ``v2:{model}:t.{tenant}:{n}`` form of that time."""
    tenant = tenant_of(key)
    if not tenant:
        return None
    plain = client_id(key)
    parts = plain.split(":", 2)
    if len(parts) == 3 and parts[0] == "v2" and SEP not in plain:
        return f"v2:{parts[1]}:t.{tenant}:{parts[2]}"
    return plain if SEP not in plain else None
