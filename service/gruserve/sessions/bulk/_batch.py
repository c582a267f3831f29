"""The batch path of bulk steps: one pass over a request's sessions instead of one step each.

Going through :meth:`SessionService.step` once per session costs a coroutine, a lock,
a store read, a batcher submission and a store write per step, about 30 µs of event
loop time each: a 64-step request spent more time there than in the model. Here the
steps of distinct sessions share each stage: the locks are taken in one loop, the
records read in one store call (one Redis round trip; none for the sessions this server
wrote last, see ``_apply``), the inputs checked for NaN in one reduction, queued to the
batcher in one call (so they run together and still share batches with single steps),
and the new records written in one compare-and-set call, each write decided on its own.

The meaning is that of :meth:`SessionService.step`, checked in the same order:
tenancy (another tenant's session is not found), the model in the URL, the model
version, the inputs and the reply's size, then the step number (a numbered step that
is not the next one, a resend say, is left to the per-step path, which answers it with
its kept result once that is written again). A step is answered
only once its state is written. What this path does not finish it hands back to
the per-step path, which behaves as it always has: a session whose lock another
request holds (it queues behind it there), and a write that lost a compare-and-set
race to another replica (re-read and recomputed there).

It works with the service's internals (its locks, batchers, checks and clock), as
a part of the session service kept in its own module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from gruserve.errors import SessionNotFound, SessionNotOnModel
from gruserve.runtime.batcher import StepOutput
from gruserve.runtime.model import LoadedModel
from gruserve.runtime.signature import ModelSignature
from gruserve.sessions import _result
from gruserve.sessions.history import appended
from gruserve.sessions.owner import ANYONE, Caller, legacy_key
from gruserve.sessions.service import SessionService, StepResult
from gruserve.sessions.store import SessionRecord, Write

if TYPE_CHECKING:
    from gruserve.sessions.bulk import BulkStep

_FLOAT32_MAX = float(np.finfo(np.float32).max)
Item = tuple[int, "BulkStep"]
"""A step of the request: its position there, and the step."""


@dataclass(slots=True)
class _Ready:
    """A step that passed its checks: what to run and what to write."""

    index: int
    item: BulkStep  # the step, handed back to the per-step path if its write loses
    record: SessionRecord
    inputs: np.ndarray
    mask: np.ndarray | None
    single: bool
    applied: bytes  # the inputs' digest, for numbered steps
    base: str = ""  # the writer of the kept record it starts from ("": read)


async def step_once_each(
    service: SessionService,
    model_name: str,
    heads: Sequence[Item],
    caller: Caller,
    outcomes: list[Any],
) -> list[Item]:
    """Apply ``heads`` (steps of distinct sessions) together, setting ``outcomes[index]``.

    Args:
        service: the session service.
        model_name: the model every session must be on.
        heads: ``(index, BulkStep)`` pairs, no session named twice.
        caller: the tenant asking.
        outcomes: one slot per request entry; each head's slot gets its
            :class:`StepResult` or exception, unless the head is returned.

    Returns:
        The heads left to the per-step path (lock held elsewhere, compare-and-set lost),
        in request order.
    """
    locks = service.parts.locks
    # keys: the store key of each held step's session
    keys, held, rest = locks.take_free((caller.key(e[1].session_id), e) for e in heads)
    try:
        lost = await _apply(service, model_name, held, keys, caller, outcomes)
    finally:
        for key in keys:
            locks.release(key)
    return sorted(rest + lost, key=lambda entry: entry[0])


async def _apply(
    service: SessionService,
    model_name: str,
    held: list[Item],
    keys: list[str],
    caller: Caller,
    outcomes: list[Any],
) -> list[Item]:
    """Read, run and write the steps ``held`` (their locks taken); returns those left.

    A session this server wrote last starts from its kept record instead of a read
    (:meth:`~gruserve.sessions.store.SessionStore.recent`) and is written with its token as
    ``base``. As in :meth:`SessionService.step`, only a successful write may come of such
    a step: any other outcome (a failed check, run or write) is left to the per-step path,
    which decides it on a fresh read (a kept record's miss)."""
    if not held:
        return []
    store = service.store
    try:
        model = service.registry.get(model_name)
    except Exception as exc:  # the model went away: every step's error
        for index, _ in held:
            outcomes[index] = exc
        return []
    kept = [store.recent(key) for key in keys]
    others: list[Item] = []  # on another version than the default, or maybe stored unscoped
    reading = [key for key, found in zip(keys, kept, strict=True) if found is None]
    try:
        read = await store.get_many(reading) if reading else []
    except Exception as exc:  # the store is down: every step's error
        for item, found in zip(held, kept, strict=True):
            if found is None:
                outcomes[item[0]] = exc
            else:  # decided afresh, not on the kept record
                service.parts.missed()
                others.append(item)
        return others
    fresh = iter(read)
    records = [next(fresh) if found is None else found.record for found in kept]
    bases = ["" if found is None else found.writer for found in kept]
    ready = _checked(service, model, held, records, bases, caller, outcomes, others)
    if not ready:
        return others
    futures = await service.parts.batcher(model).submit_many(
        [(r.inputs, r.mask, r.record.state) for r in ready]
    )
    try:
        shares: list[StepOutput | BaseException] = []
        for future in futures:
            try:
                shares.append(await future)
            except Exception as exc:  # the batch failed: that step's error
                shares.append(exc)
    except BaseException:  # cancelled (client gone): drop the steps not run yet
        for future in futures:
            future.cancel()
        raise
    return others + await _write(service, model, ready, shares, outcomes)


def _checked(
    service: SessionService,
    model: LoadedModel,
    held: list[Item],
    records: Sequence[SessionRecord | Exception],
    bases: Sequence[str],
    caller: Caller,
    outcomes: list[Any],
    others: list[Item],
) -> list[_Ready]:
    """The steps that pass :meth:`SessionService.step`'s checks; the others' errors go to
    ``outcomes``, and steps of sessions on another version of the model than ``model`` (the
    default), a named tenant's misses (its session may be one kept from before
    namespaces) and numbered steps that are not the next one (resends) to ``others``, for
    the per-step path. A step based on a kept record (its ``bases`` entry set) goes to
    ``others`` instead of getting any error (its fresh record decides)."""
    sig = model.signature
    missed = service.parts.missed

    def again(index: int, item: BulkStep) -> None:  # a kept record's miss: read afresh
        missed()
        others.append((index, item))

    def failed(index: int, item: BulkStep, base: str, exc: Exception) -> None:
        if base:
            again(index, item)
        else:
            outcomes[index] = exc

    features = sig.features
    # the usual step: (T, features) or (features,) numbers, no mask, T the model takes. Its
    # values are checked and made float32 once for all such steps (one block, each step a
    # view of it), and the reply limit once per T; anything else gets the per-step check
    plain_ok = not sig.takes_token_ids and sig.static_timesteps is None
    max_t = service.parts.max_timesteps
    candidates: list[list[Any]] = []  # [index, item, record, inputs, mask, single, base]
    plain: list[int] = []  # positions in candidates whose values are checked as one block
    reply_checked: set[int] = set()
    for (index, item), record, base in zip(held, records, bases, strict=True):
        try:
            if isinstance(record, Exception):
                if isinstance(record, SessionNotFound) and legacy_key(caller.key(item.session_id)):
                    others.append((index, item))  # maybe kept from before namespaces: the
                    continue  # per-step path looks there
                raise record
            if caller is not ANYONE and not caller.sees(record.owner):
                raise SessionNotFound(record.session_id)
            if record.model != model.name:
                raise SessionNotOnModel(record.session_id, record.model, model.name)
            if record.version != model.version:  # its own version: the per-step path
                if base:
                    missed()
                others.append((index, item))
                continue
            x, mask = item.inputs, item.mask
            single = x.ndim == 1
            if (
                plain_ok
                and mask is None
                and x.dtype.kind == "f"
                and x.shape[-1] == features
                and (single or (x.ndim == 2 and 1 <= x.shape[0] <= max_t))
            ):
                x = x.reshape(1, -1) if single else x
                if x.shape[0] not in reply_checked:
                    service.parts.limits.check_reply(sig, 1, x.shape[0])
                    reply_checked.add(x.shape[0])
                plain.append(len(candidates))
                candidates.append([index, item, record, x, None, single, base])
            else:
                chunk = service.parts.chunk(sig, x, mask)
                entry = [index, item, record, chunk.inputs, chunk.mask, chunk.single, base]
                candidates.append(entry)
        except Exception as exc:
            failed(index, item, base, exc)
    bad = _block_checked(service, sig, candidates, plain, outcomes) if plain else set()
    ready: list[_Ready] = []
    for p, (index, item, record, inputs, mask, single, base) in enumerate(candidates):
        if p in bad:
            if base:  # its error is decided again on the fresh record
                outcomes[index] = None
                again(index, item)
            continue
        number = item.step_number
        if number is not None and number != record.step:
            # a resend (or out of order): the per-step path answers it, writing the kept
            # result again first so WAIT counts it (gruserve.sessions.resend)
            if base:
                missed()
            others.append((index, item))
            continue
        try:
            applied = b"" if number is None else _result.digest(inputs, mask, single)
        except Exception as exc:
            failed(index, item, base, exc)
            continue
        ready.append(_Ready(index, item, record, inputs, mask, single, applied, base))
    return ready


def _block_checked(
    service: SessionService,
    sig: ModelSignature,
    candidates: list[list[Any]],
    plain: list[int],
    outcomes: list[Any],
) -> set[int]:
    """Check the plain steps' values as one block (finite, in float32's range) and give
    each its float32 view of it; if the block fails, check each step on its own (naming
    the bad value as a single step does). Returns the positions of the failed steps."""
    block = np.concatenate([candidates[p][3] for p in plain])
    if block.dtype == np.float32:
        ok = bool(np.isfinite(block).all())
    else:  # NaN fails the comparison too
        ok = bool(np.abs(block).max() <= _FLOAT32_MAX)
    if ok:
        block = block.astype(np.float32, copy=False)
        row = 0
        for p in plain:
            rows = candidates[p][3].shape[0]
            candidates[p][3] = block[row : row + rows]
            row += rows
        return set()
    bad = set()
    for p in plain:
        entry = candidates[p]
        try:
            entry[3] = service.parts.chunk(sig, entry[1].inputs, None).inputs
        except Exception as exc:
            outcomes[entry[0]] = exc
            bad.add(p)
    return bad


async def _write(
    service: SessionService,
    model: LoadedModel,
    ready: list[_Ready],
    shares: list[StepOutput | BaseException],
    outcomes: list[Any],
) -> list[Item]:
    """Write every computed step's record in one call; answer the steps written."""
    sig = model.signature
    names, per_timestep = sig.output_names, sig.per_timestep
    one, first = len(names) == 1, names[0]
    now, history = service.parts.clock(), service.history
    written: list[tuple[_Ready, SessionRecord, list[np.ndarray]]] = []
    lost: list[Item] = []
    for step, share in zip(ready, shares, strict=True):
        if isinstance(share, BaseException):
            if step.base:  # decided again on a fresh read
                service.parts.missed()
                lost.append((step.index, step.item))
            else:
                outcomes[step.index] = share
            continue
        outputs = share.outputs
        if step.single and per_timestep:
            outputs = [o[0] for o in outputs]
        number = step.item.step_number
        kept = None if number is None else _result.pack(number, outputs, step.applied)
        timesteps = int(step.inputs.shape[0])
        record = step.record
        kept_inputs = appended(record.history, step.inputs, step.mask, history) if history else None
        written.append(
            (step, record.advanced(share.state, timesteps, now, kept, kept_inputs), outputs)
        )
    if not written:
        return lost
    # base "" (a step that read its record): the write checks the revision only
    writes: list[Write] = [(new, step.record.revision, step.base) for step, new, _ in written]
    try:
        answers = await service.store.compare_and_set_many(writes)
    except Exception as exc:  # the store failed: as a single step's write would
        for step, _, _ in written:
            outcomes[step.index] = exc
        return lost
    for (step, updated, outputs), answer in zip(written, answers, strict=True):
        if step.base and (answer is False or isinstance(answer, SessionNotFound)):
            service.parts.missed()  # its kept record went stale: read afresh
            lost.append((step.index, step.item))
        elif isinstance(answer, Exception):
            outcomes[step.index] = answer
        elif answer:
            named = {first: outputs[0]} if one else dict(zip(names, outputs, strict=True))
            outcomes[step.index] = StepResult(named, updated.step, updated)
        else:  # another replica advanced it: the per-step path re-reads and recomputes
            service.parts.conflict()
            lost.append((step.index, step.item))
    return lost
