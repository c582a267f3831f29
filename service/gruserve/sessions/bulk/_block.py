"""The array path of bulk steps: a request's usual steps as one (n, T, F) block.

Most bulk requests are nothing but plain steps: a session id and T float32 timesteps
each, no step number, mask or lifecycle. The batch path
(:mod:`._batch`) still spends a dozen Python objects on each of
them (a decoded step, checks, a queue item and a future in the batcher, a result per
output, a result object and its dict, the reply's pieces); at 64 steps a request that
was ~12 µs per step against ~3.4 µs for the model itself (bench/README.md). Here such
steps stay arrays from the request's bytes to the reply's: the values are checked once
for the block, the sessions' states are stacked into one matrix, the block runs through
the batcher as batches of its own (one future per batch), and the reply is read from the
run's output matrices. What remains per step is what the store needs: the lock, the
record read (none for a session this server wrote last: its kept record, see ``_apply``)
and the new record written.

The meaning is that of the batch path and so of :meth:`SessionService.step`: tenancy,
the model in the URL, the model version, then the values, the timesteps limit and the
reply's size. Whatever this path does not finish goes back to the batch path, which
decides it as before: the whole block when any check of the block fails (the batch
path names the bad step and field), and per row a session whose lock another request
holds, one on another version of the model, one maybe kept from before namespaces, and
a write that lost a compare-and-set race to another replica.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gruserve.errors import SessionNotFound, SessionNotOnModel
from gruserve.runtime.batcher import BlockOutput
from gruserve.runtime.model import LoadedModel
from gruserve.sessions.history import appended
from gruserve.sessions.owner import ANYONE, Caller, legacy_key
from gruserve.sessions.service import SessionService
from gruserve.sessions.store import SessionRecord, Write

if TYPE_CHECKING:
    from gruserve.sessions.bulk import BulkStep

Item = tuple[int, "BulkStep"]


@dataclass(frozen=True, slots=True)
class PlainBlock:
    """The plain steps of a bulk request, as arrays.

    Attributes:
        positions: each row's index in the request.
        ids: each row's session id, as sent.
        inputs: (rows, T, F) float32, row ``r`` the inputs of the step at ``positions[r]``
            (a read-only view of the request's bytes is fine).
    """

    positions: list[int]
    ids: list[str]
    inputs: np.ndarray

    def step(self, row: int) -> BulkStep:
        """Row ``row`` as a :class:`BulkStep`, for the paths that take one step at a time."""
        from gruserve.sessions.bulk import BulkStep

        return BulkStep(self.ids[row], self.inputs[row])


@dataclass(slots=True)
class BlockAnswer:
    """The block's rows this path answered.

    Attributes:
        slot: per block row, its row in ``outputs`` and ``steps``; -1 where the row's
            outcome is elsewhere (the bulk's outcome list).
        outputs: per output of the model, in its order: (answered, T, D), or
            (answered, D) for a model with one output per sequence.
        steps: per answered row, the session's step count after it.
    """

    slot: list[int]
    outputs: list[np.ndarray] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)


async def step_block(
    service: SessionService,
    model_name: str,
    block: PlainBlock,
    heads: Sequence[int],
    caller: Caller,
    outcomes: list[Any],
) -> tuple[BlockAnswer, list[Item]]:
    """Apply the block's rows ``heads`` (no session named twice) together.

    Args:
        service: the session service.
        model_name: the model every session must be on.
        block: the request's plain steps.
        heads: the rows to apply, in request order.
        caller: the tenant asking.
        outcomes: one slot per request entry: a row's error goes to its position's slot.

    Returns:
        The answered rows, and the ``(position, BulkStep)`` rows left to the batch path,
        in request order.
    """
    answer = BlockAnswer([-1] * len(block.ids))
    if not heads:
        return answer, []
    try:
        model = service.registry.get(model_name)
    except Exception as exc:  # the model went away: every step's error
        for row in heads:
            outcomes[block.positions[row]] = exc
        return answer, []
    if not _fits(service, model, block):
        return answer, [(block.positions[row], block.step(row)) for row in heads]
    locks = service.parts.locks
    keys, held, left = locks.take_free((caller.key(block.ids[row]), row) for row in heads)
    try:
        left += await _apply(service, model, block, held, keys, caller, outcomes, answer)
    finally:
        for key in keys:
            locks.release(key)
    left.sort()
    return answer, [(block.positions[row], block.step(row)) for row in left]


def _fits(service: SessionService, model: LoadedModel, block: PlainBlock) -> bool:
    """The checks :func:`~gruserve.runtime.validation.check_chunk` and the reply limit
    make of each step, made once for the block: a model of float features, no fixed
    length, T within the limit, finite values in float32's range, a reply within its
    limit. A block that fails any is left to the batch path, which names the failure per
    step."""
    sig = model.signature
    inputs = block.inputs
    if sig.takes_token_ids or sig.static_timesteps is not None or inputs.dtype != np.float32:
        return False
    timesteps = inputs.shape[1]
    if inputs.shape[2] != sig.features or not 1 <= timesteps <= service.parts.max_timesteps:
        return False
    if not np.isfinite(inputs).all():
        return False
    try:
        service.parts.limits.check_reply(sig, 1, timesteps)
    except Exception:  # too large a reply: the batch path answers it per step
        return False
    return True


async def _apply(
    service: SessionService,
    model: LoadedModel,
    block: PlainBlock,
    held: list[int],
    keys: list[str],
    caller: Caller,
    outcomes: list[Any],
    answer: BlockAnswer,
) -> list[int]:
    """Read, run and write the rows ``held`` (their locks taken); returns the rows left.

    A row whose record this server wrote last starts from the kept record instead of a
    read (:meth:`~gruserve.sessions.store.SessionStore.recent`) and writes with its token
    as ``base``. As in :meth:`SessionService.step`, only a successful write may come of
    such a row: one that fails any check of its record, or whose run or write does not
    succeed, is left to the batch path, which reads the session afresh (a kept record's
    miss)."""
    if not held:
        return []
    positions, store, parts = block.positions, service.store, service.parts
    kept = [store.recent(key) for key in keys]
    reading = [key for key, found in zip(keys, kept, strict=True) if found is None]
    read: list[SessionRecord | Exception] = []
    if reading:
        try:
            read = await store.get_many(reading)
        except Exception as exc:  # the store is down: every step's error
            again: list[int] = []
            for row, found in zip(held, kept, strict=True):
                if found is None:
                    outcomes[positions[row]] = exc
                else:  # decided afresh, not on the kept record
                    parts.missed()
                    again.append(row)
            return again
    left: list[int] = []
    rows: list[int] = []
    taken: list[SessionRecord] = []  # the record of each row in ``rows``
    bases: list[str] = []  # per row in ``rows``, its kept record's writer ("": read)
    name, version = model.name, model.version
    fresh = iter(read)
    for row, key, found in zip(held, keys, kept, strict=True):
        if found is not None:
            record = found.record
            if (
                (caller is not ANYONE and not caller.sees(record.owner))
                or record.model != name
                or record.version != version
            ):
                parts.missed()
                left.append(row)  # any answer but a write: decided on a fresh read
            else:
                rows.append(row)
                taken.append(record)
                bases.append(found.writer)
            continue
        got = next(fresh)
        if isinstance(got, Exception):
            if isinstance(got, SessionNotFound) and legacy_key(key):
                left.append(row)  # maybe kept from before namespaces: the batch path looks
            else:
                outcomes[positions[row]] = got
            continue
        record = got
        if caller is not ANYONE and not caller.sees(record.owner):
            outcomes[positions[row]] = SessionNotFound(record.session_id)
        elif record.model != name:
            outcomes[positions[row]] = SessionNotOnModel(record.session_id, record.model, name)
        elif record.version != version:  # its own version: the batch path loads it
            left.append(row)
        else:
            rows.append(row)
            taken.append(record)
            bases.append("")
    if not rows:
        return left
    inputs = block.inputs if len(rows) == len(block.ids) else block.inputs[rows]
    states = np.concatenate([record.state for record in taken]).reshape(len(rows), -1)
    batcher = service.parts.batcher(model)
    futures = await batcher.submit_block(inputs, states)
    try:
        runs: list[BlockOutput | BaseException] = []
        for future in futures:
            try:
                runs.append(await future)
            except Exception as exc:  # that run failed: its steps' error
                runs.append(exc)
    except BaseException:  # cancelled (client gone): drop the runs not started
        for future in futures:
            future.cancel()
        raise
    size = batcher.max_batch_size  # the rows of each run but the last
    return left + await _write(
        service, block, rows, taken, bases, inputs, runs, size, outcomes, answer
    )


async def _write(
    service: SessionService,
    block: PlainBlock,
    rows: list[int],
    taken: list[SessionRecord],
    bases: list[str],
    inputs: np.ndarray,
    runs: list[BlockOutput | BaseException],
    size: int,
    outcomes: list[Any],
    answer: BlockAnswer,
) -> list[int]:
    """Write the new records of the rows that ran (``runs`` of ``size`` rows each, the last
    one maybe fewer), in one call; answer those written. A row based on a kept record
    (its ``bases`` entry set) that is not written is left to the batch path."""
    positions, parts = block.positions, service.parts
    lost: list[int] = []
    ran: list[int] = []  # indices into rows whose run succeeded
    outputs: list[list[np.ndarray]] = []
    states: list[np.ndarray] = []
    for number, run in enumerate(runs):
        start = number * size
        chunk = range(start, min(len(rows), start + size))
        if isinstance(run, BaseException):
            for i in chunk:
                if bases[i]:  # decided again on a fresh read
                    parts.missed()
                    lost.append(rows[i])
                else:
                    outcomes[positions[rows[i]]] = run
            continue
        ran.extend(chunk)
        outputs.append(run.outputs)
        states.append(run.states)
    if not ran:
        return lost
    # each record keeps its own copy of its row: a view would keep the whole run alive
    new = states[0] if len(states) == 1 else np.concatenate(states)
    timesteps, now, history = inputs.shape[1], parts.clock(), service.history
    writes: list[Write] = []
    for k, i in enumerate(ran):
        record = taken[i]
        kept = appended(record.history, inputs[i], None, history) if history else None
        updated = record.advanced(new[k].copy(), timesteps, now, None, kept)
        writes.append((updated, record.revision, bases[i]))  # base "": not checked
    try:
        answers = await service.store.compare_and_set_many(writes)
    except Exception as exc:  # the store failed: as a single step's write would
        for i in ran:
            outcomes[positions[rows[i]]] = exc
        return lost
    matrices = (
        outputs[0] if len(outputs) == 1 else [np.concatenate(o) for o in zip(*outputs, strict=True)]
    )
    keep: list[int] = []  # rows of the matrices that are answered
    slot, steps = answer.slot, answer.steps
    for k, (i, written) in enumerate(zip(ran, answers, strict=True)):
        row = rows[i]
        if written is True:
            slot[row] = len(keep)
            keep.append(k)
            steps.append(writes[k][0].step)
        elif bases[i] and (written is False or isinstance(written, SessionNotFound)):
            parts.missed()  # its kept record went stale: the batch path reads afresh
            lost.append(row)
        elif isinstance(written, Exception):
            outcomes[positions[row]] = written
        else:  # another replica advanced it: the batch path re-reads and recomputes
            parts.conflict()
            lost.append(row)
    if len(keep) == len(ran):
        answer.outputs = list(matrices)
    else:
        answer.outputs = [m[keep] for m in matrices]
    return lost
