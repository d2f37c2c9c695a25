"""Composition helpers shared by the services' entry points."""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn

from fleetplane.core.logging import configure_logging, get_logger
from fleetplane.core.settings import Settings, get_settings
from fleetplane.core.topics import ensure_topics, load_topics


def bootstrap(service: str, settings: Settings | None = None) -> Settings:
    """Settings, logging and topics for a service process."""
    settings = settings or get_settings()
    # a crash in native code (librdkafka, chdb) prints every thread's Python stack to stderr,
    # i.e. the service's log: stop 27's rehearsal had an ingest exit with SIGSEGV on SIGTERM,
    # after "processor stopped", and nothing in its log said where
    faulthandler.enable()
    lower_priority(settings.nice)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    configure_logging(service, settings.log_level, settings.log_json)
    ensure_topics(settings.client_config(), load_topics(settings.topics_file))
    get_logger(__name__).info("service starting", bootstrap=settings.kafka_bootstrap)
    return settings


def lower_priority(nice: int) -> None:
    """Run every thread of this process at niceness `nice` (at least), threads started later
    included. Linux keeps the nice value per thread and new threads inherit their creator's,
    so each thread that exists now (an import may have started one) is set, not only the
    caller. Never raises the priority: a process already nicer stays so."""
    if nice <= 0:
        return
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        with contextlib.suppress(OSError):
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)


def freeze_startup_heap() -> int:
    """Once start-up is done: collect, then move every object that exists now (modules, SDK
    clients, schemas: ~290,000 in the executor) to the collector's permanent generation
    (`gc.freeze`), so later collections no longer scan them. Returns how many were frozen.

    Without it, the first burst of the executor's claims set off collections that scanned the
    whole start-up heap with the GIL held: 0.47 s of garbage collection in a first fill of
    0.61 s (500 claims, load 7; docs/executor.md stop 20). What is frozen is never freed: call
    it once, after start-up, not per request."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the block, back to its previous state after it
    (also when the block raises). For a batch step that allocates hundreds of thousands of
    objects without reference cycles (accounting's decoded records and row tuples, freed by
    reference counting): with the collector on, their allocations set off a collection every
    700 and full ones over everything the batch still holds (docs/accounting.md, "Sink,
    sixteenth round"). Cycles the block does create are collected after it. The switch is
    process-wide: other threads' collections wait for the block too."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class ThreadedServer(uvicorn.Server):
    """A uvicorn server that runs in `thread` (serve_http_in_thread)."""

    thread: threading.Thread | None = None

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the server to exit and wait (up to `timeout_s`) until its requests in flight
        are answered, before the caller closes what they use (the producer, ClickHouse): a
        request still running while the interpreter shuts down would use a client already
        closed."""
        self.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout_s)


def serve_http_in_thread(app: Any, host: str, port: int,
                         trusted_proxies: str = "", reuse_port: bool = False
                         ) -> ThreadedServer:
    """Run a FastAPI app beside a processor loop (uvicorn in a daemon thread).

    X-Forwarded-For is believed only from `trusted_proxies` (uvicorn's default would trust any
    local peer, which would let a local client pick its address for per-address limits).
    `reuse_port`: bind with SO_REUSEPORT, so that several processes serve one port (the kernel
    spreads the connections; fleetplane.ingest.workers)."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            lifespan="on", proxy_headers=bool(trusted_proxies),
                            forwarded_allow_ips=trusted_proxies or None)
    kwargs: dict[str, Any] = {}
    if reuse_port:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        kwargs["sockets"] = [sock]
    server = ThreadedServer(config)
    server.thread = threading.Thread(target=server.run, kwargs=kwargs, name="http",
                                     daemon=True)
    server.thread.start()
    return server

