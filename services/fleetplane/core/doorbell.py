"""Hand-off doorbells: a committed write wakes the parked consumers of its topics on this host.

The embedded broker answers an empty fetch at once, so an idle consumer parks and probes its
inputs every ``idle_probe_s`` (core.loop.IdleBackoff) instead of holding a fetch open; a record
committed just after a probe then waits for the next one (0-20 ms per hop, every hop of a
task). A doorbell closes that gap without fetching more: a loop that committed records to a
topic sends one datagram to each listener of that topic, and a parked consumer waits on its
socket instead of sleeping, so it probes at once. It is a hint only: a lost, late or missing
ring costs at most the probe interval (the probe still runs), a spurious one one extra probe.

A ring names the partitions its commit wrote to, when the ringer knows them (a loop learns
them from its delivery reports): the datagram is ``<topic>\t<p>,<p>,...``. A woken consumer
then probes only those of its parked partitions (core.loop.IdleBackoff), not every input
partition (the coordinator's repartition step has 31). A ring without partitions (``1``, as
ingest's after an HTTP submit, or a listener waking itself) names every partition.

Listeners are Unix datagram sockets, one per consumer, in a directory per Kafka cluster
(``<tmp>/fleetplane-bell-<hash of the bootstrap servers>``); each topic has a sub-directory of
symlinks to its listeners' sockets. A ring lists the topic's directory and sends to each entry;
an entry whose listener is gone (a killed process) is removed by the first ring that finds it
dead. Services on other hosts are not rung and keep the probe interval.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import socket
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

from fleetplane.core.logging import get_logger

log = get_logger(__name__)


def _short(text: str) -> str:
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:12]


def bell_dir(bootstrap: str) -> Path:
    """The doorbells of one Kafka cluster (several stacks on one host do not wake each other)."""
    return Path(tempfile.gettempdir()) / f"fleetplane-bell-{_short(bootstrap)}"


#: what a ring names: (topic, partition) pairs, or None for every partition of its topics
Named = set[tuple[str, int]] | None
#: the most partitions one datagram names (more: the ring names every partition)
MAX_NAMED = 256


def _queue_limit() -> int:
    """How many datagrams a Unix socket queues before senders are refused (Linux:
    net.unix.max_dgram_qlen, 10 by default)."""
    try:
        return max(1, int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text()))
    except (OSError, ValueError):
        return 10


#: a drain that read this many datagrams may have missed some (see Listener.drain)
QUEUE_LIMIT = _queue_limit()


def _message(topic: str, partitions: Iterable[int] | None) -> bytes:
    parts = sorted(set(partitions or ()))
    if not parts or len(parts) > MAX_NAMED:
        return b"1"
    return f"{topic}\t{','.join(map(str, parts))}".encode()


def parse(data: bytes) -> Named:
    """The partitions a datagram names (None: every one; also for anything unreadable)."""
    topic, sep, parts = data.decode(errors="replace").partition("\t")
    if not sep:
        return None
    try:
        return {(topic, int(p)) for p in parts.split(",")}
    except ValueError:
        return None


def ring(bootstrap: str, topics: Iterable[str] | Mapping[str, Iterable[int]]) -> int:
    """Wake the listeners of `topics` (after their records were committed); how many were
    rung. `topics` may map each topic to the partitions written (the listeners then probe only
    those). Never raises: a doorbell is a hint."""
    root = bell_dir(bootstrap)
    rung = 0
    sock: socket.socket | None = None
    named: Mapping[str, Iterable[int] | None] = (
        topics if isinstance(topics, Mapping) else dict.fromkeys(topics))
    try:
        for topic, partitions in named.items():
            folder = root / _short(topic)
            try:
                entries = os.listdir(folder)
            except OSError:
                continue
            message = _message(topic, partitions)
            for name in entries:
                if sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    sock.setblocking(False)
                path = folder / name
                try:
                    sock.sendto(message, str(path))
                    rung += 1
                except (ConnectionRefusedError, FileNotFoundError):
                    with contextlib.suppress(OSError):  # its listener is gone (killed)
                        target = os.path.realpath(path)
                        path.unlink()
                        os.unlink(target)
                except OSError:
                    pass  # a full buffer: that listener is awake already
    finally:
        if sock is not None:
            sock.close()
    return rung


class Listener:
    """One consumer's doorbell for its input topics."""

    def __init__(self, bootstrap: str, topics: Iterable[str]) -> None:
        self.root = root = bell_dir(bootstrap)
        ident = uuid.uuid4().hex[:12]
        self.path = root / f"{ident}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.links: list[Path] = []
        #: the partitions the rings drained so far named (`take`); `everything`: one named none
        self.named: set[tuple[str, int]] = set()
        self.everything = False
        try:
            for attempt in (1, 2):  # a listener closing meanwhile may remove an empty folder
                try:
                    root.mkdir(mode=0o700, parents=True, exist_ok=True)
                    self.sock.bind(str(self.path))
                    break
                except FileNotFoundError:
                    if attempt == 2:
                        raise
            self.sock.setblocking(False)
            for topic in set(topics):
                folder = root / _short(topic)
                link = folder / ident
                for attempt in (1, 2):
                    try:
                        folder.mkdir(mode=0o700, exist_ok=True)
                        link.symlink_to(self.path)
                        break
                    except FileNotFoundError:
                        if attempt == 2:
                            raise
                self.links.append(link)
        except OSError:
            self.close()
            raise

    def wait(self, timeout_s: float) -> bool:
        """Until rung (True, the rings so far drained into `named`) or `timeout_s` passed
        (False)."""
        try:
            ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout_s))
        except (OSError, ValueError):  # closed meanwhile
            return False
        if not ready:
            return False
        self.drain()
        return True

    def drain(self) -> bool:
        """Take the rings that came (without waiting) into `named`; whether there were any.

        A full queue means rings were dropped (a sender finds it full and gives up: the
        listener is awake anyway), so what they named is unknown: every partition then."""
        got = 0
        with contextlib.suppress(OSError):  # nothing more to read (or closed meanwhile)
            while data := self.sock.recv(4096):
                got += 1
                parts = parse(data)
                if parts is None:
                    self.everything = True
                else:
                    self.named |= parts
        if got >= QUEUE_LIMIT:
            self.everything = True
        return got > 0

    def take(self) -> Named:
        """What the rings drained since the last take named (None: every partition), and
        forget it."""
        named: Named = None if self.everything else self.named
        self.named, self.everything = set(), False
        return named

    def wake(self) -> None:
        """Ring this listener itself (its owner stops, or has work to commit)."""
        with contextlib.suppress(OSError):  # closed meanwhile, or already rung (buffer full)
            self.sock.sendto(b"1", str(self.path))

    def close(self) -> None:
        for link in self.links:
            with contextlib.suppress(OSError):
                link.unlink()
            with contextlib.suppress(OSError):
                link.parent.rmdir()  # the last listener of the topic on this host
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            self.root.rmdir()  # the last listener of the cluster: no litter in <tmp>
        self.sock.close()


def listener(bootstrap: str, topics: Iterable[str]) -> Listener | None:
    """A listener, or None where the host cannot have one (no Unix sockets, a path too long,
    a read-only temp dir): the consumer then keeps the probe interval."""
    try:
        return Listener(bootstrap, topics)
    except (OSError, AttributeError) as exc:
        log.warning("no hand-off doorbell: probing at the interval", error=str(exc))
        return None
