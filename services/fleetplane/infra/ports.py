"""Who holds a port: `fleetplane up` names a stale process on one of its ports instead of
failing later with "exited during start-up" (issue 19)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

from fleetplane.infra.broker import port_open


@dataclass(frozen=True)
class PortHolder:
    role: str  # what the stack wanted the port for (ingest, broker, ...)
    port: int
    pid: int | None  # None: the process is not visible to this user
    command: str

    @property
    def ours(self) -> bool:
        """A process of a fleetplane stack (a service, the fake provider, the broker)."""
        return "fleetplane" in self.command or "noida" in self.command

    def describe(self) -> str:
        who = (f"pid {self.pid} ({self.command[:160]})" if self.pid is not None
               else "a process of another user")
        hint = ("a stale fleetplane process (left by a crashed stack): stop it with "
                f"`kill -- -{self._pgid()}` or `fleetplane down`" if self.ours
                else "not fleetplane: free the port or choose another (FLEETPLANE_* settings)")
        return f"port {self.port} ({self.role}) is held by {who}: {hint}"

    def _pgid(self) -> int | str:
        try:
            return os.getpgid(self.pid) if self.pid is not None else "PGID"
        except ProcessLookupError:
            return self.pid or "PGID"


def _listeners() -> dict[int, int | None]:
    """port -> pid of every TCP socket listening on this machine (pid None: not ours to see)."""
    out: dict[int, int | None] = {}
    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        conns = []
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr:
            port = int(c.laddr.port)
            if out.get(port) is None:
                out[port] = c.pid
    return out


def port_holders(wanted: dict[str, int], host: str = "127.0.0.1") -> list[PortHolder]:
    """Of `wanted` (role -> port), the ports already in use on `host`, with their holder."""
    busy = {role: port for role, port in wanted.items() if port and port_open(host, port)}
    if not busy:
        return []
    listeners = _listeners()
    out = []
    for role, port in busy.items():
        pid = listeners.get(port)
        command = ""
        if pid is not None:
            try:
                command = " ".join(psutil.Process(pid).cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                command = ""
        out.append(PortHolder(role, port, pid, command))
    return out
