"""Run one command inside bubblewrap: the worktree read-write, system directories read-only,
nothing else of the host, no network, own PID namespace, resource limits, scrubbed environment.

Layers, outermost first (docs/executor.md):
1. a pids cgroup (v1 or v2, when the host lets us create one) caps the number of processes: the
   only fork-bomb guard that also holds for root, for whom RLIMIT_NPROC is not enforced;
2. ``prlimit``: CPU seconds, address space, file size, processes, no core files;
3. ``bwrap --unshare-all --die-with-parent``: new user, mount, PID, network, IPC, UTS and cgroup
   namespaces; only /usr (and the /bin, /lib symlinks), a few /etc files, a fresh /proc, /dev and
   /tmp, and the worktree at /workspace are visible; all capabilities dropped;
4. a wall-clock timeout (and cancellation) that kills the whole process group.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

WORKDIR = "/workspace"
OUTPUT_CAP = 16_000
_ETC_FILES = ("ld.so.cache", "ld.so.conf", "alternatives", "localtime", "passwd", "group",
              "nsswitch.conf")
_CGROUP_ROOTS = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup"))


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 60.0
    cpu_s: int = 60
    memory_mb: int = 1024
    file_mb: int = 64
    max_pids: int = 128


@dataclass(frozen=True)
class CommandResult:
    exit_code: int | None
    stdout: str
    stderr: str
    duration_ms: float
    timed_out: bool = False
    cancelled: bool = False

    def summary(self) -> str:
        head = ("timed out (killed)" if self.timed_out else "cancelled (killed)"
                if self.cancelled else f"exit code {self.exit_code}")
        parts = [head]
        if self.stdout:
            parts.append(f"stdout:\n{self.stdout}")
        if self.stderr:
            parts.append(f"stderr:\n{self.stderr}")
        return "\n".join(parts)


class SandboxUnavailable(Exception):
    """The kernel (or the host) refuses what the sandbox needs; the command is not run."""


def _system_binds() -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "lib", "lib64", "sbin", "lib32"):
        host = Path("/") / name
        if host.is_symlink():
            args += ["--symlink", os.readlink(host), f"/{name}"]
        elif host.is_dir():
            args += ["--ro-bind", str(host), f"/{name}"]
    for name in _ETC_FILES:
        if (Path("/etc") / name).exists():
            args += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    return args


def bwrap_args(worktree: Path) -> list[str]:
    """The bubblewrap command line (without the command)."""
    args = [
        "bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
        *_system_binds(),
        "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
        "--bind", str(worktree), WORKDIR,
    ]
    if (worktree / ".git").exists():  # git's link to the host repository: visible, not writable
        args += ["--ro-bind", str(worktree / ".git"), f"{WORKDIR}/.git"]
    args += [
        "--chdir", WORKDIR, "--clearenv",
        "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin",
        "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp",
        "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
        "--hostname", "sandbox",
    ]
    return args


def prlimit_args(limits: Limits) -> list[str]:
    mb = 1024 * 1024
    return ["prlimit", f"--cpu={limits.cpu_s}", f"--as={limits.memory_mb * mb}",
            f"--fsize={limits.file_mb * mb}", f"--nproc={limits.max_pids}", "--core=0", "--"]


class PidsCgroup:
    """A pids cgroup per command, when the host lets this process create one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, max_pids: int) -> PidsCgroup | None:
        for root in _CGROUP_ROOTS:
            if not (root / "cgroup.procs").exists():
                continue
            path = root / f"fleetplane-{uuid.uuid4().hex[:12]}"
            try:
                path.mkdir()
                (path / "pids.max").write_text(str(max_pids))
                return cls(path)
            except OSError:
                with contextlib.suppress(OSError):
                    path.rmdir()
        return None

    def kill_all(self) -> None:
        for _ in range(50):
            try:
                pids = [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
            except OSError:
                return
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)

    def remove(self) -> None:
        self.kill_all()
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.02)


def _read_capped(f: IO[bytes]) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    if size <= OUTPUT_CAP:
        return f.read().decode("utf-8", "replace")
    head = f.read(OUTPUT_CAP // 2).decode("utf-8", "replace")
    f.seek(size - OUTPUT_CAP // 2)
    tail = f.read().decode("utf-8", "replace")
    return f"{head}\n[... {size - OUTPUT_CAP} bytes elided ...]\n{tail}"


class Sandbox:
    """Runs commands in bubblewrap; probes once whether the kernel allows the namespaces."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._probe: tuple[bool, str] | None = None
        self._lock = threading.Lock()

    def availability(self) -> tuple[bool, str]:
        with self._lock:
            if self._probe is None:
                self._probe = self._run_probe()
            return self._probe

    def _run_probe(self) -> tuple[bool, str]:
        if shutil.which("bwrap") is None:
            return False, "bubblewrap (bwrap) is not installed"
        if shutil.which("prlimit") is None:
            return False, "prlimit (util-linux) is not installed"
        with tempfile.TemporaryDirectory() as d:
            try:
                proc = subprocess.run([*bwrap_args(Path(d)), "true"], capture_output=True,
                                      timeout=20, env={"PATH": "/usr/bin:/bin"})
            except (OSError, subprocess.TimeoutExpired) as exc:
                return False, f"bubblewrap failed to start: {exc}"
        if proc.returncode != 0:
            err = proc.stderr.decode("utf-8", "replace").strip()[:500]
            return False, f"the kernel refused the sandbox's namespaces: {err}"
        return True, "ok"

    def run(self, argv: list[str], worktree: Path, timeout_s: float | None = None,
            cancelled: Callable[[], bool] = lambda: False) -> CommandResult:
        ok, why = self.availability()
        if not ok:
            raise SandboxUnavailable(why)
        limits = self.limits
        timeout = min(timeout_s or limits.timeout_s, limits.timeout_s)
        cgroup = PidsCgroup.create(limits.max_pids)
        cmd = [*prlimit_args(limits), *bwrap_args(worktree), "--", *argv]
        if cgroup is not None:  # join the cgroup before exec: no child escapes it
            cmd = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"',
                   str(cgroup.path / "cgroup.procs"), *cmd]
        start = time.perf_counter()
        timed_out = was_cancelled = False
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        env={"PATH": "/usr/bin:/bin"}, start_new_session=True,
                                        close_fds=True)
                deadline = start + timeout
                while True:
                    try:
                        proc.wait(timeout=0.05)
                        break
                    except subprocess.TimeoutExpired:
                        if cancelled():
                            was_cancelled = True
                        elif time.perf_counter() >= deadline:
                            timed_out = True
                        else:
                            continue
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGKILL)
                        if cgroup is not None:
                            cgroup.kill_all()
                        proc.wait()
                        break
            finally:
                if cgroup is not None:
                    cgroup.remove()
            stdout, stderr = _read_capped(out), _read_capped(err)
        return CommandResult(
            exit_code=None if (timed_out or was_cancelled) else proc.returncode,
            stdout=stdout, stderr=stderr, duration_ms=(time.perf_counter() - start) * 1000,
            timed_out=timed_out, cancelled=was_cancelled)
