"""Dynamic batching of session steps: one :class:`Batcher` per model.

Steps of different sessions that arrive within a short window are stacked
into one onnxruntime run: inputs (B, T, F) right-padded with ``mask=False``
steps to the longest chunk (exact: a masked step carries the state), states
(B, U). No other module knows that steps are batched; callers ``await
submit(...)`` for one step and get that step's outputs and new state. A bulk
request's usual steps come as one block (``submit_block``): (n, T, F) inputs and
(n, U) states that run as batches of their own, answered as matrices, one future
per batch rather than per step.

Scheduling: a step that finds the model idle runs at once (waiting for
company only pays when the model is busy). While a batch runs, new steps
gather; the oldest waiting step's timer of ``max_delay_s`` starts when it
arrives, and a batch leaves when it is full or that timer has expired,
provided fewer than ``max_concurrent`` batches are running. So batches grow
with load by themselves, and the window bounds how long a step waits for
company. Every timer reads the event loop's clock, which is ``time.monotonic``.

Where a batch runs: in the thread pool, unless ``inline_below_s`` is set and
batches of its size (steps x padded timesteps) have recently taken less CPU time
than that; then on the event loop itself. Handing a run to a thread and back
costs the loop a wake-up and the GIL twice, and the run itself takes more CPU in
the pool than on the loop (1.7-1.9 x for the demo model's 64-row runs on a 2-core
VM, bench/README.md), which can outweigh a small model's whole batch; a
large model's run would stall every connection, so it stays in the pool, and so
does a batch of a size not measured yet. Run times are measured in both places,
per size class, so a model moves back to the pool when its runs grow slower
(load, longer chunks) and returns when they shrink. Because the pool's figure
runs high, a class whose pool runs average between the limit and twice it is
measured on the loop again every :attr:`RunTimes.PROBE_EVERY` pool runs (a probe,
whose time replaces the average): without it, a run that fits the limit on the
loop could stay in the pool for good on the strength of its pool times. With
inline running on, a step that finds the model idle waits one pass of the event
loop, so that the steps that pass reads join its batch before the size (and so
the place) is chosen; steps that gathered while a run was in the pool leave as
soon as it ends.

Checklist (STYLE §3): futures are made inside the running loop; a bounded
queue makes callers wait for room; a pooled batch runs as its own task, an
inline one as one callback; a failure fails only that batch's futures; a future
is resolved only if not done, and steps whose caller went away are dropped
before a run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

from gruserve.metrics import ModelMetrics
from gruserve.runtime.model import LoadedModel, RunResult

log = logging.getLogger(__name__)


class StepOutput(NamedTuple):
    """One step's share of a batch: ``outputs`` (T, D) or (D,) each, ``state`` (total_units,)."""

    outputs: list[np.ndarray]
    state: np.ndarray


class BlockOutput(NamedTuple):
    """A block's share of a run (:meth:`Batcher.submit_block`): ``outputs`` (rows, T, D) or
    (rows, D) each, ``states`` (rows, total_units)."""

    outputs: list[np.ndarray]
    states: np.ndarray


class _Timed(NamedTuple):
    result: RunResult
    seconds: float


class _Launched(NamedTuple):
    """A batch handed to the thread pool: its run, and what scattering its result needs."""

    running: asyncio.Future[_Timed]
    lengths: list[int]
    longest: int
    started: float  # the loop's clock, as steps' arrival times
    clock: float  # time.perf_counter(): uvloop's clock counts whole milliseconds


class RunTimes:
    """Recent run time of a model's batches, per class of ``cells`` (1, 2, 3-4, 5-8, ...).

    ``cells`` is rows x padded timesteps, what a run's time grows with: one
    step of 4096 timesteps is not expected to cost what 64 single steps cost.

    An exponential moving average per class: one slow run (a page fault, a
    descheduled thread) moves it a quarter of the way, a lasting change
    within a few runs.
    """

    WEIGHT = 0.25
    PROBE_EVERY = 64
    """Pool runs of a class between two probes on the loop (:meth:`probe_due`)."""

    def __init__(self) -> None:
        self._seconds: dict[int, float] = {}
        self._pooled: dict[int, int] = {}  # per class, pool runs since its last loop run

    @staticmethod
    def _size_class(cells: int) -> int:
        return (cells - 1).bit_length()

    def record(
        self, cells: int, seconds: float, *, inline: bool = False, probe: bool = False
    ) -> None:
        """A run of ``cells`` took ``seconds`` of CPU, on the loop (``inline``) or in the
        pool; a ``probe``'s time replaces the class's average instead of moving it."""
        key = self._size_class(cells)
        last = self._seconds.get(key)
        if last is None or probe:
            self._seconds[key] = seconds
        else:
            self._seconds[key] = last + self.WEIGHT * (seconds - last)
        # a class never run on the loop counts as due for a probe after its first pool run
        self._pooled[key] = 0 if inline else self._pooled.get(key, self.PROBE_EVERY - 1) + 1

    def expected(self, cells: int) -> float | None:
        """Seconds a batch of this many cells is expected to take; None before one has run."""
        return self._seconds.get(self._size_class(cells))

    def probe_due(self, cells: int, limit: float) -> bool:
        """Whether a batch of this many cells, expected at or over ``limit`` from its recent
        runs, should run on the loop once to be measured there: its average is under twice
        the limit (so within what the pool adds to a run that fits) and its class has had
        :attr:`PROBE_EVERY` pool runs since it last ran on the loop (or never did)."""
        key = self._size_class(cells)
        seconds = self._seconds.get(key)
        # ``record`` sets both entries of a class: one measured has its pool count
        return seconds is not None and seconds < 2 * limit and self._pooled[key] >= self.PROBE_EVERY


@dataclass(slots=True)
class _Item:
    """A queued step, or (``rows`` > 0) a block of that many steps that runs as a batch of
    its own: ``inputs`` (rows, T, F) and ``state`` (rows, total_units)."""

    inputs: np.ndarray
    mask: np.ndarray | None
    state: np.ndarray
    future: asyncio.Future[StepOutput] | asyncio.Future[BlockOutput]
    arrived: float
    rows: int = 0


class BatchTracer(Protocol):
    """What the batcher tells a tracer (:mod:`gruserve.tracing`), once per batch."""

    def batch_ran(
        self, model: str, batch: Sequence[_Item], started: float | None, error: Exception | None
    ) -> None:
        """``batch`` ran (``started``: the loop time it was launched; None if it failed
        before) and its callers have their answers, or ``error``."""


def _cells(batch: Sequence[_Item]) -> int:
    """Rows x timesteps of ``batch`` once padded to its longest step."""
    first = batch[0]
    if first.rows:  # a block: a batch of its own
        return first.rows * first.inputs.shape[1]
    return len(batch) * max(item.inputs.shape[0] for item in batch)


class Batcher:
    """Coalesces concurrent steps of one model into batched runs.

    Args:
        model: the model every step runs on.
        executor: thread pool for the blocking ``model.run``.
        max_batch_size: most steps per run (>= 1).
        max_delay_s: how long the oldest waiting step waits for company (>= 0).
        max_queue: steps that may wait before ``submit`` waits for room (>= 1).
        max_concurrent: batches of this model running at once (>= 1).
        inline_below_s: run a batch on the event loop when batches of its size recently
            took less than this (0 = always in the thread pool).
        metrics: labelled collectors of this model, or None.

    Raises:
        ValueError: a parameter is out of range.
    """

    def __init__(
        self,
        model: LoadedModel,
        executor: Executor,
        *,
        max_batch_size: int = 64,
        max_delay_s: float = 0.002,
        max_queue: int = 4096,
        max_concurrent: int = 1,
        inline_below_s: float = 0.0,
        metrics: ModelMetrics | None = None,
    ) -> None:
        for name, value, low in (
            ("max_batch_size", max_batch_size, 1),
            ("max_queue", max_queue, 1),
            ("max_concurrent", max_concurrent, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"Batcher needs {name} >= {low}. Received: {name}={value!r}")
        for name, seconds in (("max_delay_s", max_delay_s), ("inline_below_s", inline_below_s)):
            if not seconds >= 0:
                raise ValueError(f"Batcher needs {name} >= 0. Received: {name}={seconds!r}")
        self.model = model
        self.max_batch_size, self.max_delay_s = max_batch_size, float(max_delay_s)
        self._executor, self._max_queue, self._max_concurrent = executor, max_queue, max_concurrent
        self._metrics = metrics
        self.inline_below_s = float(inline_below_s)
        self.run_times = RunTimes()
        sig = model.signature
        self._pad_alignment = sig.pad_alignment
        self._slices = sig.state_slices
        self._pending: deque[_Item] = deque()
        self._room: deque[asyncio.Future[None]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._deferred: asyncio.Handle | None = None  # a pass of the loop before choosing
        self.tracer: BatchTracer | None = None  # set by gruserve.tracing when tracing is on

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def idle(self) -> bool:
        """No step waiting or running: the batcher can be dropped without failing any."""
        return not self._pending and not self._running and self._deferred is None

    def submit(
        self, inputs: np.ndarray, mask: np.ndarray | None, state: np.ndarray
    ) -> Awaitable[StepOutput]:
        """Run one validated step: ``inputs`` (T, F) or (T,) ids, ``mask`` (T,), flat ``state``.

        Returns what to await for the step's share of its batch: the step's future itself
        when the queue has room (every step pays for one coroutine less), else a coroutine
        that first waits for room.
        """
        if len(self._pending) >= self._max_queue:
            return self._submit_when_room(inputs, mask, state)
        return self._enqueue(inputs, mask, state)

    async def submit_many(
        self, steps: Sequence[tuple[np.ndarray, np.ndarray | None, np.ndarray]]
    ) -> list[asyncio.Future[StepOutput]]:
        """Queue several validated steps (``(inputs, mask, state)`` each, as :meth:`submit`)
        at once and return their futures, in order.

        A bulk request's steps: queued together and scheduled once, an idle model starts
        with all of them instead of the first one alone, and they still share batches with
        single steps. Waits while the queue is full, then queues them all (the queue may
        go past ``max_queue`` by one call's steps, which ``GRUSERVE_MAX_BULK_STEPS`` bounds).
        """
        loop = asyncio.get_running_loop()
        await self._room_in_queue(loop)
        now, items, futures = loop.time(), [], []
        for inputs, mask, state in steps:
            future: asyncio.Future[StepOutput] = loop.create_future()
            items.append(_Item(inputs, mask, state, future, now))
            futures.append(future)
        self._queue(loop, items)
        return futures

    async def submit_block(
        self, inputs: np.ndarray, states: np.ndarray
    ) -> list[asyncio.Future[BlockOutput]]:
        """Queue a block of validated steps, ``inputs`` (n, T, F) float32 with no mask and
        ``states`` (n, total_units), as runs of its own of up to ``max_batch_size`` rows;
        returns one future per run, in order, each answered with that run's
        :class:`BlockOutput`.

        A bulk request's usual steps: one queue entry, one future and one wake-up per run
        instead of per step, and no per-step split of the outputs (the caller reads rows of
        the run's matrices). Single steps queued before it run first; those queued after
        it wait for its runs. Waits while the queue is full, as :meth:`submit_many`.
        """
        loop = asyncio.get_running_loop()
        await self._room_in_queue(loop)
        now, size, count = loop.time(), self.max_batch_size, inputs.shape[0]
        items: list[_Item] = []
        futures: list[asyncio.Future[BlockOutput]] = []
        for start in range(0, count, size):
            end = min(count, start + size)
            future: asyncio.Future[BlockOutput] = loop.create_future()
            rows = end - start
            items.append(_Item(inputs[start:end], None, states[start:end], future, now, rows))
            futures.append(future)
        self._queue(loop, items)
        return futures

    async def _room_in_queue(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait while the queue is full (``max_queue``); a run taking steps off it wakes the
        waiters (``_room``)."""
        while len(self._pending) >= self._max_queue:
            room = loop.create_future()
            self._room.append(room)
            await room

    def _queue(self, loop: asyncio.AbstractEventLoop, items: list[_Item]) -> None:
        """Append ``items`` to the queue and schedule a run if one may start now (else the
        end of a run schedules)."""
        self._pending.extend(items)
        if items and len(self._running) < self._max_concurrent:
            self._schedule(loop)

    async def _submit_when_room(
        self, inputs: np.ndarray, mask: np.ndarray | None, state: np.ndarray
    ) -> StepOutput:
        await self._room_in_queue(asyncio.get_running_loop())
        return await self._enqueue(inputs, mask, state)

    def _enqueue(
        self, inputs: np.ndarray, mask: np.ndarray | None, state: np.ndarray
    ) -> asyncio.Future[StepOutput]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[StepOutput] = loop.create_future()
        self._pending.append(_Item(inputs, mask, state, future, loop.time()))
        if len(self._running) < self._max_concurrent:  # else the end of a run schedules
            self._schedule(loop)
        return future

    # -- scheduling ------------------------------------------------------------------
    def _schedule(self, loop: asyncio.AbstractEventLoop, gathered: bool = False) -> None:
        """Start what may start; ``gathered``: the waiting steps had a whole run to gather."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending = self._pending
        while pending and self._deferred is None and len(self._running) < self._max_concurrent:
            deadline = pending[0].arrived + self.max_delay_s
            if (
                self._running
                and len(pending) < self.max_batch_size
                and not pending[-1].rows  # a block waiting is a full batch
                and loop.time() < deadline
            ):
                self._timer = loop.call_at(deadline, self._schedule, loop)
                return
            if self.inline_below_s and not (gathered or self._running):
                self._deferred = loop.call_soon(self._start_deferred, loop)
            else:
                self._dispatch(self._take(), loop)
        self._release_room()

    def _start_deferred(self, loop: asyncio.AbstractEventLoop) -> None:
        self._deferred = None
        self._dispatch(self._take(), loop)
        self._schedule(loop)

    def _dispatch(self, batch: list[_Item], loop: asyncio.AbstractEventLoop) -> None:
        if not batch:
            return
        limit = self.inline_below_s
        if limit:
            cells = _cells(batch)
            expected = self.run_times.expected(cells)
            if expected is not None and expected < limit:
                self._run_inline(batch, loop)
                return
            if self.run_times.probe_due(cells, limit):
                self._run_inline(batch, loop, probe=True)
                return
        self._start(batch, loop)

    def _start(self, batch: list[_Item], loop: asyncio.AbstractEventLoop) -> None:
        task = loop.create_task(self._run(batch, self._launch(batch, loop), loop))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def _take(self) -> list[_Item]:
        """Pop the next batch, dropping steps whose caller has gone."""
        pending = self._pending
        batch: list[_Item] = []
        same_length = self._pad_alignment is None
        length = None
        skipped: list[_Item] = []
        while pending and len(batch) < self.max_batch_size:
            item = pending.popleft()
            if item.future.done():
                continue
            if item.rows:  # a block runs alone: first in its batch, or left for the next
                if batch:
                    pending.appendleft(item)
                else:
                    batch.append(item)
                break
            if same_length:  # padding is not exact for this model: batch equal lengths only
                length = item.inputs.shape[0] if length is None else length
                if item.inputs.shape[0] != length:
                    skipped.append(item)
                    continue
            batch.append(item)
        pending.extendleft(reversed(skipped))
        return batch

    def _release_room(self) -> None:
        while self._room and len(self._pending) < self._max_queue:
            room = self._room.popleft()
            if not room.done():
                room.set_result(None)

    # -- running -------------------------------------------------------------------------
    def _timed_run(
        self, inputs: np.ndarray, mask: np.ndarray | None, states: list[np.ndarray]
    ) -> _Timed:
        """Run, timing the CPU time of this thread: in the pool, wall time would include
        waiting for the GIL while the event loop holds it (up to 5 ms per switch), and keep
        a small model in the pool for good. onnxruntime's calling thread works through the
        whole run, with intra-op threads too, so this is how long the run would hold the
        loop."""
        start = time.thread_time()
        result = self.model.run(inputs, mask, states)
        return _Timed(result, time.thread_time() - start)

    def _launch(self, batch: list[_Item], loop: asyncio.AbstractEventLoop) -> _Launched:
        """Stack ``batch`` and hand it to the thread pool now, not in a task's first step: a
        task made here would run only after the callers the previous batch just woke."""
        started, clock = loop.time(), time.perf_counter()
        try:
            inputs, mask, states, lengths = self._stack(batch)
            running = loop.run_in_executor(self._executor, self._timed_run, inputs, mask, states)
        except Exception as exc:
            failed: asyncio.Future[_Timed] = loop.create_future()
            failed.set_exception(exc)
            return _Launched(failed, [], 0, started, clock)
        return _Launched(running, lengths, inputs.shape[1], started, clock)

    async def _run(
        self, batch: list[_Item], launched: _Launched, loop: asyncio.AbstractEventLoop
    ) -> None:
        try:
            timed = await launched.running
            self.run_times.record(len(launched.lengths) * launched.longest, timed.seconds)
            # the model is free: start the next batch before waking this one's callers, so
            # onnxruntime works while the event loop answers them
            self._running.discard(asyncio.current_task())  # type: ignore[arg-type]
            self._schedule(loop, gathered=True)
            shares = self._scatter(
                timed.result, launched.lengths, launched.longest, batch[0].rows > 0
            )
        except asyncio.CancelledError:
            launched.running.cancel()
            for item in batch:
                item.future.cancel()
            raise
        except Exception as exc:
            self._fail(batch, exc)
        else:
            self._resolve(batch, shares, launched.lengths, launched.started, launched.clock)
        finally:
            if asyncio.current_task() in self._running:  # not rescheduled above (a failure)
                self._running.discard(asyncio.current_task())  # type: ignore[arg-type]
                self._schedule(loop)

    def _run_inline(
        self, batch: list[_Item], loop: asyncio.AbstractEventLoop, probe: bool = False
    ) -> None:
        """Run ``batch`` on the event loop: only batches measured to be cheaper than a
        hand-off, and now and then one to measure it there (``probe``: :class:`RunTimes`)."""
        started, clock = loop.time(), time.perf_counter()
        try:
            inputs, mask, states, lengths = self._stack(batch)
            timed = self._timed_run(inputs, mask, states)
            self.run_times.record(
                len(lengths) * inputs.shape[1], timed.seconds, inline=True, probe=probe
            )
            shares = self._scatter(timed.result, lengths, inputs.shape[1], batch[0].rows > 0)
        except Exception as exc:
            self._fail(batch, exc)
        else:
            if self._metrics is not None:
                self._metrics.inline_batches.inc()
            self._resolve(batch, shares, lengths, started, clock)

    def _fail(self, batch: list[_Item], exc: Exception) -> None:
        if self._metrics is not None:
            self._metrics.batch_failures.inc()
        log.error("batch of %d steps on model %s failed", len(batch), self.model.name, exc_info=exc)
        if self.tracer is not None:
            self.tracer.batch_ran(self.model.name, batch, None, exc)
        for item in batch:
            if not item.future.done():
                item.future.set_exception(exc)

    def _resolve(
        self,
        batch: list[_Item],
        shares: list[StepOutput] | list[BlockOutput],
        lengths: list[int],
        started: float,
        clock: float,
    ) -> None:
        for item, share in zip(batch, shares, strict=True):
            if not item.future.done():
                item.future.set_result(share)  # type: ignore[arg-type]
        if self._metrics is not None:
            m = self._metrics
            m.batch_size.observe(len(lengths))
            m.batch_seconds.observe(time.perf_counter() - clock)
            m.queue_seconds.observe(started - batch[0].arrived)
            m.steps.inc(len(lengths))
            m.timesteps.inc(int(sum(lengths)))
        if self.tracer is not None:
            self.tracer.batch_ran(self.model.name, batch, started, None)

    def _stack(
        self, batch: Sequence[_Item]
    ) -> tuple[np.ndarray, np.ndarray | None, list[np.ndarray], list[int]]:
        first = batch[0]
        if first.rows:  # a block: its arrays are the batch's
            inputs, flat = first.inputs, first.state
            lengths = [inputs.shape[1]] * first.rows
            if len(self._slices) == 1:
                return inputs, None, [flat], lengths
            return inputs, None, [np.ascontiguousarray(flat[:, s]) for s in self._slices], lengths
        lengths = [item.inputs.shape[0] for item in batch]
        longest = max(lengths)
        if longest == 1 and all(item.mask is None for item in batch):  # the common single-step case
            inputs = np.concatenate([item.inputs for item in batch]).reshape(
                len(batch), 1, *batch[0].inputs.shape[1:]
            )
            mask = None
        elif longest == min(lengths) and all(item.mask is None for item in batch):
            inputs, mask = np.stack([item.inputs for item in batch]), None
        else:
            one = batch[0].inputs
            inputs = np.zeros((len(batch), longest, *one.shape[1:]), one.dtype)
            mask = np.zeros((len(batch), longest), np.bool_)
            for row, item in enumerate(batch):
                inputs[row, : lengths[row]] = item.inputs
                mask[row, : lengths[row]] = True if item.mask is None else item.mask
        flat = np.concatenate([item.state for item in batch]).reshape(len(batch), -1)
        if len(self._slices) == 1:
            states = [flat]
        else:
            states = [np.ascontiguousarray(flat[:, s]) for s in self._slices]
        return inputs, mask, states, lengths

    def _scatter(
        self, result: RunResult, lengths: list[int], longest: int, block: bool = False
    ) -> list[StepOutput] | list[BlockOutput]:
        count = len(lengths)
        if any(o.shape[0] != count for o in result.outputs + result.states):
            raise RuntimeError(
                f"model {self.model.name!r} returned batches of "
                f"{[o.shape[0] for o in result.outputs + result.states]} for {count} steps"
            )
        states = result.states
        flat = states[0] if len(states) == 1 else np.concatenate(states, axis=1)
        if block:  # the block's caller reads rows of the run's matrices
            return [BlockOutput(list(result.outputs), flat)]
        # each step keeps its own copy of its state row: a view would keep the whole batch alive
        rows = [row.copy() for row in flat]
        per_timestep = self.model.signature.per_timestep
        if not per_timestep or min(lengths) == longest:  # no padding: row views are the outputs
            columns = [list(o) for o in result.outputs]
            return [
                StepOutput([column[row] for column in columns], state)
                for row, state in enumerate(rows)
            ]
        from_end = self._pad_alignment == "end"
        shares = []
        for row, length in enumerate(lengths):
            start = longest - length if from_end else 0
            outputs = [o[row, start : start + length] for o in result.outputs]
            shares.append(StepOutput(outputs, rows[row]))
        return shares

    async def close(self) -> None:
        """Wait for running batches; fail steps that never started."""
        if self._timer is not None:
            self._timer.cancel()
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(RuntimeError("the server is shutting down"))
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
