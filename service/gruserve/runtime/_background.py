"""Loading a model version yields the CPU to serving.

Loading a version (reading and hashing its file, onnxruntime building and optimising its
session, one warm-up batch) is CPU work beside serving, in the registry's loader thread.
It holds the GIL very little (py-spy: a few samples over a whole load), so what slows the
event loop and the inference threads during a load is the CPU it takes from them: on a
busy core the scheduler shares time equally between runnable threads. The loader thread
therefore runs at the lowest priority (``nice`` 19, for that thread only; Linux niceness
is per thread): serving threads get the core first, and the load takes longer on a
saturated machine instead of making steps wait (figures in bench/README.md, "Rollout").

Threads inherit the niceness of the thread that creates them, and an unprivileged
process cannot lower it again. onnxruntime creates its intra-op thread pool when a
session is built, so a pool built in the loader thread would serve that version at the
lowest priority for good: the priority is lowered only when sessions run without a pool
(``intra_op_threads`` 1, the default).
"""

from __future__ import annotations

import contextlib
import os
import threading

LOWEST = 19
"""The niceness the loader thread runs at."""


def lower_this_thread() -> None:
    """Run the calling thread at :data:`LOWEST` priority (a thread-pool initializer).

    Does nothing where threads have no niceness of their own (not Linux).
    """
    if not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):  # a sandbox that forbids it: load at normal priority
        if os.getpriority(os.PRIO_PROCESS, tid) < LOWEST:
            os.setpriority(os.PRIO_PROCESS, tid, LOWEST)
