"""Triton-style sequences (KServe v2, HTTP and gRPC) on top of the session service.

A v2 client frames each request of a sequence with ``sequence_start`` and
``sequence_end`` instead of creating and deleting a session: a start creates the session
or starts a live one over, an end deletes it once its step is applied. Both front-ends
reach :func:`step` and :func:`model_of` through :mod:`gruserve.api.v2.infer`, so a sequence
is an ordinary session underneath (``GET /v1/sessions/{id}`` shows it) with the same locks,
compare-and-set, exactly-once numbers and tenant namespaces as any step.
"""

from __future__ import annotations

import dataclasses
from contextlib import suppress
from typing import TYPE_CHECKING

import numpy as np

from gruserve.errors import (
    InvalidInput,
    SequenceNotStarted,
    SessionConflict,
    SessionExists,
    SessionNotFound,
    SessionNotOnModel,
)
from gruserve.runtime.model import LoadedModel
from gruserve.runtime.validation import StateValue, flat_state
from gruserve.sessions.owner import ANYONE, Caller

if TYPE_CHECKING:
    from gruserve.sessions.service import SessionService, StepResult

_SEQUENCE = "sequence\x00"  # lock-key prefix no session id can have: a sequence's own FIFO


async def step(
    service: SessionService,
    model_name: str,
    session_id: str,
    inputs: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    start: bool,
    end: bool,
    initial_state: StateValue | None = None,
    step_number: int | None = None,
    caller: Caller = ANYONE,
    version: int | None = None,
) -> StepResult:
    """One request of a Triton-style sequence: a step framed by its start and end flags.

    ``start`` creates the session, or starts a live one over at zero state (or at
    ``initial_state``), as Triton does when a START arrives for a busy correlation
    id. Without ``start`` the session must exist on ``model_name``. With ``end`` the
    session is deleted once its step is applied; the step's result is still returned.
    The inputs are checked before anything changes, so a rejected request leaves the
    sequence as it was. Requests of one sequence run whole and in arrival order (a
    FIFO lock of their own, around the session's usual one).

    A ``step_number`` makes the step exactly-once as in :meth:`SessionService.step`. A start always
    starts over (as Triton does), so its number, if any, must be 0: resending a start
    whose reply was lost starts over again and gives the same result.

    Args:
        inputs, mask: as :meth:`SessionService.step`.
        initial_state: only with ``start``.
        step_number: as :meth:`SessionService.step`; 0 (or None) with ``start``.
        caller: the tenant: ``session_id`` is in its namespace, as on v1.
        version: the model version a start starts the sequence on (the default when
            None); later requests run on the version the sequence started on.

    Raises:
        SequenceNotStarted: no ``start`` and no such session on this model.
        The errors of :meth:`SessionService.create` and :meth:`SessionService.step`.
    """
    model = await service.model_named(model_name, version)
    if start:  # a later request is checked against its session's own version, in step()
        service.parts.chunk(model.signature, inputs, mask)
    if initial_state is not None and not start:
        raise InvalidInput("initial_state", "a sequence's state is set only by its start")
    if start and step_number not in (None, 0):
        raise InvalidInput(
            "step",
            f"a sequence_start request is the sequence's step 0. Received: {step_number}",
        )
    key = caller.key(session_id)
    async with service.parts.locks.hold(_SEQUENCE + key):
        if start:
            await _restart(service, model, session_id, initial_state, caller)
        try:  # the step's own read checks the model: one store read per request
            result = await service.step(
                session_id, inputs, mask, step_number, caller, model_name=model.name
            )
        except (SessionNotFound, SessionNotOnModel):  # never started, ended or expired
            raise SequenceNotStarted(session_id, model.name) from None
        if end:
            async with service.parts.locks.hold(key):
                with suppress(SessionNotFound):
                    await service.store.delete(result.record.session_id)
        return result


async def model_of(
    service: SessionService, model_name: str, session_id: str, caller: Caller = ANYONE
) -> LoadedModel:
    """The model version a later (non-start) request of sequence ``session_id`` runs on.

    That is its session's own version, not the model's default: after a rollout the
    two may differ in their inputs, so a front-end binds the request's tensors against
    this one (loaded first when it is on disk only). An unknown sequence gets the
    default; its step then answers SequenceNotStarted.

    Raises:
        ModelNotFound, ModelUnavailable, ModelVersionGone.
    """
    try:
        record = await service.get(session_id, caller)
    except SessionNotFound:
        return service.registry.get(model_name)
    if record.model != model_name:
        return service.registry.get(model_name)
    return await service.model_for(record)


async def _restart(
    service: SessionService,
    model: LoadedModel,
    session_id: str,
    initial_state: StateValue | None,
    caller: Caller,
) -> None:
    """Create ``caller``'s ``session_id``, or reset it in place (replace it if another
    model owns it; refuse it, SessionExists, if another tenant owns the unscoped id from
    before namespaces)."""
    state = flat_state(model.signature, initial_state, "initial_state")
    key = caller.key(session_id)
    for _ in range(service.parts.max_attempts):
        try:
            record = await service.parts.fetch(key)
        except SessionNotFound:
            try:
                await service.create(
                    model.name, session_id, initial_state, caller, version=model.version
                )
                return
            except SessionExists:  # another replica created it meanwhile: restart that
                continue
        if caller is not ANYONE and not caller.sees(record.owner):
            raise SessionExists(session_id)
        if (record.model, record.version) != (model.name, model.version):
            with suppress(SessionNotFound):
                await service.store.delete(record.session_id)
            continue
        now = service.parts.clock()
        fresh = dataclasses.replace(record.reset(state, now), created_at=now)
        if await service.store.compare_and_set(fresh, record.revision):
            return
        service.parts.conflict()
    raise SessionConflict(session_id, service.parts.max_attempts)
