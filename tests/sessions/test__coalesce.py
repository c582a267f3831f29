"""The coalescer: calls of one pass of the event loop go out as one batched call."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from gruserve.sessions.redis_store._coalesce import Coalescer


class Recorder:
    """A batched function that records each chunk it was sent and answers ``call * 10``."""

    def __init__(self, fail_on: int | None = None, broken: bool = False) -> None:
        self.chunks: list[list[int]] = []
        self.fail_on, self.broken = fail_on, broken
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, calls: Sequence[int]) -> list[int | BaseException]:
        self.chunks.append(list(calls))
        await self.release.wait()
        if self.broken:
            raise ConnectionError("store down")
        return [ValueError(c) if c == self.fail_on else c * 10 for c in calls]


async def test_calls_of_one_pass_are_sent_once_in_order() -> None:
    send = Recorder()
    coalescer = Coalescer(send)
    assert await asyncio.gather(*(coalescer(i) for i in range(50))) == [i * 10 for i in range(50)]
    assert send.chunks == [list(range(50))]


async def test_callers_woken_together_share_a_wave() -> None:
    """Tasks resumed in the same pass (as a batch's callers are) coalesce too."""
    send = Recorder()
    coalescer = Coalescer(send)
    gate = asyncio.get_running_loop().create_future()

    async def caller(i: int) -> int:
        await gate
        return await coalescer(i)

    tasks = [asyncio.ensure_future(caller(i)) for i in range(20)]
    await asyncio.sleep(0)
    gate.set_result(None)
    assert await asyncio.gather(*tasks) == [i * 10 for i in range(20)]
    assert send.chunks == [list(range(20))]


async def test_a_long_wave_goes_out_in_chunks_of_the_limit() -> None:
    send = Recorder()
    coalescer = Coalescer(send, limit=8)
    assert await asyncio.gather(*(coalescer(i) for i in range(20))) == [i * 10 for i in range(20)]
    assert send.chunks == [list(range(8)), list(range(8, 16)), list(range(16, 20))]


async def test_a_call_made_while_a_wave_is_in_flight_does_not_wait_for_it() -> None:
    send = Recorder()
    coalescer = Coalescer(send)
    send.release.clear()
    first = asyncio.ensure_future(coalescer(1))
    await asyncio.sleep(0.01)
    assert send.chunks == [[1]] and not first.done()
    send.release.set()  # the second wave is sent while the first one is still being answered
    second = coalescer(2)
    assert await second == 20 and await first == 10
    assert send.chunks == [[1], [2]]


async def test_a_per_call_error_fails_only_that_call() -> None:
    coalescer = Coalescer(Recorder(fail_on=3))
    results = await asyncio.gather(*(coalescer(i) for i in range(5)), return_exceptions=True)
    assert results[:3] == [0, 10, 20] and results[4] == 40
    assert isinstance(results[3], ValueError)


async def test_a_failed_send_fails_every_call_of_its_chunk() -> None:
    coalescer = Coalescer(Recorder(broken=True))
    results = await asyncio.gather(*(coalescer(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)


async def test_a_caller_that_went_away_leaves_the_others_answered() -> None:
    send = Recorder()
    coalescer = Coalescer(send)
    send.release.clear()
    gone, kept = coalescer(1), coalescer(2)
    await asyncio.sleep(0.01)
    gone.cancel()
    send.release.set()
    assert await kept == 20
    await coalescer.close()
    assert send.chunks == [[1, 2]]  # sent all the same: the store may have applied it


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="limit >= 1"):
        Coalescer(Recorder(), limit=0)
