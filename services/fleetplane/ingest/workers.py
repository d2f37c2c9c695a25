"""Several ingest processes on one port: the first starts the others and stops them with it.

`FLEETPLANE_INGEST_WORKERS=N` (default 1): the process started by the operator (worker 0) starts
N-1 more of itself. Every worker is a full ingest replica: its HTTP server binds the same port
with SO_REUSEPORT (the kernel spreads new connections over the workers), and its validator loop
joins the ingest consumer group (the partitions of tasks.submitted are shared). What keeps them
correct is what keeps replicas correct: a keyed submission's task id derives from its team and
key, so every replay lands on one partition and one loop, which holds the mark; each worker has
its own transactional id (`<instance id>-w<i>`). Per-worker state that is not shared: the intake
rate limit (each worker takes 1/N of a team's rate and burst, so the sum is the team's limit
when connections spread evenly) and the per-address auth-failure limit (likewise).

A worker that exits is started again after a second; the others serve meanwhile. Stopping worker
0 (SIGTERM, or the stack stopping its process group) stops them all; a worker whose parent died
without stopping it (SIGKILL) is stopped by the kernel (PR_SET_PDEATHSIG on Linux).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading

from fleetplane.core.logging import get_logger
from fleetplane.core.settings import Settings

log = get_logger(__name__)

#: how long a worker that exited waits before it is started again
RESTART_AFTER_S = 1.0


def die_with_parent() -> None:
    """In a worker (index > 0), at start: SIGTERM when worker 0 dies, however it dies (Linux's
    PR_SET_PDEATHSIG; set by the worker itself, not in a pre-exec hook, which is unsafe in a
    process with threads). A worker whose parent is already gone stops at once."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() == 1:  # worker 0 died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


class Workers:
    """Worker 0's children (workers 1..N-1), kept running until `stop()`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.count = settings.ingest_workers
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def env(self, index: int) -> dict[str, str]:
        return {**os.environ, "FLEETPLANE_INGEST_WORKER_INDEX": str(index),
                "FLEETPLANE_INSTANCE_ID": worker_instance(self.settings.instance_id, index)}

    def _spawn(self, index: int) -> None:
        self.procs[index] = subprocess.Popen(
            [sys.executable, "-m", "fleetplane.ingest.main"], env=self.env(index))
        log.info("ingest worker started", worker=index, pid=self.procs[index].pid)

    def start(self) -> None:
        for index in range(1, self.count):
            self._spawn(index)
        if self.procs:
            self._watcher = threading.Thread(target=self._watch, name="ingest-workers",
                                             daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        while not self._stopping.wait(RESTART_AFTER_S):
            for index, proc in list(self.procs.items()):
                code = proc.poll()
                if code is not None and not self._stopping.is_set():
                    log.error("ingest worker exited: starting it again", worker=index,
                              code=code)
                    self._spawn(index)

    def stop(self, timeout_s: float = 20.0) -> None:
        self._stopping.set()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def worker_instance(instance_id: str, index: int) -> str:
    """Worker `index`'s replica id (worker 0 keeps the configured one)."""
    return instance_id if index == 0 else f"{instance_id}-w{index}"


def rate_share(settings: Settings) -> float:
    """The share of each per-team and per-address limit one worker enforces."""
    return 1.0 / max(1, settings.ingest_workers)
