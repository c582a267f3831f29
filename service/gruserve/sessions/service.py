"""The session service: stateful streaming on top of the batcher and a session store.

A session is Keras ``stateful=True`` made explicit: each step feeds the stored
state as ``initial_state`` and stores ``final_state``. Three guarantees:

- in one process, requests on one session are applied one at a time in
  arrival order (a FIFO lock per session id);
- across processes sharing a store, a step is written only if nobody else
  advanced the session since it was read (compare-and-set on the record's
  revision); a loser re-reads the state and recomputes its step, so no step
  is ever lost or applied twice. A step may start from the record this process
  wrote last instead of reading it (a Redis store's kept records): its write then also
  checks the stored writer token, and anything but a successful write is thrown away and
  the step runs again from a fresh read, so every answer is decided on the stored record;
- a step that carries the client's step number is applied exactly once even when
  the client resends it (after a lost reply, a timeout, a replica that died): the
  record keeps that step's outputs and a digest of its inputs, and a resend with the
  same inputs gets them back unchanged (different ones: ``StepMismatch``), once the
  record is written again as any step is (so with ``WAIT`` the replicas have it); a
  create resent after a 503 is answered as its first send would have been
  (:mod:`gruserve.sessions.resend`).

Transports (REST, NDJSON, WebSocket, bulk, KServe v2) all call this class
with numpy arrays and the client's session id; it knows nothing about HTTP. The id
becomes a store key in the caller's namespace here (:meth:`Caller.key
<gruserve.sessions.owner.Caller.key>`), so every front-end gets tenant scoping without
doing any: locks, records and the store see keys; errors show the client's id.
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
    ModelVersionGone,
    SessionConflict,
    SessionExists,
    SessionModelMismatch,
    SessionNotFound,
    SessionNotOnModel,
    StepMismatch,
    StepOutOfOrder,
)
from gruserve.metrics import Metrics
from gruserve.runtime.batcher import Batcher, StepOutput
from gruserve.runtime.limits import WorkLimits
from gruserve.runtime.model import LoadedModel
from gruserve.runtime.registry import ModelRegistry
from gruserve.runtime.validation import Chunk, StateValue, flat_state
from gruserve.sessions import _result, upgrade
from gruserve.sessions._locks import KeyedLocks
from gruserve.sessions._parts import SessionParts, seen
from gruserve.sessions.history import appended
from gruserve.sessions.lifecycle import STEP_ONLY, Lifecycle
from gruserve.sessions.owner import ANYONE, Caller, legacy_key, scoped, tenant_of
from gruserve.sessions.resend import create_once
from gruserve.sessions.store import (
    CREATE,
    MAX_PAGE,
    Kept,
    SessionPage,
    SessionRecord,
    SessionStore,
    SessionSummary,
)

SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
"""A valid session id, whole: always ``fullmatch`` (``$`` would let a final newline in)."""
STORE_KEY = re.compile(rf"(~[A-Za-z0-9][A-Za-z0-9._-]{{0,63}}~)?{SESSION_ID.pattern}")
"""A key a store may hold: a session id, in a named tenant's namespace or not
(:mod:`gruserve.sessions.owner`)."""


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
        history: timesteps of input each session keeps for upgrades with replay (0: none).
        on_version_gone: what a step does for a session whose version was removed from
            disk (:data:`gruserve.sessions.upgrade.OnVersionGone`).
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
        history: int = 0,
        on_version_gone: upgrade.OnVersionGone = "fail",
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"SessionService needs max_attempts >= 1. Received: {max_attempts!r}")
        self.registry, self.store = registry, store
        self.parts = SessionParts(
            store=store,
            batchers=batchers,
            locks=KeyedLocks(),
            clock=clock,
            limits=limits if limits is not None else WorkLimits(),
            metrics=metrics,
            max_timesteps=max_timesteps,
            max_attempts=max_attempts,
        )
        self.history, self._on_gone = history, on_version_gone

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

    def states_of(self, record: SessionRecord) -> dict[str, np.ndarray]:
        """The record's state as ``{state key: (units,)}``."""
        return self.model_of(record).signature.split_state(record.state)

    async def get(self, session_id: str, caller: Caller = ANYONE) -> SessionRecord:
        """The session ``caller`` names ``session_id``, if it may see it (else it does not
        exist for them). Its ``session_id`` is its store key (:meth:`Caller.shown` names it
        back)."""
        return seen(await self.parts.fetch(caller.key(session_id)), caller)

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
            ModelNotFound, ModelUnavailable, InvalidInput, TooManySessions.
            SessionExists: the id holds another session. A resend of this very create whose
                first send was stored (then answered 503) gets that session instead
                (:mod:`gruserve.sessions.resend`).
        """
        model = await self.model_named(model_name, version)
        if session_id is None:
            session_id = uuid.uuid4().hex
        else:
            _check_id(session_id)
        state = flat_state(model.signature, initial_state, "initial_state")
        key = caller.key(session_id)
        old = legacy_key(key)
        if old is not None:  # the tenant's session from before namespaces is still its own
            with suppress(SessionNotFound):
                if (await self.store.get(old)).owner == caller.name:
                    raise SessionExists(session_id)
        record = self._new(model, key, state, caller)
        return await create_once(self.store, record, self.parts.max_attempts)

    def _new(
        self, model: LoadedModel, key: str, state: np.ndarray, caller: Caller
    ) -> SessionRecord:
        now = self.parts.clock()
        return SessionRecord(
            key,
            model.name,
            model.version,
            state,
            created_at=now,
            last_used_at=now,
            owner=caller.name,
        )

    async def delete(self, session_id: str, caller: Caller = ANYONE) -> None:
        key = caller.key(session_id)
        async with self.parts.locks.hold(key):
            if caller is ANYONE or tenant_of(key):  # a named namespace holds only its own
                try:
                    await self.store.delete(key)
                    return
                except SessionNotFound:
                    if legacy_key(key) is None:
                        raise
            record = seen(await self.parts.fetch(key), caller)
            await self.store.delete(record.session_id)

    async def reset(
        self, session_id: str, states: StateValue | None = None, caller: Caller = ANYONE
    ) -> SessionRecord:
        """Zero the state, or set it to ``states`` (tf-keras ``reset_states(states=...)``)."""
        key = caller.key(session_id)
        async with self.parts.locks.hold(key):
            for _ in range(self.parts.max_attempts):
                record = seen(await self.parts.fetch(key), caller)
                state = flat_state((await self.model_for(record)).signature, states, "states")
                updated = record.reset(state, self.parts.clock())
                if await self.store.compare_and_set(updated, record.revision):
                    return updated
                self.parts.conflict()
        raise SessionConflict(session_id, self.parts.max_attempts)

    async def page(
        self,
        cursor: str | None = None,
        limit: int = 100,
        model: str | None = None,
        caller: Caller = ANYONE,
    ) -> SessionPage:
        """One page of every session ``caller`` sees, in store key order, each named (and
        ``next_cursor`` too) as the caller names it (:meth:`Caller.shown`), with its tenant
        as ``owner``; see :meth:`SessionStore.page` (a page may hold fewer than ``limit``
        sessions, even none, before the end).

        A named tenant's keys are one range (its namespace), read from its start and no
        further; tenant ``""`` reads the unscoped keys, which sort before every scoped one
        (each record read too, to leave out another tenant's stored there before
        namespaces); an admin reads every key. Sessions a named tenant kept from before
        namespaces are reachable by id but not listed.

        Raises:
            InvalidInput: ``limit`` outside 1..MAX_PAGE, or a cursor no session id can be.
        """
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput("limit", f"expected 1 to {MAX_PAGE}. Received: limit={limit}")
        start = None if cursor is None else caller.key(cursor)
        if start is not None and not STORE_KEY.fullmatch(start):
            raise InvalidInput("cursor", f"not a cursor this server returned: {cursor!r}")
        mine = scoped(caller.name, "") if not caller.admin else ""  # "": every key
        if mine and start is None:
            start = mine  # no key is the bare prefix: the namespace's first key follows it
        found = await self.store.page(start, limit, model)
        ahead = found.next_cursor
        sessions = found.sessions
        if caller.admin:
            pass
        elif mine:
            sessions = [s for s in sessions if s.session_id.startswith(mine)]
            ahead = ahead if ahead is not None and ahead.startswith(mine) else None
        else:
            sessions = await self._unscoped_own(sessions, caller)
            ahead = ahead if ahead is not None and not tenant_of(ahead) else None
        shown = [
            dataclasses.replace(
                s,
                session_id=caller.shown(s.session_id, s.owner),
                owner=tenant_of(s.session_id) or s.owner,
            )
            for s in sessions
        ]
        return SessionPage(shown, None if ahead is None else caller.shown(ahead))

    async def _unscoped_own(
        self, found: list[SessionSummary], caller: Caller
    ) -> list[SessionSummary]:
        """The sessions of ``found`` that tenant ``""`` owns (unscoped keys whose record
        names no other owner)."""
        found = [s for s in found if not tenant_of(s.session_id)]
        records = await asyncio.gather(
            *(self.store.get(s.session_id) for s in found), return_exceptions=True
        )
        for record in records:  # gone meanwhile, or the store failed: no owner to compare
            if isinstance(record, BaseException) and not isinstance(record, SessionNotFound):
                raise record
        return [
            summary
            for summary, record in zip(found, records, strict=True)
            if isinstance(record, SessionRecord) and caller.sees(record.owner)
        ]

    def servable(self, record: SessionRecord) -> bool:
        """Whether this server can continue ``record`` (a restored one): a valid id, its model
        version served, its state the size that model's states add up to."""
        try:
            model = self.registry.load_now(record.model, record.version)
        except GruServeError:
            return False
        return bool(STORE_KEY.fullmatch(record.session_id)) and record.state.shape == (
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
            SessionExists: a create names an id the caller holds on another model (or, from
                before namespaces, an unscoped id another tenant holds).
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
        key = caller.key(session_id)
        locks = self.parts.locks
        if not locks.try_acquire(key):  # the `async with locks.hold()` of the other
            await locks.acquire(key)  # methods, without its two coroutine calls
        try:
            kept = self.store.recent(key)
            if kept is not None:
                done = await self._step_kept(
                    kept, inputs, mask, step_number, caller, model_name, lifecycle, fresh
                )
                if done is not None:
                    return done
            chunk, applied = None, b""
            for _ in range(self.parts.max_attempts):
                try:
                    record = await self.parts.fetch(key)
                except SessionNotFound:
                    if fresh is None:
                        raise
                    record, expected = self._new(fresh[0], key, fresh[1], caller), CREATE
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
                    try:
                        model = await self.model_for(record)
                    except ModelVersionGone as gone:  # fail (410), or move it and re-read
                        if not await upgrade.after_gone(self, record, gone, self._on_gone):
                            self.parts.conflict()
                        continue
                if chunk is None:
                    chunk = self.parts.chunk(model.signature, inputs, mask)
                    if step_number is not None:
                        applied = _result.digest(chunk.inputs, chunk.mask, chunk.single)
                if step_number is not None and step_number != record.step:
                    replayed = self._replay(record, model, step_number, applied)
                    # written again unchanged: acknowledged only once the replicas have it (a
                    # resend after a 503 whose write reached the master alone gets 503 again)
                    if await self.store.compare_and_set(record, record.revision):
                        return replayed
                    self.parts.conflict()
                    continue
                out = await self.parts.batcher(model).submit(chunk.inputs, chunk.mask, record.state)
                outputs, updated = self._advanced(record, model, chunk, out, step_number, applied)
                if await self.store.compare_and_set(updated, expected, lifecycle.end):
                    return _stepped(model, outputs, updated, lifecycle)
                self.parts.conflict()
        finally:
            locks.release(key)
        raise SessionConflict(session_id, self.parts.max_attempts)

    async def _step_kept(
        self,
        kept: Kept,
        inputs: np.ndarray,
        mask: np.ndarray | None,
        step_number: int | None,
        caller: Caller,
        model_name: str | None,
        lifecycle: Lifecycle,
        fresh: tuple[LoadedModel, np.ndarray] | None,
    ) -> StepResult | None:
        """:meth:`step` on the record this server wrote last (``kept``), without reading it.

        Only a step that writes can come of it: the compare-and-set checks the stored
        revision *and* writer token against ``kept``'s, so it succeeds only if nobody wrote
        the session since (not even a delete and re-create that reached the same revision).
        Anything else (the record is another tenant's or on another model, its version is
        not loaded, a step number that is not the next one, invalid inputs, a failed batch,
        a lost or refused write) answers None and the caller does the whole step again
        from a fresh read, so no answer is ever decided on a stale record. Only a store
        failure of the write itself is raised: the write may have landed, and stepping
        again could apply it twice (a plain step raises it too).
        """
        record = kept.record
        model = self.registry.loaded(record.model, record.version)
        if (
            model is None
            or (caller is not ANYONE and not caller.sees(record.owner))
            or (fresh is not None and record.model != fresh[0].name)
            or (model_name is not None and record.model != model_name)
            or (step_number is not None and step_number != record.step)
        ):
            self._missed()
            return None
        try:
            chunk = self.parts.chunk(model.signature, inputs, mask)
            applied = (
                b""
                if step_number is None
                else _result.digest(chunk.inputs, chunk.mask, chunk.single)
            )
            out = await self.parts.batcher(model).submit(chunk.inputs, chunk.mask, record.state)
        except Exception:  # e.g. inputs that do not fit: decided again on the fresh record
            self._missed()
            return None
        outputs, updated = self._advanced(record, model, chunk, out, step_number, applied)
        try:
            written = await self.store.compare_and_set(
                updated, record.revision, lifecycle.end, kept.writer
            )
        except SessionNotFound:  # expired or deleted: the fresh read says which
            written = False
        if not written:
            self._missed()
            return None
        return _stepped(model, outputs, updated, lifecycle)

    def _missed(self) -> None:
        """Count a kept record's miss (:meth:`SessionParts.missed`); the caller then answers
        None, its cue to read."""
        self.parts.missed()

    def _advanced(
        self,
        record: SessionRecord,
        model: LoadedModel,
        chunk: Chunk,
        out: StepOutput,
        step_number: int | None,
        applied: bytes,
    ) -> tuple[list[np.ndarray], SessionRecord]:
        """A step's outputs as the client gets them and ``record`` advanced by the step (its
        result kept when it is numbered, its inputs when history is on)."""
        outputs = out.outputs
        if chunk.single and model.signature.per_timestep:
            outputs = [o[0] for o in outputs]
        kept = None if step_number is None else _result.pack(step_number, outputs, applied)
        kept_inputs = (
            appended(record.history, chunk.inputs, chunk.mask, self.history)
            if self.history
            else None
        )
        updated = record.advanced(out.state, chunk.timesteps, self.parts.clock(), kept, kept_inputs)
        return outputs, updated

    def _replay(
        self, record: SessionRecord, model: LoadedModel, step_number: int, applied: bytes
    ) -> StepResult:
        """The kept result of the session's last step, if ``step_number`` is that step's and
        ``applied`` (the resend's digest) is the one it was applied with."""
        if step_number == record.step - 1 and _result.base_of(record.last_result) == step_number:
            stored = _result.digest_of(record.last_result)
            if stored is not None and stored != applied:  # None: kept before digests were
                raise StepMismatch(record.session_id, step_number, record.step)
            if self.parts.metrics is not None:
                self.parts.metrics.step_replays.inc()
            outputs = _result.unpack(record.last_result or b"")
            return StepResult(
                dict(zip(model.signature.output_names, outputs, strict=True)), record.step, record
            )
        raise StepOutOfOrder(record.session_id, step_number, record.step)


def _stepped(
    model: LoadedModel, outputs: list[np.ndarray], updated: SessionRecord, lifecycle: Lifecycle
) -> StepResult:
    """The result of a step whose write ``updated`` was stored."""
    sig = model.signature
    return StepResult(
        dict(zip(sig.output_names, outputs, strict=True)),
        updated.step,
        updated,
        sig.split_state(updated.state) if lifecycle.end and lifecycle.final_state else None,
    )


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
