"""Bulk steps: many sessions' steps from one request, applied together.

A gateway forwarding thousands of streams sends their steps in one request. Each
step goes through :meth:`SessionService.step` unchanged (same limits, locks,
compare-and-set and exactly-once numbers), so a bulk step means exactly what the
same single steps would. Steps of different sessions run concurrently, so they
meet in the same batches; steps of one session run one after the other in request
order. One step's failure is that step's result and never touches the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

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
    as its own outcome. Steps naming the same session are chained in request order
    (one task per session), which leaves the order of a session's steps to this
    module rather than to the order tasks happen to take its lock in.

    Args:
        sessions: the session service.
        model: the model every session must be on (others: ``SessionNotOnModel``).
        steps: decoded steps, or the error each undecodable one raised.
        caller: the tenant asking: another tenant's session is ``SessionNotFound``.

    Returns:
        One outcome per entry of ``steps``: a :class:`StepResult` or an exception.
    """
    outcomes: list[Outcome | None] = [s if isinstance(s, BaseException) else None for s in steps]
    by_session: dict[str, list[tuple[int, BulkStep]]] = {}
    for i, item in enumerate(steps):
        if not isinstance(item, BaseException):
            by_session.setdefault(item.session_id, []).append((i, item))

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

    tasks = [asyncio.ensure_future(run(chain)) for chain in by_session.values()]
    try:
        await asyncio.gather(*tasks)
    except BaseException:  # cancelled (client gone): stop the steps not yet applied
        for task in tasks:
            task.cancel()
        raise
    return [o if o is not None else RuntimeError("bulk step not run") for o in outcomes]
