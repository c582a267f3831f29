"""Bulk steps: many sessions' steps from one request, applied together.

A gateway forwarding thousands of streams sends their steps in one request. A bulk
step means exactly what the same single steps would (same limits, locks,
compare-and-set and exactly-once numbers), at a fraction of the cost: the first step
of each session named in the request goes through the batch path
(:mod:`._batch`: one store read, one model submission and one
store write for all of them; the request's plain steps, when the codec gives them as
one array, through the array path of :mod:`._block` first, which
hands what it does not finish to the batch path), and whatever the batch path leaves (a
session busy with another request, a write that lost a race to another replica) and
every later step of a session named twice goes through :meth:`SessionService.step`,
after that session's earlier steps, in request order. One step's failure is that step's
result and never touches the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gruserve.sessions.bulk._batch import step_once_each
from gruserve.sessions.bulk._block import BlockAnswer, PlainBlock, step_block
from gruserve.sessions.lifecycle import STEP_ONLY, Lifecycle
from gruserve.sessions.owner import ANYONE, Caller
from gruserve.sessions.service import SessionService, StepResult


@dataclass(frozen=True, slots=True)
class BulkStep:
    """One decoded step of a bulk request (arrays as :meth:`SessionService.step` takes them)."""

    session_id: str
    inputs: np.ndarray
    mask: np.ndarray | None = None
    step_number: int | None = None
    lifecycle: Lifecycle = STEP_ONLY


Outcome = StepResult | BaseException
"""A step's result, or what it raised."""


async def step_all(
    sessions: SessionService,
    model: str,
    steps: Sequence[BulkStep | BaseException],
    caller: Caller = ANYONE,
) -> list[Outcome]:
    """Apply ``steps`` to sessions of ``model``; results in request order.

    An entry that is already an exception (it failed to decode) is passed through
    as its own outcome. The first step of each session goes through the batch path
    (unless it creates or ends its session: those take :meth:`SessionService.step`);
    the steps after it (and a first step that path leaves) are chained in request
    order (one task per session), which leaves the order of a session's steps to this
    module rather than to the order tasks happen to take its lock in.

    Args:
        sessions: the session service.
        model: the model every session must be on (others: ``SessionNotOnModel``).
        steps: decoded steps, or the error each undecodable one raised.
        caller: the tenant asking: another tenant's session is ``SessionNotFound``.

    Returns:
        One outcome per entry of ``steps``: a :class:`StepResult` or an exception.
    """
    outcomes, _ = await step_bulk(sessions, model, steps, caller)
    return [o if o is not None else RuntimeError("bulk step not run") for o in outcomes]


async def step_bulk(
    sessions: SessionService,
    model: str,
    steps: Sequence[BulkStep | BaseException | None],
    caller: Caller = ANYONE,
    block: PlainBlock | None = None,
) -> tuple[list[Outcome | None], BlockAnswer | None]:
    """:func:`step_all`, with the request's plain steps given as one array.

    Args:
        sessions, model, caller: as :func:`step_all`.
        steps: one entry per step of the request, as :func:`step_all`'s, None where the
            step is a row of ``block``.
        block: the plain steps as arrays (rows in request order), or None.

    Returns:
        One outcome per entry of ``steps`` (None: answered in the block answer, or a
        step that was not run, which only a bug leaves), and the block's answer (None
        without a block). The first step of a session whose steps are rows of the block
        goes through the array path; its later steps, and the rows that path leaves, are
        decided as :func:`step_all` decides other steps, in request order.
    """
    outcomes: list[Outcome | None] = [s if isinstance(s, BaseException) else None for s in steps]
    heads: list[tuple[int, BulkStep]] = []
    later: dict[str, list[tuple[int, BulkStep]]] = {}
    block_heads: list[int] = []  # rows of the block that are their session's first step
    row = 0
    for i, item in enumerate(steps):
        if item is None:  # the block's next row
            if block is None:
                raise ValueError(f"bulk step {i} is None without a block to find it in")
            session_id = block.ids[row]
            chain = later.get(session_id)
            if chain is None:
                later[session_id] = []
                block_heads.append(row)
            else:
                chain.append((i, block.step(row)))
            row += 1
            continue
        if isinstance(item, BaseException):
            continue
        chain = later.get(item.session_id)
        if chain is None:
            later[item.session_id] = []
            if item.lifecycle is STEP_ONLY:
                heads.append((i, item))
                continue
            chain = later[item.session_id]
        chain.append((i, item))
    answer = None
    if block is not None:
        answer, back = await step_block(sessions, model, block, block_heads, caller, outcomes)
        if back:
            heads = sorted(heads + back, key=lambda entry: entry[0])
    left = await step_once_each(sessions, model, heads, caller, outcomes)
    for entry in reversed(left):  # a head the batch path left runs before its session's others
        later[entry[1].session_id].insert(0, entry)

    async def run(chain: list[tuple[int, BulkStep]]) -> None:
        for i, item in chain:
            try:
                outcomes[i] = await sessions.step(
                    item.session_id,
                    item.inputs,
                    item.mask,
                    item.step_number,
                    caller,
                    model_name=model,
                    lifecycle=item.lifecycle,
                )
            except Exception as exc:  # one step's failure is its own result
                outcomes[i] = exc

    tasks = [asyncio.ensure_future(run(chain)) for chain in later.values() if chain]
    try:
        await asyncio.gather(*tasks)
    except BaseException:  # cancelled (client gone): stop the steps not yet applied
        for task in tasks:
            task.cancel()
        raise
    return outcomes, answer
