"""A step that also starts or ends its session: the lifecycle carried in band.

Short sessions (a visit, a game round, a transaction scored as it unfolds) cost
more in creates and deletes than in steps when each is its own request. As with a
Triton sequence's start and end flags, a step may say "create this session if it does
not exist" and "end it after this step", so a whole short session can be one request
per step, and on a shared store the create or the end travels in the step's own write
(one compare-and-set that inserts if absent, or removes instead of storing).

What an in-band create means for an id that exists:

- the caller's own session on the same model: the step is an ordinary step of it (so a
  create-step resent after a lost reply, with its step number, gets the kept result and
  creates nothing);
- a session on another model: ``SessionExists`` (409), the same answer an explicit create
  of a taken id gets. Another tenant's session of the same id is never met: ids are per
  tenant (:mod:`gruserve.sessions.owner`), so its create makes its own session.
"""

from __future__ import annotations

from dataclasses import dataclass

from gruserve.runtime.validation import StateValue


@dataclass(frozen=True, slots=True)
class Create:
    """Create the session on ``model`` (at ``initial_state``, else zero) if it does not exist."""

    model: str
    initial_state: StateValue | None = None


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """What a step does to its session's life besides stepping it.

    Attributes:
        create: create the session first if it does not exist (None: it must exist).
        end: delete the session once the step is applied (the reply still carries the
            step's outputs).
        final_state: with ``end``, the reply also carries the state the session ended in.
    """

    create: Create | None = None
    end: bool = False
    final_state: bool = False


STEP_ONLY = Lifecycle()
"""An ordinary step: the session must exist and stays."""
