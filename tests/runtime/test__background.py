"""The registry's loader thread runs at the lowest priority; serving threads keep theirs."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from gruserve.runtime._background import LOWEST, lower_this_thread
from gruserve.runtime.registry import ModelRegistry

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is Linux's")


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_only_the_loader_thread_is_lowered() -> None:
    before = _nice()
    registry = ModelRegistry(intra_op_threads=1)
    try:
        assert registry._loader.submit(_nice).result(timeout=30) == LOWEST
    finally:
        registry.close()
    assert _nice() == before  # the caller's thread (the event loop's) is untouched


def test_a_loader_that_builds_thread_pools_keeps_normal_priority() -> None:
    """With intra-op pools, the pool threads a load creates would inherit the loader's
    priority for good: the loader is not lowered then."""
    before = _nice()
    registry = ModelRegistry(intra_op_threads=0)
    try:
        assert registry._loader.submit(_nice).result(timeout=30) == before
    finally:
        registry.close()


def test_lowering_twice_is_harmless() -> None:
    def twice() -> int:
        lower_this_thread()
        lower_this_thread()
        return _nice()

    worker: list[int] = []
    thread = threading.Thread(target=lambda: worker.append(twice()))
    thread.start()
    thread.join(timeout=30)
    assert worker == [LOWEST]
