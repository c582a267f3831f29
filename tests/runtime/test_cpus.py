"""The CPUs a server may use, and where its batches run by default because of them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gruserve.runtime.cpus import (
    INLINE_BELOW_US,
    INLINE_BELOW_US_ONE_CPU,
    available_cpus,
    cpu_quota,
    inline_below_us,
)

REPO = Path(__file__).resolve().parents[2]


def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_a_cgroup_v2_quota_is_the_smallest_along_the_path(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("0::/kubepods/pod1/app\n")
    root = tmp_path / "fs"
    _tree(
        root, {"kubepods/cpu.max": "400000 100000\n", "kubepods/pod1/app/cpu.max": "max 100000\n"}
    )
    assert cpu_quota(proc, root) == 4.0
    _tree(root, {"kubepods/pod1/cpu.max": "50000 100000\n"})  # a Kubernetes limit of 500m
    assert cpu_quota(proc, root) == 0.5


def test_a_cgroup_v1_quota_is_read_and_no_quota_is_none(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/x\n2:cpu,cpuacct:/docker/abc\n0::/\n")
    root = tmp_path / "fs"
    _tree(
        root,
        {
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "150000\n",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
            "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
            "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        },
    )
    assert cpu_quota(proc, root) == 1.5
    (root / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(proc, root) is None
    assert cpu_quota(tmp_path / "no such file", root) is None


def test_the_inline_default_follows_the_cpus_and_a_setting_wins() -> None:
    assert inline_below_us(None, 2.0) == INLINE_BELOW_US
    assert inline_below_us(None, 1.0) == inline_below_us(None, 0.5) == INLINE_BELOW_US_ONE_CPU
    assert inline_below_us(0.0, 1.0) == 0.0  # always the threads, as asked
    assert inline_below_us(100.0, 8.0) == 100.0


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_a_server_pinned_to_one_core_runs_larger_batches_on_the_loop() -> None:
    """The services a server builds under ``taskset -c 0`` take the one-CPU default, and
    the same build on every core takes the other (where this machine has two)."""
    script = (
        "from pathlib import Path; from gruserve.server import build_services; "
        "from gruserve.settings import Settings; "
        "s = build_services(Settings(models_dir=Path('models'))); "
        "print(s.batchers['demo'].inline_below_s); s.executor.shutdown()"
    )
    core = str(min(os.sched_getaffinity(0)))

    def inline_s(*prefix: str) -> float:
        out = subprocess.run(
            [*prefix, sys.executable, "-c", script],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={k: v for k, v in os.environ.items() if k != "GRUSERVE_BATCH_INLINE_BELOW_US"},
        )
        assert out.returncode == 0, out.stderr
        return float(out.stdout.split()[-1])

    assert inline_s("taskset", "-c", core) == INLINE_BELOW_US_ONE_CPU / 1e6
    if available_cpus() > 1 and (cpu_quota() or 2.0) > 1.0:
        assert inline_s() == INLINE_BELOW_US / 1e6
