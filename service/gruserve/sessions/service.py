"""The session service: stateful streaming on top of the batcher and a session store.

A session is Keras ``stateful=True`` made explicit: each step feeds the stored
state as ``initial_state`` and stores ``final_state``. Three guarantees:

- in one process, requests on one session are applied one at a time in
  arrival order (a FIFO lock per session id);
- across processes sharing a store, a step is written only if nobody else
  advanced the session since it was read (compare-and-set on the record's
  revision); a loser re-reads the state and recomputes its step, so no step
  is ever lost or applied twice;
- a step that carries the client's step number is applied exactly once even when
  the client resends it (after a lost reply, a timeout, a replica that died): the
  record keeps that step's outputs and a digest of its inputs, and a resend with the
  same inputs gets them back unchanged (different ones: ``StepMismatch``).

Transports (REST, NDJSON, WebSocket, later KServe v2) all call this class
with numpy arrays; it knows nothing about HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import reprlib
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass

import numpy as np

from gruserve.errors import (
    GruServeError,
    InvalidInput,
    SequenceNotStarted,
    SessionConflict,
    SessionExists,
    SessionModelMismatch,
    SessionNotFound,
    SessionNotOnModel,
    StepMismatch,
    StepOutOfOrder,
)
from gruserve.metrics import Metrics
from gruserve.runtime.batcher import Batcher
from gruserve.runtime.limits import WorkLimits
from gruserve.runtime.model import LoadedModel
from gruserve.runtime.registry import ModelRegistry
from gruserve.runtime.signature import ModelSignature
from gruserve.runtime.validation import Chunk, StateValue, check_chunk, flat_state
from gruserve.sessions import _result
from gruserve.sessions._locks import KeyedLocks
from gruserve.sessions.lifecycle import STEP_ONLY, Lifecycle
from gruserve.sessions.owner import ANYONE, Caller
from gruserve.sessions.store import CREATE, MAX_PAGE, SessionPage, SessionRecord, SessionStore

SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
"""A valid session id, whole: always ``fullmatch`` (``$`` would let a final newline in)."""
_SEQUENCE = "sequence\x00"  # lock-key prefix no session id can have (see sequence_step)


@dataclass(frozen=True, slots=True)
class StepResult:
    """One applied step: ``outputs`` by output name, (T, D), or (D,) for a single
    timestep sent without a time axis or a model that returns one output per sequence;
    ``states`` (by state key, (units,)) only for a step that ended its session and asked
    for the state it ended in."""

    outputs: dict[str, np.ndarray]
    step: int
    record: SessionRecord
    states: dict[str, np.ndarray] | None = None


class SessionService:
    """Create, step, reset, inspect and delete sessions.

    Args:
        registry: served models.
        batchers: one batcher per served model name.
        store: where records live (memory or Redis).
        max_timesteps: per-request timesteps limit.
        max_attempts: compare-and-set attempts before giving up with SessionConflict.
        metrics: collectors, or None.
        clock: Unix-seconds clock.
        limits: work per request: a step's reply is counted against ``max_reply_values``.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        batchers: Mapping[str, Batcher],
        store: SessionStore,
        *,
        max_timesteps: int,
        max_attempts: int = 16,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        limits: WorkLimits | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"SessionService needs max_attempts >= 1. Received: {max_attempts!r}")
        self.registry, self.store = registry, store
        self._batchers = batchers
        self._max_timesteps, self._max_attempts = max_timesteps, max_attempts
        self._metrics, self._clock = metrics, clock
        self._locks = KeyedLocks()
        self._limits = limits if limits is not None else WorkLimits()

    # -- lookups -------------------------------------------------------------------------
    def model_of(self, record: SessionRecord) -> LoadedModel:
        """The loaded model version a record belongs to (same name *and* version); see
        :meth:`model_for` to load it when it is on disk only."""
        model = self.registry.loaded(record.model, record.version)
        if model is not None:
            return model
        served = self.registry.get(record.model)
        raise SessionModelMismatch(record.session_id, record.model, record.version, served.version)

    async def model_for(self, record: SessionRecord) -> LoadedModel:
        """The model version a record belongs to, loaded first (off the event loop) when it
        is on disk but not loaded.

        Raises:
            ModelVersionGone: that version was removed from the repository.
        """
        model = self.registry.loaded(record.model, record.version)
        if model is not None:
            return model
        return await self.registry.ensure(record.model, record.version, record.session_id)

    async def model_named(
        self, model_name: str, version: object = None, field: str = "version"
    ) -> LoadedModel:
        """``model_name`` at ``version`` (loaded on demand), or its default version when None.

        Raises:
            InvalidInput: ``version`` is not a positive integer, or no such version (naming
                ``field``).
            ModelNotFound, ModelUnavailable.
        """
        if version is None:
            return self.registry.get(model_name)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InvalidInput(
                field, f"expected a version number (an integer >= 1). Received: {version!r}"
            )
        return await self.registry.ensure(model_name, version, field=field)

    def _batcher(self, model: LoadedModel) -> Batcher:
        of = getattr(self._batchers, "of", None)  # runtime.versions.Batchers: per version
        return of(model) if of is not None else self._batchers[model.name]

    def states_of(self, record: SessionRecord) -> dict[str, np.ndarray]:
        """The record's state as ``{state key: (units,)}``."""
        return self.model_of(record).signature.split_state(record.state)

    async def get(self, session_id: str, caller: Caller = ANYONE) -> SessionRecord:
        """The session, if ``caller`` may see it (else it does not exist for them)."""
        return self._seen(await self.store.get(session_id), caller)

    @staticmethod
    def _seen(record: SessionRecord, caller: Caller) -> SessionRecord:
        if caller is not ANYONE and not caller.sees(record.owner):
            raise SessionNotFound(record.session_id)
        return record

    # -- lifecycle -----------------------------------------------------------------------
    async def create(
        self,
        model_name: str,
        session_id: str | None = None,
        initial_state: StateValue | None = None,
        caller: Caller = ANYONE,
        *,
        version: object = None,
    ) -> SessionRecord:
        """Start a session at zero state, or at ``initial_state``, owned by ``caller``, on
        ``version`` (the model's default version when None) for its whole life.

        Raises:
            ModelNotFound, ModelUnavailable, InvalidInput, SessionExists, TooManySessions.
        """
        model = await self.model_named(model_name, version)
        if session_id is None:
            session_id = uuid.uuid4().hex
        else:
            _check_id(session_id)
        state = flat_state(model.signature, initial_state, "initial_state")
        record = self._new(model, session_id, state, caller)
        await self.store.create(record)
        return record

    def _new(
        self, model: LoadedModel, session_id: str, state: np.ndarray, caller: Caller
    ) -> SessionRecord:
        now = self._clock()
        return SessionRecord(
            session_id,
            model.name,
            model.version,
            state,
            created_at=now,
            last_used_at=now,
            owner=caller.name,
        )

    async def delete(self, session_id: str, caller: Caller = ANYONE) -> None:
        async with self._locks.hold(session_id):
            if caller is not ANYONE:
                await self.get(session_id, caller)
            await self.store.delete(session_id)

    async def reset(
        self, session_id: str, states: StateValue | None = None, caller: Caller = ANYONE
    ) -> SessionRecord:
        """Zero the state, or set it to ``states`` (tf-keras ``reset_states(states=...)``)."""
        async with self._locks.hold(session_id):
            for _ in range(self._max_attempts):
                record = self._seen(await self.store.get(session_id), caller)
                state = flat_state((await self.model_for(record)).signature, states, "states")
                updated = record.reset(state, self._clock())
                if await self.store.compare_and_set(updated, record.revision):
                    return updated
                self._conflict()
        raise SessionConflict(session_id, self._max_attempts)

    async def page(
        self,
        cursor: str | None = None,
        limit: int = 100,
        model: str | None = None,
        caller: Caller = ANYONE,
    ) -> SessionPage:
        """One page of every session ``caller`` sees, in id order (see
        :meth:`SessionStore.page`; a tenant's page may hold fewer than ``limit`` sessions,
        even none, before the end).

        Raises:
            InvalidInput: ``limit`` outside 1..MAX_PAGE, or a cursor no session id can be.
        """
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput("limit", f"expected 1 to {MAX_PAGE}. Received: limit={limit}")
        if cursor is not None and not SESSION_ID.fullmatch(cursor):
            raise InvalidInput("cursor", f"not a cursor this server returned: {cursor!r}")
        found = await self.store.page(cursor, limit, model)
        if caller.admin:
            return found
        records = await asyncio.gather(
            *(self.store.get(s.session_id) for s in found.sessions), return_exceptions=True
        )
        for record in records:  # gone meanwhile, or the store failed: no owner to compare
            if isinstance(record, BaseException) and not isinstance(record, SessionNotFound):
                raise record
        mine = [
            summary
            for summary, record in zip(found.sessions, records, strict=True)
            if isinstance(record, SessionRecord) and caller.sees(record.owner)
        ]
        return SessionPage(mine, found.next_cursor)

    def servable(self, record: SessionRecord) -> bool:
        """Whether this server can continue ``record`` (a restored one): a valid id, its model
        version served, its state the size that model's states add up to."""
        try:
            model = self.registry.load_now(record.model, record.version)
        except GruServeError:
            return False
        return bool(SESSION_ID.fullmatch(record.session_id)) and record.state.shape == (
            model.signature.total_units,
        )

    # -- the hot path ----------------------------------------------------------------------
    async def step(
        self,
        session_id: str,
        inputs: np.ndarray,
        mask: np.ndarray | None = None,
        step_number: int | None = None,
        caller: Caller = ANYONE,
        *,
        model_name: str | None = None,
        lifecycle: Lifecycle = STEP_ONLY,
    ) -> StepResult:
        """Apply one chunk of timesteps to a session, at least once or exactly once.

        Without ``step_number`` the step is applied whenever it arrives (a client that
        resends after a lost reply applies it twice). With it, the step is applied only if
        the session has applied exactly ``step_number`` steps, and its outputs are kept
        with the new state (in the same store write); resending the same number then
        returns the kept result without running anything. Any other number is refused.
        The check runs again on every compare-and-set retry, against the record re-read.

        Args:
            inputs: (T, F) or (F,) values, or (T,) / scalar token ids.
            mask: (T,) bool; a masked timestep leaves the state unchanged.
            step_number: steps the client knows were applied before this one (>= 0).
            model_name: when given, the session must be on this model (bulk steps name
                the model in their URL).
            lifecycle: create the session if absent and/or end it after the step, in the
                step's own store write (:mod:`gruserve.sessions.lifecycle`).

        Raises:
            SessionNotFound, InvalidInput, PayloadTooLarge, SessionConflict, StoreUnavailable.
            SessionExists: a create names an id held on another model or by another tenant.
            TooManySessions: a create found the store full.
            SessionNotOnModel: the session is on another model than ``model_name``.
            StepOutOfOrder: ``step_number`` is neither the next step nor the last one.
            StepMismatch: ``step_number`` is the last step's, but the inputs or mask differ.
        """
        create, fresh = lifecycle.create, None
        if create is not None:
            _check_id(session_id)
            made = self.registry.get(create.model)
            if model_name is not None and made.name != model_name:
                raise InvalidInput(
                    "create.model", f"steps sent to model {model_name!r} create sessions of it"
                )
            state = flat_state(made.signature, create.initial_state, "create.initial_state")
            fresh = (made, state)
        locks = self._locks
        if not locks.try_acquire(session_id):  # the `async with locks.hold()` of the other
            await locks.acquire(session_id)  # methods, without its two coroutine calls
        try:
            chunk, applied = None, b""
            for _ in range(self._max_attempts):
                try:
                    record = await self.store.get(session_id)
                except SessionNotFound:
                    if fresh is None:
                        raise
                    record, expected = self._new(fresh[0], session_id, fresh[1], caller), CREATE
                else:
                    expected = record.revision
                    if caller is not ANYONE and not caller.sees(record.owner):
                        if fresh is not None:  # taken: the answer an explicit create gets
                            raise SessionExists(session_id) from None
                        raise SessionNotFound(session_id)
                    if fresh is not None and record.model != fresh[0].name:
                        raise SessionExists(session_id)
                if model_name is not None and record.model != model_name:
                    raise SessionNotOnModel(session_id, record.model, model_name)
                model = self.registry.loaded(record.model, record.version)
                if model is None:
                    model = await self.model_for(record)
                if chunk is None:
                    chunk = self._chunk(model.signature, inputs, mask)
                    if step_number is not None:
                        applied = _result.digest(chunk.inputs, chunk.mask, chunk.single)
                if step_number is not None and step_number != record.step:
                    return self._replay(record, model, step_number, applied)
                out = await self._batcher(model).submit(chunk.inputs, chunk.mask, record.state)
                outputs = out.outputs
                if chunk.single and model.signature.per_timestep:
                    outputs = [o[0] for o in outputs]
                kept = None if step_number is None else _result.pack(step_number, outputs, applied)
                updated = record.advanced(out.state, chunk.timesteps, self._clock(), kept)
                if await self.store.compare_and_set(updated, expected, lifecycle.end):
                    return StepResult(
                        dict(zip(model.signature.output_names, outputs, strict=True)),
                        updated.step,
                        updated,
                        model.signature.split_state(updated.state)
                        if lifecycle.end and lifecycle.final_state
                        else None,
                    )
                self._conflict()
        finally:
            locks.release(session_id)
        raise SessionConflict(session_id, self._max_attempts)

    def _chunk(self, sig: ModelSignature, inputs: np.ndarray, mask: np.ndarray | None) -> Chunk:
        """The step's checked arrays; refused (413) if its reply would be too large."""
        chunk = check_chunk(sig, inputs, mask, self._max_timesteps)
        self._limits.check_reply(sig, 1, chunk.timesteps)
        return chunk

    def _replay(
        self, record: SessionRecord, model: LoadedModel, step_number: int, applied: bytes
    ) -> StepResult:
        """The kept result of the session's last step, if ``step_number`` is that step's and
        ``applied`` (the resend's digest) is the one it was applied with."""
        if step_number == record.step - 1 and _result.base_of(record.last_result) == step_number:
            stored = _result.digest_of(record.last_result)
            if stored is not None and stored != applied:  # None: kept before digests were
                raise StepMismatch(record.session_id, step_number, record.step)
            if self._metrics is not None:
                self._metrics.step_replays.inc()
            outputs = _result.unpack(record.last_result or b"")
            return StepResult(
                dict(zip(model.signature.output_names, outputs, strict=True)), record.step, record
            )
        raise StepOutOfOrder(record.session_id, step_number, record.step)

    def _conflict(self) -> None:
        if self._metrics is not None:
            self._metrics.cas_conflicts.inc()

    # -- v2 (Triton / KServe) sequences ----------------------------------------------------
    async def sequence_step(
        self,
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

        A ``step_number`` makes the step exactly-once as in :meth:`step`. A start always
        starts over (as Triton does), so its number, if any, must be 0: resending a start
        whose reply was lost starts over again and gives the same result.

        Args:
            inputs, mask: as :meth:`step`.
            initial_state: only with ``start``.
            step_number: as :meth:`step`; 0 (or None) with ``start``.
            caller: the tenant; a sequence another tenant owns is not started for it (the
                API scopes sequence ids per tenant, so that takes an id made on purpose).
            version: the model version a start starts the sequence on (the default when
                None); later requests run on the version the sequence started on.

        Raises:
            SequenceNotStarted: no ``start`` and no such session on this model.
            The errors of :meth:`create` and :meth:`step`.
        """
        model = await self.model_named(model_name, version)
        if start:  # a later request is checked against its session's own version, in step()
            self._chunk(model.signature, inputs, mask)
        if initial_state is not None and not start:
            raise InvalidInput("initial_state", "a sequence's state is set only by its start")
        if start and step_number not in (None, 0):
            raise InvalidInput(
                "step",
                f"a sequence_start request is the sequence's step 0. Received: {step_number}",
            )
        async with self._locks.hold(_SEQUENCE + session_id):
            if start:
                await self._restart(model, session_id, initial_state, caller)
            else:
                try:
                    record = await self.get(session_id, caller)
                except SessionNotFound:
                    raise SequenceNotStarted(session_id, model.name) from None
                if record.model != model.name:
                    raise SequenceNotStarted(session_id, model.name)
            try:
                result = await self.step(session_id, inputs, mask, step_number, caller)
            except SessionNotFound:  # expired or deleted between the check and the step
                raise SequenceNotStarted(session_id, model.name) from None
            if end:
                with suppress(SessionNotFound):
                    await self.delete(session_id)
            return result

    async def sequence_model(
        self, model_name: str, session_id: str, caller: Caller = ANYONE
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
            record = await self.get(session_id, caller)
        except SessionNotFound:
            return self.registry.get(model_name)
        if record.model != model_name:
            return self.registry.get(model_name)
        return await self.model_for(record)

    async def _restart(
        self,
        model: LoadedModel,
        session_id: str,
        initial_state: StateValue | None,
        caller: Caller,
    ) -> None:
        """Create ``session_id``, or reset it in place (replace it if another model owns it;
        refuse it, SessionExists, if another tenant does)."""
        state = flat_state(model.signature, initial_state, "initial_state")
        for _ in range(self._max_attempts):
            try:
                record = await self.store.get(session_id)
            except SessionNotFound:
                try:
                    await self.create(
                        model.name, session_id, initial_state, caller, version=model.version
                    )
                    return
                except SessionExists:  # another replica created it meanwhile: restart that
                    continue
            if caller is not ANYONE and not caller.sees(record.owner):
                raise SessionExists(session_id)
            if (record.model, record.version) != (model.name, model.version):
                with suppress(SessionNotFound):
                    await self.store.delete(session_id)
                continue
            now = self._clock()
            fresh = dataclasses.replace(record.reset(state, now), created_at=now)
            if await self.store.compare_and_set(fresh, record.revision):
                return
            self._conflict()
        raise SessionConflict(session_id, self._max_attempts)


def _check_id(session_id: object) -> None:
    """Refuse a client-chosen session id no session can have (InvalidInput naming it)."""
    if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
        # reprlib: a JSON value nested past the recursion limit has no full repr
        received = repr(session_id) if isinstance(session_id, str) else reprlib.repr(session_id)
        raise InvalidInput(
            "session_id",
            f"use 1-128 letters, digits, '.', '_', ':' or '-' starting with a letter "
            f"or digit. Received: {received}",
        )
