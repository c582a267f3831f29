"""The background-task shape the sweeper and the version census share (gruserve.periodic)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gruserve.errors import StoreUnavailable
from gruserve.periodic import Periodic


class Flaky(Periodic):
    """Fails its first two ticks as a store that is down would, then counts."""

    name, what = "test-flaky", "flaking"

    def __init__(self, interval_s: float, first_now: bool) -> None:
        super().__init__(interval_s)
        self.first_now = first_now
        self.calls = 0
        self.done = asyncio.Event()

    async def tick(self) -> None:
        self.calls += 1
        if self.calls <= 2:
            raise StoreUnavailable("redis://test", "connection refused")
        if self.calls == 4:
            self.done.set()


@pytest.mark.parametrize("first_now", [True, False])
async def test_a_failing_tick_is_logged_and_the_next_one_runs(
    first_now: bool, caplog: pytest.LogCaptureFixture
) -> None:
    work = Flaky(0.01, first_now)
    with caplog.at_level(logging.WARNING, logger="gruserve"):
        work.start()
        work.start()  # a second start does nothing: one task
        await asyncio.wait_for(work.done.wait(), timeout=60)
        await work.stop()
    failures = [r.getMessage() for r in caplog.records if "flaking failed" in r.getMessage()]
    assert len(failures) == 2 and "connection refused" in failures[0]
    calls = work.calls
    await asyncio.sleep(0.05)
    assert work.calls == calls  # stopped: no tick after stop
    await work.stop()  # stopping twice is harmless


async def test_first_now_ticks_before_the_first_interval() -> None:
    work = Flaky(3600, first_now=True)
    work.start()
    try:
        for _ in range(1000):
            if work.calls:
                break
            await asyncio.sleep(0.01)
        assert work.calls == 1
    finally:
        await work.stop()
    later = Flaky(3600, first_now=False)
    later.start()
    await asyncio.sleep(0.05)
    await later.stop()
    assert later.calls == 0


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="Flaky needs interval_s > 0"):
        Flaky(0, first_now=True)
