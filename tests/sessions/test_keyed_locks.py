"""Per-key FIFO locks: arrival order, no overtaking, cancellation, cleanup."""

from __future__ import annotations

import asyncio

from gruserve.sessions._locks import KeyedLocks


async def test_fifo_per_key_and_cleanup() -> None:
    locks = KeyedLocks()
    order: list[int] = []

    async def worker(i: int, key: str) -> None:
        async with locks.hold(key):
            await asyncio.sleep(0.001 * (5 - i % 5))
            order.append(i)

    await asyncio.gather(*(worker(i, "a") for i in range(20)), worker(99, "b"))
    assert [i for i in order if i != 99] == list(range(20))
    assert len(locks) == 0


async def test_cancelled_waiters_do_not_block_the_queue() -> None:
    locks = KeyedLocks()
    release = asyncio.Event()
    done: list[str] = []

    async def holder() -> None:
        async with locks.hold("k"):
            await release.wait()
            done.append("holder")

    async def waiter(name: str) -> None:
        async with locks.hold("k"):
            done.append(name)

    tasks = [asyncio.ensure_future(holder())]
    await asyncio.sleep(0)
    tasks += [asyncio.ensure_future(waiter(n)) for n in ("w1", "w2", "w3")]
    await asyncio.sleep(0)
    tasks[2].cancel()
    release.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert done == ["holder", "w1", "w3"] and len(locks) == 0


async def test_try_acquire_takes_only_a_free_key_and_queues_nobody() -> None:
    locks = KeyedLocks()
    assert locks.try_acquire("k") and len(locks) == 1
    assert not locks.try_acquire("k")  # held: the caller must await acquire() instead
    order: list[str] = []

    async def waiter(name: str) -> None:
        await locks.acquire("k")
        order.append(name)
        locks.release("k")

    waiters = [asyncio.ensure_future(waiter(n)) for n in ("first", "second")]
    await asyncio.sleep(0.01)
    assert order == [] and not locks.try_acquire("k")  # no overtaking the queue either
    locks.release("k")
    await asyncio.gather(*waiters)
    assert order == ["first", "second"] and len(locks) == 0
    assert locks.try_acquire("k")  # free again
    locks.release("k")
    assert len(locks) == 0


def test_take_free_takes_the_free_keys_and_returns_the_busy_items_in_order() -> None:
    locks = KeyedLocks()
    assert locks.try_acquire("b")
    keys, taken, busy = locks.take_free([("a", 0), ("b", 1), ("c", 2), ("b", 3), ("a", 4)])
    # "a" is free once, then held by this very pass: its second item waits like "b"'s
    assert (keys, taken, busy) == (["a", "c"], [0, 2], [1, 3, 4])
    for key in ("a", "b", "c"):
        locks.release(key)
    assert len(locks) == 0
