"""How many CPUs this server may use, and where its batches run because of it.

A batch handed to the inference threads runs beside the event loop only if there is a
second CPU to run it on. A process pinned to one core (``taskset``, a cpuset) or capped at
one CPU (a cgroup quota: a Kubernetes ``limits.cpu: 1``) gets no overlap from the threads,
only the hand-off's cost, which bench/README.md measured at about the run's own CPU time
for 64-row runs of the demo model. So on one CPU the batcher runs larger batches on the
loop (:func:`inline_below_us`); where it has more, it keeps them in the threads, so that
the loop goes on reading other requests while onnxruntime works.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")

INLINE_BELOW_US = 250.0
"""The default of ``GRUSERVE_BATCH_INLINE_BELOW_US`` with more than one CPU: runs the
hand-off costs more than (the demo model's small batches) go on the loop."""

INLINE_BELOW_US_ONE_CPU = 2000.0
"""The default with one CPU or less: what the loop may be held by one run, the batching
delay a step may already wait (``max_delay_ms``'s default, 2 ms). Longer runs (long
sequences, large models) still go to the threads, where the loop, running at a higher
priority than them, keeps answering other requests between their time slices."""


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: what ``taskset`` or a container's
    cpuset leave it), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this OS
        return os.cpu_count() or 1


def cpu_quota(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT
) -> float | None:
    """The CPU time this process's cgroups allow, in CPUs (``cpu.max`` of cgroup v2, or
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` of v1; the smallest along the path from
    the process's cgroup to the root); None: no quota, or none readable."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            quotas += _along(root, path, _v2_quota)
        elif "cpu" in controllers.split(","):
            quotas += _along(root / controllers, path, _v1_quota)
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def usable_cpus() -> float:
    """How much CPU this process can use at once: its affinity, capped by a cgroup quota."""
    quota = cpu_quota()
    cpus = float(available_cpus())
    return cpus if quota is None else min(cpus, quota)


def inline_below_us(setting: float | None, cpus: float) -> float:
    """``GRUSERVE_BATCH_INLINE_BELOW_US`` as set, or its default for ``cpus`` when unset."""
    if setting is not None:
        return setting
    return INLINE_BELOW_US_ONE_CPU if cpus <= 1.0 else INLINE_BELOW_US


def _along(root: Path, path: str, quota_of: Callable[[Path], float | None]) -> list[float | None]:
    """``quota_of`` each directory from ``root/path`` up to ``root``."""
    here = root / path.lstrip("/")
    found = []
    while True:
        found.append(quota_of(here))
        if here == root or root not in here.parents:
            return found
        here = here.parent


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period
