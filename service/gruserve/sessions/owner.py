"""Who is asking: the tenant a request acts for, and which sessions it may see.

A session belongs to the tenant (API key name) that created it
(``SessionRecord.owner``). A tenant sees only its own sessions; to any other
tenant one does not exist (the same ``SessionNotFound`` as a session never made,
so nothing tells a guessed id from a free one). An admin sees every session.
Without API keys every request is :data:`ANYONE`, an admin with no name: sessions
are owned by ``""`` and everyone sees everything, as before tenants existed. Bare
keys (no name) act for the tenant ``""``, which owns those same sessions.

>>> Caller("acme").sees("acme"), Caller("acme").sees(""), ANYONE.sees("acme")
(True, False, True)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Caller:
    """A request's tenant: ``name`` owns what it creates; ``admin`` sees every session."""

    name: str = ""
    admin: bool = False

    def sees(self, owner: str) -> bool:
        """Whether a session owned by ``owner`` exists for this caller."""
        return self.admin or owner == self.name


ANYONE = Caller("", admin=True)
"""The caller of a server without API keys."""
