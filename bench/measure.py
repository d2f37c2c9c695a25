"""What every bench reports besides its own figures: the machine, percentiles, and per-process
memory high-water marks and CPU time read from /proc (Linux)."""

from __future__ import annotations

import atexit
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """Cores, memory, CPU model, Python and load: printed and stored with every figure."""
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    cpu_model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "memory_gib": round(mem_kb / 1024 / 1024, 1),
            "cpu_model": cpu_model, "python": platform.python_version(),
            "platform": platform.platform(), "load_avg": [round(x, 2) for x in os.getloadavg()]}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0-100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def handoff(starts: list[tuple[float, float]]) -> list[float]:
    """The hand-off part of each start's wait, for (started, could start) pairs: could start =
    its slot was free and its work published. Sorted by start, each waits
    ``started - max(could start, the previous start)``: the time the executor left a free slot
    and published work waiting while it was not starting the attempt before (a burst of N onto
    N free slots otherwise counts, for its k-th attempt, the k-1 starts ahead of it: a
    throughput, docs/executor.md stop 20). Same units as given; >= 0."""
    out: list[float] = []
    prev = float("-inf")
    for started, could in sorted(starts):
        out.append(max(0.0, started - max(could, prev)))
        prev = started
    return out


def _status_kib(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mib(pid: int | None) -> float | None:
    """The process's resident-set high-water mark (VmHWM) in MiB."""
    if not pid:
        return None
    kib = _status_kib(pid, "VmHWM:")
    return round(kib / 1024, 1) if kib is not None else None


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time a process has used so far."""
    if not pid:
        return None
    fields = _stat_fields(pid)
    if fields is None:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return round((int(fields[11]) + int(fields[12])) / ticks, 2)


def group_pids(pgid: int) -> list[int]:
    """Live processes of a process group (the stack starts each child as a group leader, so a
    service's helpers and the broker's wrapper + binary are counted with it)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        # fields[0] is the state, [1] ppid, [2] pgrp
        if fields is not None and len(fields) > 2 and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids or [pgid]


def group_peak_rss_mib(pgid: int | None) -> float | None:
    """Sum of the VmHWM of a group's live processes (an upper bound of the group's peak: the
    members' peaks need not coincide; for a one-process service it is that process's peak)."""
    if not pgid:
        return None
    values = [v for v in (peak_rss_mib(p) for p in group_pids(pgid)) if v is not None]
    return round(sum(values), 1) if values else None


def group_cpu_seconds(pgid: int | None) -> float | None:
    """CPU time used so far by a group's live processes (exited helpers are not counted)."""
    if not pgid:
        return None
    values = [v for v in (cpu_seconds(p) for p in group_pids(pgid)) if v is not None]
    return round(sum(values), 2) if values else None


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine since boot, all cores (/proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Share of the machine's CPU capacity (all cores) that was busy between two readings."""
    total = after[1] - before[1]
    return round((after[0] - before[0]) / total, 2) if total else float("nan")


def self_cpu_seconds() -> float:
    """CPU time of this (the bench client) process."""
    t = os.times()
    return round(t.user + t.system, 2)


def py_spy() -> Path | None:
    """The py-spy binary: beside the interpreter, else on PATH (it is not a project dependency:
    `pip install --target DIR py-spy`, then DIR/bin on PATH); None without one."""
    spy = Path(sys.executable).parent / "py-spy"
    if spy.exists():
        return spy
    found = shutil.which("py-spy")
    return Path(found) if found is not None else None


def bench_dir(prefix: str) -> Path:
    """A temporary data directory for one bench run, removed when the process exits (a 20,000
    task run leaves ~750 MB: the broker's state file and ClickHouse's parts; 500 runs filled
    this machine's disk in stop 23). `FLEETPLANE_BENCH_KEEP=1` keeps it for inspection."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if os.environ.get("FLEETPLANE_BENCH_KEEP", "") not in ("1", "true", "yes"):
        atexit.register(shutil.rmtree, path, True)
    return path
