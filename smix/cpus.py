"""How many loader workers one training process should start (`workers=auto`).

A process may run on the CPUs of its affinity; the node's processes (torchrun's
`LOCAL_WORLD_SIZE`) share the CPUs of the node's cpuset, and a container may be held to a CPU
quota. Processes are assumed spread evenly: one that sees every CPU of the cpuset shares it
with all the others, one bound to its own 1/n of it (`srun --cpu-bind`, NUMA binding) with
none. Each takes its share less one CPU for itself, at least 1 and at most 16 (the default of
torchvision's reference scripts).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
MAX_WORKERS = 16


def cpu_list_size(text: str) -> int:
    """The number of CPUs in a kernel CPU list such as `0-31,64-95` or `3`."""
    count = 0
    for part in text.strip().split(","):
        if part:
            low, _, high = part.partition("-")
            count += int(high or low) - int(low) + 1
    return count


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        return os.cpu_count() or 1


def node_cpus() -> int:
    """CPUs of this node's cpuset (the container's, cgroup v2 or v1), else of the machine."""
    for name in ("cpuset.cpus.effective", "cpuset/cpuset.effective_cpus"):
        try:
            return cpu_list_size((CGROUP / name).read_text())
        except (OSError, ValueError):
            continue
    return os.cpu_count() or 1


def cpu_quota() -> float | None:
    """The CPU time quota of this cgroup in CPUs (cgroup v2 `cpu.max`, v1 CFS); None: none."""
    try:
        quota, period = (CGROUP / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((CGROUP / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((CGROUP / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def auto_workers() -> int:
    """Loader workers for this process (see the module docstring)."""
    usable = usable_cpus()
    node = max(node_cpus(), usable)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    sharing = min(local, max(1, round(local * usable / node)))
    share = usable // sharing
    quota = cpu_quota()
    if quota is not None:
        share = min(share, max(1, math.floor(quota / local)))
    return max(1, min(MAX_WORKERS, share - 1))
