"""The batcher: coalescing, exact padding, failure isolation, cancellation, backpressure."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from gruserve.metrics import Metrics
from gruserve.repository import ModelRepository
from gruserve.runtime.batcher import Batcher, RunTimes
from gruserve.runtime.model import LoadedModel

ATOL = 1e-5


class Recording(LoadedModel):
    """The real model, recording each batch's shape; optionally held or failing on demand."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.shapes: list[tuple[int, ...]] = []
        self.threads: list[threading.Thread] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = False
        self.entered = 0
        self.busy_s = 0.0  # CPU time each run burns on top of the model's own
        self.pool_busy_s = 0.0  # and more, off the loop's thread (what a hand-off adds)
        self.loop_thread = threading.current_thread()

    def run(self, inputs: np.ndarray, mask: Any, states: Any) -> Any:
        self.entered += 1
        self.gate.wait(10)
        self.shapes.append(inputs.shape)
        self.threads.append(threading.current_thread())
        extra = self.pool_busy_s if threading.current_thread() is not self.loop_thread else 0.0
        until = time.thread_time() + self.busy_s + extra
        while time.thread_time() < until:
            pass
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        return super().run(inputs, mask, states)


@pytest.fixture
def executor() -> Any:
    with ThreadPoolExecutor(2) as pool:
        yield pool


def _model(models_dir: Path, name: str) -> Recording:
    return Recording(ModelRepository(models_dir).resolve(name), ["CPUExecutionProvider"], 1)


def test_parameters_are_validated(
    models_dir: Path, tiny_models: dict[str, Any], executor: Any
) -> None:
    model = _model(models_dir, "simple")
    for kwargs in (
        {"max_batch_size": 0},
        {"max_delay_s": -1.0},
        {"max_queue": 0},
        {"max_concurrent": 0},
        {"inline_below_s": -0.001},
    ):
        with pytest.raises(ValueError, match="Received"):
            Batcher(model, executor, **kwargs)


@pytest.mark.parametrize("name", ["stacked", "backwards", "last_only", "tokens"])
async def test_mixed_lengths_batch_equals_each_alone(
    models_dir: Path,
    tiny_models: dict[str, Any],
    executor: Any,
    name: str,
    rng: np.random.Generator,
) -> None:
    model = _model(models_dir, name)
    metrics = Metrics(CollectorRegistry())
    batcher = Batcher(
        model, executor, max_batch_size=16, max_delay_s=0.05, metrics=metrics.for_model(name)
    )
    sig = model.signature
    lengths = [1, 4, 2, 7, 3, 1]
    if sig.takes_token_ids:
        xs = [rng.integers(0, 10, size=n).astype(np.int64) for n in lengths]
    else:
        xs = [rng.normal(size=(n, 3)).astype(np.float32) for n in lengths]
    starts = [rng.normal(size=sig.total_units).astype(np.float32) for _ in lengths]
    masks = [None, None, np.array([True, False]), None, np.array([False, True, True]), None]

    model.gate.clear()  # hold the first run so that the others queue up behind it
    triples = zip(xs, masks, starts, strict=True)
    tasks = [asyncio.ensure_future(batcher.submit(x, m, s)) for x, m, s in triples]
    await asyncio.sleep(0.05)
    model.gate.set()
    results = await asyncio.gather(*tasks)
    assert [shape[0] for shape in model.shapes] == [
        1,
        5,
    ]  # idle: the first went alone; the rest together

    for x, m, s, got in zip(xs, masks, starts, results, strict=True):
        alone = LoadedModel.run(
            model, x[None], None if m is None else m[None], [s[None, sl] for sl in sig.state_slices]
        )
        for out_got, out_alone in zip(got.outputs, alone.outputs, strict=True):
            np.testing.assert_allclose(out_got, out_alone[0], atol=ATOL)
        np.testing.assert_allclose(
            got.state, np.concatenate([st[0] for st in alone.states]), atol=ATOL
        )
    assert metrics.batch_size.labels(name)._sum.get() == 6


async def test_window_waits_for_company_while_busy(
    models_dir: Path, tiny_models: dict[str, Any], executor: Any
) -> None:
    model = _model(models_dir, "simple")
    window_s = 1.0  # checked 0.1 s in: a machine would have to stall 0.9 s to fail it
    batcher = Batcher(model, executor, max_batch_size=3, max_delay_s=window_s, max_concurrent=2)
    x, s = np.zeros((1, 3), np.float32), np.zeros(4, np.float32)
    model.gate.clear()
    first = asyncio.ensure_future(batcher.submit(x, None, s))  # idle model: runs at once (held)
    await asyncio.sleep(0.02)
    submitted = time.monotonic()
    second = asyncio.ensure_future(batcher.submit(x, None, s))  # busy: waits for company...
    await asyncio.sleep(0.1)
    assert model.entered == 1
    while model.entered < 2:  # ...until its window expires, then runs beside the first
        assert time.monotonic() - submitted < 30, "the window never expired"
        await asyncio.sleep(0.01)
    assert time.monotonic() - submitted >= window_s  # not before (sleeps only last longer)
    model.gate.set()
    await asyncio.gather(first, second)
    full = [asyncio.ensure_future(batcher.submit(x, None, s)) for _ in range(4)]
    await asyncio.gather(*full)  # 1 at once, then a full batch of 3 leaves without waiting
    assert [shape[0] for shape in model.shapes][2:] == [1, 3]


async def test_a_failing_batch_fails_only_its_steps(
    models_dir: Path, tiny_models: dict[str, Any], executor: Any
) -> None:
    model = _model(models_dir, "simple")
    batcher = Batcher(model, executor, max_batch_size=8, max_delay_s=0.01)
    x, s = np.zeros((1, 3), np.float32), np.zeros(4, np.float32)
    model.fail_next = True
    model.gate.clear()
    doomed = asyncio.ensure_future(batcher.submit(x, None, s))
    await asyncio.sleep(0.01)
    fine = [asyncio.ensure_future(batcher.submit(x, None, s)) for _ in range(3)]
    await asyncio.sleep(0.01)
    model.gate.set()
    with pytest.raises(RuntimeError, match="boom"):
        await doomed
    results = await asyncio.gather(*fine)
    assert len(results) == 3 and all(r.state.shape == (4,) for r in results)


async def test_cancelled_steps_are_dropped_and_queue_is_bounded(
    models_dir: Path, tiny_models: dict[str, Any], executor: Any
) -> None:
    model = _model(models_dir, "simple")
    batcher = Batcher(model, executor, max_batch_size=8, max_delay_s=0.0, max_queue=2)
    x, s = np.zeros((1, 3), np.float32), np.zeros(4, np.float32)
    model.gate.clear()
    running = asyncio.ensure_future(batcher.submit(x, None, s))
    await asyncio.sleep(0.01)
    queued = [asyncio.ensure_future(batcher.submit(x, None, s)) for _ in range(2)]
    blocked = asyncio.ensure_future(batcher.submit(x, None, s))  # queue full: waits for room
    await asyncio.sleep(0.02)
    assert batcher.waiting == 2 and not blocked.done()
    queued[0].cancel()
    model.gate.set()
    await asyncio.gather(running, queued[1], blocked)
    assert [shape[0] for shape in model.shapes] == [1, 1, 1] or sum(
        sh[0] for sh in model.shapes
    ) == 3
    assert sum(shape[0] for shape in model.shapes) == 3  # the cancelled step never ran


@pytest.mark.parametrize("name", ["simple", "stacked"])
async def test_each_step_owns_its_state_and_gets_its_rows(
    models_dir: Path,
    tiny_models: dict[str, Any],
    executor: Any,
    rng: np.random.Generator,
    name: str,
) -> None:
    """Single steps batched together: each share is its own row; states are copies, not views
    (a view would keep the whole batch's array alive for as long as the session idles)."""
    model = _model(models_dir, name)
    batcher = Batcher(model, executor, max_batch_size=8, max_delay_s=0.05)
    sig = model.signature
    xs = [rng.normal(size=(1, 3)).astype(np.float32) for _ in range(6)]
    starts = [rng.normal(size=sig.total_units).astype(np.float32) for _ in xs]
    model.gate.clear()
    tasks = [
        asyncio.ensure_future(batcher.submit(x, None, s)) for x, s in zip(xs, starts, strict=True)
    ]
    await asyncio.sleep(0.05)
    model.gate.set()
    results = await asyncio.gather(*tasks)
    assert [shape[0] for shape in model.shapes] == [1, 5]
    for i, (x, s, got) in enumerate(zip(xs, starts, results, strict=True)):
        alone = LoadedModel.run(model, x[None], None, [s[None, sl] for sl in sig.state_slices])
        np.testing.assert_allclose(got.outputs[0], alone.outputs[0][0], atol=ATOL)
        np.testing.assert_allclose(
            got.state, np.concatenate([st[0] for st in alone.states]), atol=ATOL
        )
        assert got.state.base is None and got.state.shape == (sig.total_units,)
        for other in results[i + 1 :]:
            assert not np.shares_memory(got.state, other.state)


class _CountingPool(ThreadPoolExecutor):
    """A thread pool counting the runs handed to it."""

    submitted = 0

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        self.submitted += 1
        return super().submit(*args, **kwargs)


async def test_the_next_batch_starts_before_the_last_ones_callers_wake(
    models_dir: Path, tiny_models: dict[str, Any]
) -> None:
    """The model gets its next batch first; the event loop answers the finished one after."""
    model = _model(models_dir, "simple")
    x, s = np.zeros((1, 3), np.float32), np.zeros(4, np.float32)
    seen: list[int] = []

    async def caller() -> Any:  # awaits its step as the session service does
        out = await batcher.submit(x, None, s)
        seen.append(pool.submitted)
        return out

    with _CountingPool(1) as pool:
        batcher = Batcher(model, pool, max_batch_size=8, max_delay_s=0.0)
        model.gate.clear()
        first = asyncio.ensure_future(caller())  # idle model: handed to the pool at once (held)
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(caller())  # busy: waits in the queue
        await asyncio.sleep(0.01)
        assert pool.submitted == 1 and batcher.waiting == 1
        model.gate.set()
        await asyncio.gather(first, second)
        # when the first step's caller ran again, the second batch was already in the pool
        assert seen == [2, 2]
        await batcher.close()


# -- where batches run ---------------------------------------------------------------------
def test_run_times_average_per_class_of_cells() -> None:
    times = RunTimes()
    assert times.expected(1) is None
    times.record(1, 0.004)
    times.record(1, 0.008)  # a quarter of the way from 4 ms to 8 ms
    assert times.expected(1) == pytest.approx(0.005)
    times.record(24, 0.1)  # 17-32 cells share a class; 16 and 33 do not
    assert times.expected(17) == times.expected(32) == 0.1
    assert times.expected(16) is None and times.expected(33) is None
    assert times.expected(2) is None  # one cell's time says nothing about two


def test_a_class_timed_near_the_limit_in_the_pool_is_probed_on_the_loop() -> None:
    times = RunTimes()
    limit = 0.010
    times.record(3, 0.015)  # first run, in the pool: over the limit, under twice it
    assert times.probe_due(3, limit)  # never measured on the loop: at once
    times.record(3, 0.004, inline=True, probe=True)  # the probe's time replaces the average
    assert times.expected(3) == 0.004 and not times.probe_due(3, limit)
    times.record(3, 0.016, inline=True, probe=True)  # measured over the limit on the loop too
    for _ in range(RunTimes.PROBE_EVERY - 1):
        times.record(3, 0.016)
        assert not times.probe_due(3, limit)
    times.record(3, 0.016)
    assert times.probe_due(3, limit)  # PROBE_EVERY pool runs later: measured there again
    times.record(5, 0.025)  # twice the limit or more: a large model's, never probed
    assert not times.probe_due(5, limit) and not times.probe_due(9, limit)


async def _steps(batcher: Batcher, count: int, timesteps: int = 1) -> list[Any]:
    """``count`` steps submitted in one pass of the loop, as concurrent requests arrive."""
    x, s = np.full((timesteps, 3), 0.5, np.float32), np.zeros(4, np.float32)
    return await asyncio.gather(*(batcher.submit(x, None, s) for _ in range(count)))


async def test_cheap_batches_move_onto_the_loop_and_back_when_they_slow_down(
    models_dir: Path, tiny_models: dict[str, Any], executor: Any
) -> None:
    model = _model(models_dir, "simple")
    metrics = Metrics(CollectorRegistry())
    batcher = Batcher(
        model, executor, inline_below_s=0.01, max_delay_s=0.0, metrics=metrics.for_model("simple")
    )
    loop_thread = threading.current_thread()
    pooled = await _steps(batcher, 3)  # a size never run: measured in the pool first
    assert model.threads == [model.threads[0]] and model.threads[0] is not loop_thread
    inline = await _steps(batcher, 3)  # measured well below 10 ms: runs on the loop
    assert model.threads[1] is loop_thread and model.shapes[1][0] == 3
    for a, b in zip(pooled + inline, inline + pooled, strict=True):  # same numbers either way
        np.testing.assert_allclose(a.outputs[0], b.outputs[0], atol=ATOL)
        np.testing.assert_allclose(a.state, b.state, atol=ATOL)
    await _steps(batcher, 12)  # another class of size: pool first again
    assert model.threads[2] is not loop_thread
    assert metrics.inline_batches.labels("simple")._value.get() == 1

    model.busy_s = 0.05  # the model slows down to 5x the limit...
    threads_before = len(model.threads)
    for _ in range(6):
        await _steps(batcher, 3)
    where = [t is loop_thread for t in model.threads[threads_before:]]
    # ...one slow run on the loop lifts the average (a quarter of the way) past the limit
    assert where[0] and not any(where[1:]), where
    model.busy_s = 0.0  # and speeds up again: pool runs bring the average back under the limit
    for _ in range(12):
        await _steps(batcher, 3)
    assert model.threads[-1] is loop_thread
    await batcher.close()


async def test_runs_that_cost_more_in_the_pool_are_measured_on_the_loop(
    models_dir: Path, tiny_models: dict[str, Any], executor: Any, monkeypatch: Any
) -> None:
    model = _model(models_dir, "simple")
    monkeypatch.setattr(RunTimes, "PROBE_EVERY", 3)
    batcher = Batcher(model, executor, inline_below_s=0.01, max_delay_s=0.0)
    loop_thread = threading.current_thread()
    model.pool_busy_s = 0.015  # the pool's runs take 15 ms of CPU, the loop's well under 10
    for _ in range(4):
        await _steps(batcher, 3)
    # measured in the pool first (a size never run), then on the loop, where it fits
    assert [t is loop_thread for t in model.threads] == [False, True, True, True]
    model.busy_s, model.pool_busy_s = 0.016, 0.001  # over the limit in both places now
    del model.threads[:]
    for _ in range(14):
        await _steps(batcher, 3)
    # loop runs lift the average past the limit (a quarter of the way each); then the pool,
    # and one probe on the loop after every 3 pool runs
    where = [t is loop_thread for t in model.threads]
    first = where.index(False)
    assert all(where[:first]) and 0 < first <= 6, where
    assert where[first : first + 8] == [False, False, False, True] * 2, where
    await batcher.close()


async def test_an_idle_model_waits_one_loop_pass_for_company_when_inline_is_on(
    models_dir: Path, tiny_models: dict[str, Any], executor: Any
) -> None:
    model = _model(models_dir, "simple")
    on = Batcher(model, executor, inline_below_s=0.02, max_delay_s=0.0)
    await _steps(on, 5)
    assert [shape[0] for shape in model.shapes] == [5]  # all five joined the first batch
    model.shapes.clear()
    off = Batcher(model, executor, max_delay_s=0.0)
    await _steps(off, 5)
    assert [shape[0] for shape in model.shapes] == [1, 4]  # the first left alone at once


async def test_a_long_chunk_is_not_expected_to_cost_what_a_short_one_does(
    models_dir: Path, tiny_models: dict[str, Any], executor: Any
) -> None:
    model = _model(models_dir, "simple")
    batcher = Batcher(model, executor, inline_below_s=0.02, max_delay_s=0.0)
    loop_thread = threading.current_thread()
    for _ in range(2):
        await _steps(batcher, 2)
    assert model.threads[-1] is loop_thread
    await _steps(batcher, 2, timesteps=64)  # 128 cells: never measured, so the pool
    assert model.shapes[-1][:2] == (2, 64) and model.threads[-1] is not loop_thread


async def test_close_drops_a_batch_that_waits_for_its_loop_pass(
    models_dir: Path, tiny_models: dict[str, Any], executor: Any
) -> None:
    model = _model(models_dir, "simple")
    batcher = Batcher(model, executor, inline_below_s=0.02)
    x, s = np.zeros((1, 3), np.float32), np.zeros(4, np.float32)
    step = batcher.submit(x, None, s)  # deferred to the next pass of the loop
    await batcher.close()
    with pytest.raises(RuntimeError, match="shutting down"):
        await step
    await asyncio.sleep(0.01)
    assert model.entered == 0


async def test_steps_submitted_together_run_together_with_single_steps(
    models_dir: Path, tiny_models: dict[str, Any], executor: Any, rng: np.random.Generator
) -> None:
    """``submit_many`` queues its steps in one go: on an idle model they run as one batch
    (``submit`` one by one would start the first alone), they share a batch with a single
    step queued meanwhile, and each gets what it would get alone."""
    model = _model(models_dir, "stacked")
    batcher = Batcher(model, executor, max_batch_size=16, max_delay_s=0.05)
    sig = model.signature
    xs = [rng.normal(size=(1, 3)).astype(np.float32) for _ in range(5)]
    starts = [rng.normal(size=sig.total_units).astype(np.float32) for _ in xs]
    futures = await batcher.submit_many(list(zip(xs[:4], [None] * 4, starts[:4], strict=True)))
    results = [await f for f in futures]
    assert [shape[0] for shape in model.shapes] == [4]
    model.gate.clear()  # hold a run: a bulk and a single step queue up behind it
    held = await batcher.submit_many([(xs[0], None, starts[0])])
    await asyncio.sleep(0.05)
    together = await batcher.submit_many([(x, None, s) for x, s in zip(xs, starts, strict=True)])
    single = asyncio.ensure_future(batcher.submit(xs[4], None, starts[4]))
    model.gate.set()
    await held[0]
    results += [await f for f in together] + [await single]
    assert [shape[0] for shape in model.shapes] == [4, 1, 6]
    for got, x, s in zip(
        results, [*xs[:4], *xs, xs[4]], [*starts[:4], *starts, starts[4]], strict=True
    ):
        alone = LoadedModel.run(model, x[None], None, [s[None, sl] for sl in sig.state_slices])
        for out_got, out_alone in zip(got.outputs, alone.outputs, strict=True):
            np.testing.assert_allclose(out_got, out_alone[0], atol=ATOL)
        np.testing.assert_allclose(
            got.state, np.concatenate([st[0] for st in alone.states]), atol=ATOL
        )


async def test_a_block_runs_as_batches_of_its_own(
    models_dir: Path, tiny_models: dict[str, Any], executor: Any, rng: np.random.Generator
) -> None:
    """``submit_block`` queues (n, T, F) inputs as runs of at most ``max_batch_size`` rows,
    one future each, answered with the run's matrices: each row equals that step run
    alone. A single step queued before the block runs first, alone (a block never shares
    a run); one queued after it waits for the block's runs; a failed run fails its own
    future only; the metrics count the block's rows."""
    model = _model(models_dir, "stacked")
    registry = CollectorRegistry()
    metrics = Metrics(registry).for_model("stacked")
    batcher = Batcher(model, executor, max_batch_size=4, max_delay_s=0.05, metrics=metrics)
    sig = model.signature
    x = rng.normal(size=(10, 2, 3)).astype(np.float32)
    states = rng.normal(size=(10, sig.total_units)).astype(np.float32)
    single_x = rng.normal(size=(2, 3)).astype(np.float32)
    model.gate.clear()  # hold a run: the others queue behind it
    held = batcher.submit(single_x, None, states[0])
    await asyncio.sleep(0.05)
    before = batcher.submit(single_x, None, states[1])
    futures = await batcher.submit_block(x, states)
    after = batcher.submit(single_x, None, states[2])
    model.gate.set()
    runs = [await f for f in futures]
    await held, await before, await after
    assert [s[0] for s in model.shapes] == [1, 1, 4, 4, 2, 1]
    assert [r.states.shape for r in runs] == [(4, sig.total_units)] * 2 + [(2, sig.total_units)]
    for row in range(10):
        run, at = runs[row // 4], row % 4
        alone = LoadedModel.run(
            model, x[row : row + 1], None, [states[row : row + 1, sl] for sl in sig.state_slices]
        )
        for got, want in zip(run.outputs, alone.outputs, strict=True):
            np.testing.assert_allclose(got[at], want[0], atol=ATOL)
        flat = np.concatenate(alone.states, axis=1)[0]
        np.testing.assert_allclose(run.states[at], flat, atol=ATOL)
    steps = registry.get_sample_value("gruserve_steps_total", {"model": "stacked"})
    model.fail_next = True
    failing = await batcher.submit_block(x[:6], states[:6])
    with pytest.raises(RuntimeError, match="boom"):
        await failing[0]
    assert (await failing[1]).states.shape == (2, sig.total_units)
    again = registry.get_sample_value("gruserve_steps_total", {"model": "stacked"})
    assert steps is not None and again == steps + 2
    await batcher.close()
