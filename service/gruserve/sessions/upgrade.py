"""Moving a live session to another version of its model, cold or warm.

A session stays on the version it was created on; ``POST /v1/sessions/{id}/upgrade``
moves it. The new version's state layout and weights differ, so the old state cannot
be carried over: the session starts from the new version's zero state (Keras's
``get_initial_state``), or, with ``replay`` W, from the state the new version reaches
over the session's last W kept inputs (:mod:`gruserve.sessions.history`), which is
what the session would hold had it run on the new version all along when W covers its
whole life, and close to it when W spans the model's memory (bench/README.md measures
how close). The step and timestep counts continue; the kept inputs stay with the
session.

A session created with a custom ``initial_state`` is replayed from the zero state too:
the record keeps no creation state, and keeping one would be exact only while the kept
inputs still reach back to creation and the new version's state has the old one's
layout, so a replay over such a session's whole life is close, not exact (a known
limit; the client can instead start a new session on the new version with its state).

The move is one compare-and-set of the record read, like a step's write: a step
applied meanwhile (on any replica) makes the move lose and start over from the record
that step wrote, so no step is lost or counted on the wrong version.

A step that finds its session's version removed from disk applies
``GRUSERVE_SESSION_ON_VERSION_GONE`` through :func:`after_gone`.

Every move written is counted in ``gruserve_session_upgrades_total`` (``how``: upgrade,
replay, reset-on-gone, upgrade-on-gone) and its replayed timesteps in
``gruserve_session_upgrade_replayed_timesteps_total``; a move that lost its
compare-and-set is not counted (the one that follows it is).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from gruserve.errors import InvalidInput, ModelVersionGone, SessionConflict
from gruserve.runtime.model import LoadedModel
from gruserve.sessions import history
from gruserve.sessions._parts import seen
from gruserve.sessions.owner import ANYONE, Caller, client_id
from gruserve.sessions.store import SessionRecord

if TYPE_CHECKING:
    from gruserve.sessions.service import SessionService

OnVersionGone = Literal["fail", "reset", "upgrade"]
"""What a step does for a session whose version was removed: answer 410, restart the
session on the default version at zero state, or upgrade it with all kept inputs."""


@dataclass(frozen=True, slots=True)
class Upgrade:
    """A session moved: its new record, the version it left and the timesteps replayed."""

    record: SessionRecord
    old_version: int
    replayed: int


async def upgrade(
    service: SessionService,
    session_id: str,
    version: object = None,
    replay: object = None,
    caller: Caller = ANYONE,
) -> Upgrade:
    """Move ``session_id`` to ``version`` of its model (the default version when None).

    Args:
        version: the target version (an integer >= 1), or None.
        replay: how many of the last kept timesteps the new version runs over from its
            zero state (None or 0: start at zero state).
        caller: the tenant; another tenant's session does not exist for it.

    Raises:
        SessionNotFound: unknown, or another tenant's.
        InvalidInput: ``version`` is no version of the session's model; ``replay`` is not
            an integer >= 0, or more timesteps than the session keeps.
        SessionConflict: the session kept being stepped elsewhere for every attempt.
    """
    if replay is not None and (isinstance(replay, bool) or not isinstance(replay, int)):
        raise InvalidInput("replay", f"expected an integer >= 0. Received: {replay!r}")
    if replay is not None and replay < 0:
        raise InvalidInput("replay", f"expected an integer >= 0. Received: {replay}")
    key = caller.key(session_id)
    async with service.parts.locks.hold(key):
        for _ in range(service.parts.max_attempts):
            record = seen(await service.parts.fetch(key), caller)
            target = await service.model_named(record.model, version)
            moved = await _moved(service, record, target, replay or 0)
            if await service.store.compare_and_set(moved, record.revision):
                _count(service, record, moved, "replay" if replay else "upgrade", replay or 0)
                return Upgrade(moved, record.version, replay or 0)
            service.parts.conflict()
    raise SessionConflict(session_id, service.parts.max_attempts)


async def after_gone(
    service: SessionService, record: SessionRecord, gone: ModelVersionGone, policy: OnVersionGone
) -> bool:
    """Apply ``policy`` to ``record``, whose version was removed (its step's lock held).

    Returns whether the moved record was written (False: another writer won; re-read).

    Raises:
        ModelVersionGone: ``gone`` itself, under the ``fail`` policy.
    """
    if policy == "fail":
        raise gone
    target = service.registry.get(record.model)
    kept = history.read(record.history)
    replay = len(kept) if policy == "upgrade" and _fits(kept, target) else 0
    moved = await _moved(service, record, target, replay)
    if not await service.store.compare_and_set(moved, record.revision):
        return False
    _count(service, record, moved, f"{policy}-on-gone", replay)
    return True


def _count(
    service: SessionService, record: SessionRecord, moved: SessionRecord, how: str, replayed: int
) -> None:
    """``gruserve_session_upgrades_total`` and the replayed timesteps of one move written."""
    metrics = service.parts.metrics
    if metrics is not None:
        metrics.count_upgrade(record.model, record.version, moved.version, how, replayed)


def _fits(kept: history.Kept, model: LoadedModel) -> bool:
    """Whether ``model`` takes inputs as wide as the kept rows."""
    return kept.inputs.shape[1] == (model.signature.features or 1)


async def _moved(
    service: SessionService, record: SessionRecord, target: LoadedModel, replay: int
) -> SessionRecord:
    """``record`` on ``target``, its state the zero state run over the last ``replay``
    kept timesteps; the write's revision follows the record read."""
    state = target.signature.zero_state()
    if replay:
        kept = history.read(record.history)
        if replay > len(kept):
            raise InvalidInput(
                "replay",
                f"session {client_id(record.session_id)!r} keeps its last {len(kept)} timesteps "
                f"(GRUSERVE_SESSION_HISTORY={service.history}). Received: replay={replay}",
            )
        if not _fits(kept, target):
            raise InvalidInput(
                "replay",
                f"the kept inputs have {kept.inputs.shape[1]} values per timestep; "
                f"{target.name!r} version {target.version} takes {target.signature.features}",
            )
        state = await warm_state(service, target, kept.last(replay), state)
    return dataclasses.replace(
        record,
        version=target.version,
        state=state,
        revision=record.revision + 1,
        last_used_at=service.parts.clock(),
    )


async def warm_state(
    service: SessionService, model: LoadedModel, kept: history.Kept, state: np.ndarray
) -> np.ndarray:
    """The state ``model`` reaches from ``state`` over ``kept``, run as steps of at most
    ``GRUSERVE_MAX_TIMESTEPS`` (an unrolled model's exact length: a short last chunk is
    padded with masked timesteps, which leave the state as it is)."""
    sig = model.signature
    inputs = kept.inputs[:, 0].astype(np.int64) if sig.takes_token_ids else kept.inputs
    mask = kept.mask
    size = service.parts.max_timesteps
    exact = sig.static_timesteps is not None and sig.pad_alignment is None
    if sig.static_timesteps is not None:
        size = min(size, sig.static_timesteps)
    batcher = service.parts.batcher(model)
    for start in range(0, len(kept), size):
        x = inputs[start : start + size]
        m = None if mask is None else mask[start : start + size]
        if exact and x.shape[0] < size:
            pad = size - x.shape[0]
            m = np.concatenate([np.ones(x.shape[0], bool) if m is None else m, np.zeros(pad, bool)])
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        state = (await batcher.submit(np.ascontiguousarray(x), m, state)).state
    return state
