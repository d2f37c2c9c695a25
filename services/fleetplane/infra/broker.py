"""Start and stop the pinned Kafka-protocol broker (noida-db==0.2.3) for the embedded stack.

noida-db's Python wrapper does not forward SIGTERM to the binary it starts, so the broker runs in
its own process group (start_new_session) and is stopped by signalling the whole group.

Stopped with SIGINT (its Ctrl-C, what its wrapper documents): the wrapper then waits for the
binary, and the group was gone 0.47 s after the signal with 50,000 records just written; after a
SIGTERM the wrapper exits at once and the binary lingers for about 7 s, so a stop with a shorter
timeout ended in SIGKILL, which loses what the broker acknowledged last (measured: a SIGKILL right
after the wrapper's exit lost 2,000 acknowledged records and the topic itself).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

PINNED = "noida-db==0.2.3"


#: ports below the kernel's ephemeral range are never handed to outgoing connections
LOW_PORTS = (10_000, 32_767)
#: the ports free_port handed out in this process (never handed twice)
_HANDED: set[int] = set()
_HANDED_LOCK = threading.Lock()


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return LOW_PORTS[1] + 1


def free_port() -> int:
    """A port free to listen on, below the ephemeral range where the kernel has one: a port
    the kernel picked (bind to 0) is from that range, and an outgoing connection (a Kafka
    client's, of which a chaos run opens hundreds) could take it before the service that was
    given it binds it (seen once: the accounting API failed to start with "address already in
    use"). Falls back to a kernel-picked port.

    Never the same port twice in one process: a stack takes a dozen before any of its services
    binds one, and two picks from the range could coincide (about 0.3% per stack start; seen
    in stop 23's bench: the accounting API failed to bind its port)."""
    top = min(LOW_PORTS[1], _ephemeral_start() - 1)
    rng = random.SystemRandom()
    for _ in range(50):
        port = rng.randint(LOW_PORTS[0], top)
        with _HANDED_LOCK:
            if port in _HANDED:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _HANDED.add(port)
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


def noida_command() -> list[str]:
    """The pinned broker installed with this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / "noida-db"
    if beside.exists():
        return [str(beside)]
    try:
        import noida_db.cli  # noqa: F401
    except ImportError:
        exe = shutil.which("noida-db")
        if exe:
            return [exe]
        raise RuntimeError(f"the pinned broker is not installed: pip install '{PINNED}'") from None
    return [sys.executable, "-m", "noida_db.cli"]


class EmbeddedBroker:
    """The pinned broker on 127.0.0.1:<port>, data under data_dir, logs to log_file."""

    def __init__(self, data_dir: Path, port: int = 0, log_file: Path | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.log_file = log_file or data_dir / "broker.log"
        self.pid_file = data_dir / "broker.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [*noida_command(), "start", "--data-dir", str(self.data_dir), "--host",
               "127.0.0.1", "--only", "kafka", "--kafka-port", str(self.port)]
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid_file.write_text(str(self.proc.pid))
        self.started_at = time.monotonic()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"broker exited with {self.proc.returncode}; see {self.log_file}")
            if port_open("127.0.0.1", self.port):
                return self.bootstrap
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"broker did not listen on {self.bootstrap} within {timeout_s}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        pid = self.proc.pid if self.proc else _read_pid(self.pid_file)
        if pid is not None:
            stop_broker(pid, timeout_s)
        self.proc = None
        self.pid_file.unlink(missing_ok=True)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def stop_broker(pid: int, timeout_s: float = 10.0) -> None:
    """Stop the broker's process group so that it keeps what it acknowledged (SIGINT)."""
    stop_group(pid, timeout_s, first=signal.SIGINT)


def stop_group(pid: int, timeout_s: float = 10.0,
               first: signal.Signals = signal.SIGTERM) -> None:
    """`first` (SIGTERM) to the process group led by pid, then SIGKILL what is left."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    for sig, wait in ((first, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                _reap(pid)
                return
            _reap(pid)
            time.sleep(0.05)


def stop_groups(pids: list[int], timeout_s: float = 10.0) -> None:
    """stop_group for several process groups at once: SIGTERM to all, then wait for all (up
    to `timeout_s` in total, not per group), then SIGKILL what is left. Stopping a stack's
    services one after the other made `fleetplane down` take 5 s per service."""
    groups: dict[int, int] = {}
    for pid in pids:
        try:
            groups[pid] = os.getpgid(pid)
        except ProcessLookupError:
            continue
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        for pid, pgid in list(groups.items()):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                _reap(pid)
                del groups[pid]
        deadline = time.monotonic() + wait
        while groups and time.monotonic() < deadline:
            for pid, pgid in list(groups.items()):
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    _reap(pid)
                    del groups[pid]
                    continue
                _reap(pid)
            time.sleep(0.05)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
