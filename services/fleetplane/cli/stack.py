"""The embedded stack: broker, topics, fake provider and the five services as supervised OS
processes on 127.0.0.1. Used by `fleetplane up` (through the supervisor), the tests and the bench.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from fleetplane.core.doorbell import bell_dir
from fleetplane.core.errors import EXIT_RESTART
from fleetplane.core.localstack import ADMIN_TOKEN_FILE
from fleetplane.core.settings import Settings
from fleetplane.core.topics import ensure_topics, load_topics
from fleetplane.infra.broker import EmbeddedBroker, free_port, stop_group
from fleetplane.ingest.tokens import ensure_local_admin, issue

SERVICES = ("ingest", "router", "coordinator", "executor", "accounting", "reconciler")
#: services no task waits for: they run at Settings.background_nice (docs/operations.md)
BACKGROUND_SERVICES = ("accounting", "reconciler")
#: the second coordinator process: a standby that takes the active role when the active one dies
#: (docs/coordinator.md, "Failover"); after a failover either process may be the active one
COORDINATOR_STANDBY = "coordinator-b"
#: processes with a metrics port of their own (ingest and accounting serve /metrics on their
#: HTTP ports); the setting each reads it from (docs/operations.md, "Metrics")
METRICS_PORT_SETTINGS = {"router": "FLEETPLANE_ROUTER_METRICS_PORT",
                         "coordinator": "FLEETPLANE_COORDINATOR_METRICS_PORT",
                         COORDINATOR_STANDBY: "FLEETPLANE_COORDINATOR_METRICS_PORT",
                         "executor": "FLEETPLANE_EXECUTOR_METRICS_PORT",
                         "reconciler": "FLEETPLANE_RECONCILER_METRICS_PORT"}


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    env: dict[str, str] = field(default_factory=dict)  # on top of the stack's environment

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Stack:
    """Processes of one fleetplane deployment on this machine.

    `env` is the FLEETPLANE_* environment every child gets; `start()` brings up the broker (unless
    an external bootstrap is given), creates the topics, then the fake provider and services."""

    data_dir: Path
    external_bootstrap: str | None = None
    fake_provider: bool = True
    fake_provider_args: list[str] = field(default_factory=list)
    services: tuple[str, ...] = SERVICES
    extra_env: dict[str, str] = field(default_factory=dict)
    broker_port: int = 0
    ingest_port: int = 0
    accounting_port: int = 0
    provider_port: int = 0
    coordinator_web_port: int = 0
    reconciler_port: int = 0
    coordinator_standby: bool = True  # a second coordinator process (standby)
    #: the takeover wait of the first coordinator's first start on a broker no other deployment
    #: uses: nothing else can hold the active role there, so waiting the full
    #: coordinator_takeover_s (5 s) for an active that does not exist only delays `up`; its
    #: restarts wait the full time (docs/testing.md, "Start-up")
    first_takeover_s: float = 1.0
    #: the broker is this stack's alone (None: when the stack starts the embedded one itself;
    #: a caller that started a broker of its own for the stack, as the tansu test does, says so)
    private_broker: bool | None = None
    #: process name -> metrics port (METRICS_PORT_SETTINGS; free ports for those not given)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    #: how many times `wait_ready` restarts a process that exited with EXIT_RESTART before it
    #: counts as a start-up failure
    restart_requests: int = 3
    broker: EmbeddedBroker | None = None
    children: dict[str, Child] = field(default_factory=dict)
    admin_token: str = ""

    def __post_init__(self) -> None:
        self.data_dir = self.data_dir.resolve()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.ingest_port = self.ingest_port or free_port()
        self.accounting_port = self.accounting_port or free_port()
        self.provider_port = self.provider_port or free_port()
        self.coordinator_web_port = self.coordinator_web_port or free_port()
        self.reconciler_port = self.reconciler_port or free_port()
        for name in METRICS_PORT_SETTINGS:
            self.metrics_ports[name] = self.metrics_ports.get(name) or free_port()

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def bootstrap(self) -> str:
        if self.external_bootstrap:
            return self.external_bootstrap
        assert self.broker is not None, "broker not started"
        return self.broker.bootstrap

    @property
    def ingest_url(self) -> str:
        return f"http://127.0.0.1:{self.ingest_port}"

    @property
    def accounting_url(self) -> str:
        return f"http://127.0.0.1:{self.accounting_port}"

    @property
    def reconciler_url(self) -> str:
        return f"http://127.0.0.1:{self.reconciler_port}"

    @property
    def provider_url(self) -> str:
        return f"http://127.0.0.1:{self.provider_port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "FLEETPLANE_KAFKA_BOOTSTRAP": self.bootstrap,
            "FLEETPLANE_DATA_DIR": str(self.data_dir),
            "FLEETPLANE_INGEST_PORT": str(self.ingest_port),
            "FLEETPLANE_ACCOUNTING_PORT": str(self.accounting_port),
            "FLEETPLANE_COORDINATOR_WEB_PORT": str(self.coordinator_web_port),
            "FLEETPLANE_RECONCILER_PORT": str(self.reconciler_port),
            **{METRICS_PORT_SETTINGS[n]: str(self.metrics_ports[n])
               for n in ("router", "coordinator", "executor", "reconciler")},
            "FLEETPLANE_BIND_HOST": "127.0.0.1",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "PYTHONUNBUFFERED": "1",
        })
        if self.fake_provider:
            env["FLEETPLANE_ANTHROPIC_BASE_URL"] = self.provider_url
            env["FLEETPLANE_OPENAI_BASE_URL"] = f"{self.provider_url}/v1"
        env.update(self.extra_env)
        return env

    def settings(self) -> Settings:
        extra = self.extra_env.get("FLEETPLANE_KAFKA_CONFIG")
        return Settings(
            kafka_bootstrap=self.bootstrap, data_dir=self.data_dir,
            ingest_port=self.ingest_port, accounting_port=self.accounting_port,
            **({"kafka_config": json.loads(extra)} if extra else {}),
        )

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout_s: float = 120.0) -> None:
        """Start the broker (unless external), the provider and the services, and wait until
        they answer. A start that fails stops what it had started (no orphan broker or service
        holding ports or the data directory) and raises."""
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> None:
        if not self.external_bootstrap:
            self.broker = EmbeddedBroker(self.data_dir / "broker", port=self.broker_port,
                                         log_file=self.log_dir / "broker.log")
            self.broker.start()
        settings = self.settings()
        ensure_topics(settings.client_config(), load_topics(settings.topics_file))
        self.admin_token = ensure_local_admin(settings, self.data_dir)
        if self.fake_provider:
            self._spawn("fake-provider", [sys.executable, "-m", "fleetplane.fakeprovider.server",
                                          "--port", str(self.provider_port),
                                          *self.fake_provider_args])
        first_start = ({"FLEETPLANE_COORDINATOR_TAKEOVER_S": str(self.first_takeover_s)}
                       if (self.private_broker if self.private_broker is not None
                           else not self.external_bootstrap)
                       and "FLEETPLANE_COORDINATOR_TAKEOVER_S" not in self.extra_env else {})
        background = {"FLEETPLANE_NICE": str(settings.background_nice)}
        for name in self.services:
            coordinator = name == "coordinator"
            self._spawn(name, [sys.executable, "-m", f"fleetplane.{name}.main"],
                        {"FLEETPLANE_INSTANCE_ID": "a"} if coordinator
                        else background if name in BACKGROUND_SERVICES else None,
                        once=first_start if coordinator else None)
        self.wait_ready(timeout_s)
        if "coordinator" in self.services and self.coordinator_standby:
            # started once the first one is active, so that one is the active one
            self._spawn(COORDINATOR_STANDBY,
                        [sys.executable, "-m", "fleetplane.coordinator.main"],
                        {"FLEETPLANE_INSTANCE_ID": "b",
                         METRICS_PORT_SETTINGS[COORDINATOR_STANDBY]:
                             str(self.metrics_ports[COORDINATOR_STANDBY])})

    def issue_token(self, team: str, role: str = "team") -> str:
        """A new API token for `team` (published to fleet.tokens; ingest follows it)."""
        token, _ = issue(self.settings(), team, role, created_by="stack")
        return token

    def wait_token(self, token: str, timeout_s: float = 30.0) -> None:
        """Wait until ingest knows `token` (it follows fleet.tokens in the background)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.ingest_url}/v1/whoami", timeout=2.0,
                             headers={"Authorization": f"Bearer {token}"}).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)  # each miss counts against the failed-token limit (30/min)
        raise RuntimeError(f"ingest did not learn the token within {timeout_s}s")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None,
               once: dict[str, str] | None = None) -> Child:
        """Start `name`; `env` stays with the child (its restarts get it too), `once` is for
        this start only."""
        child = self.children.get(name) or Child(name, argv, self.log_dir / f"{name}.log",
                                                 env=env or {})
        with open(child.log_path, "ab") as log:
            child.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL,
                                          env={**self.env(), **child.env, **(once or {})},
                                          start_new_session=True)
        child.started_at = time.monotonic()
        self.children[name] = child
        return child

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        urls = []
        if "ingest" in self.services:
            urls.append(f"{self.ingest_url}/healthz")
        if "accounting" in self.services:
            urls.append(f"{self.accounting_url}/healthz")
        if self.fake_provider:
            urls.append(f"{self.provider_url}/_fake/health")
        if "coordinator" in self.services:
            urls.append(f"http://127.0.0.1:{self.coordinator_web_port}/healthz")
        if "reconciler" in self.services:
            urls.append(f"{self.reconciler_url}/healthz")
        deadline = time.monotonic() + timeout_s
        pending = list(urls)
        asked: dict[str, int] = {}
        while pending and time.monotonic() < deadline:
            for name, child in self.children.items():
                if child.alive():
                    continue
                code = child.proc.returncode if child.proc is not None else None
                if code == EXIT_RESTART and asked.get(name, 0) < self.restart_requests:
                    # it asked for a restart (a standby that lost the role to a later claimant,
                    # a transactional call that hung): what the supervisor does, done here
                    asked[name] = asked.get(name, 0) + 1
                    self.restart(name)
                    continue
                raise RuntimeError(f"{name} exited during start-up (status {code}); "
                                   f"see {child.log_path}")
            url = pending[0]
            try:
                if httpx.get(url, timeout=1.0).status_code < 500:
                    pending.pop(0)
                    continue
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        if pending:
            raise RuntimeError(f"not ready within {timeout_s}s: {pending}")
        if "ingest" in self.services and self.admin_token:
            self.wait_token(self.admin_token, max(1.0, deadline - time.monotonic()))

    def kill(self, name: str) -> None:
        """SIGKILL a service (as a crash would)."""
        child = self.children[name]
        if child.proc is not None:
            stop_group(child.proc.pid, timeout_s=0)
            child.proc.wait(10)

    def restart(self, name: str) -> None:
        child = self.children[name]
        if child.alive():
            self.stop_child(name)
        child.restarts += 1
        self._spawn(name, child.argv)

    def active_coordinator(self) -> str | None:
        """The name of the coordinator process in the active role (the one serving the
        coordinator's web port says which instance it is), or None."""
        try:
            stats = httpx.get(f"http://127.0.0.1:{self.coordinator_web_port}"
                              "/coordinator/stats/", timeout=2.0).json()
        except (httpx.HTTPError, ValueError):
            return None
        for name in ("coordinator", COORDINATOR_STANDBY):
            child = self.children.get(name)
            if child is not None and child.env.get("FLEETPLANE_INSTANCE_ID") == stats.get(
                    "instance"):
                return name
        return None

    def stop_child(self, name: str, timeout_s: float = 20.0) -> None:
        self.stop_children([name], timeout_s)

    def supervise_once(self, backoff_s: float = 1.0) -> list[str]:
        """Restart the broker (embedded) and children that exited; returns their names.

        A dead broker (a crash, the OOM killer, SIGKILL) is restarted on the same port and data
        directory, with a backoff that grows with its restarts; the services reconnect on their
        own (librdkafka retries), so they are not restarted for it. What the broker had
        acknowledged but not yet written is lost on a hard kill (docs/operations.md).

        After a broker that *crashed* is back, the services are restarted too (SIGKILL, then
        started again): on the embedded broker a consume-transform-produce loop that lived
        through the crash stays blocked (measured: a transactional Processor read one record
        after the restart and hung; a fresh one went on at once), while a restarted one fences
        its predecessor's transaction and goes on from the committed offsets."""
        restarted = []
        broker = self.broker
        if broker is not None and not broker.alive() and (
                time.monotonic() - broker.started_at >= backoff_s * (1 + min(broker.restarts, 5))):
            broker.restarts += 1
            try:
                broker.start()
                restarted.append("broker")
            except RuntimeError:  # tried again at the next round, after the backoff
                broker.started_at = time.monotonic()
            if "broker" in restarted:
                for name, child in self.children.items():
                    if name == "fake-provider" or child.proc is None:
                        continue
                    if child.proc.poll() is None:
                        stop_group(child.proc.pid, timeout_s=0)
                        child.proc.wait(10)
                    child.restarts += 1
                    self._spawn(name, child.argv)
                    restarted.append(name)
        for name, child in self.children.items():
            if child.proc is not None and child.proc.poll() is not None:
                if time.monotonic() - child.started_at < backoff_s * (1 + min(child.restarts, 5)):
                    continue
                child.restarts += 1
                self._spawn(name, child.argv)
                restarted.append(name)
        return restarted

    def stop(self) -> None:
        # services first (they checkpoint on SIGTERM), then the provider, then the broker; the
        # coordinator standby before the coordinators' active (it would take over otherwise);
        # the services together (one SIGTERM each, then one wait: not 5-20 s per service)
        if COORDINATOR_STANDBY in self.children:
            self.stop_child(COORDINATOR_STANDBY)
        self.stop_children([n for n in SERVICES if n in self.children])
        self.stop_children(list(self.children))
        if self.broker is not None:
            self.broker.stop()
            # its services' doorbells (core.doorbell; every service is stopped by now): a
            # killed service leaves its socket, and a test or bench stack's folder is named by
            # a port no later stack asks for; a stack started again makes new listeners
            shutil.rmtree(bell_dir(self.broker.bootstrap), ignore_errors=True)

    def stop_children(self, names: list[str], timeout_s: float = 20.0) -> None:
        """SIGTERM to the process group of each of `names` at once, then one wait for all (not
        5-20 s per service), SIGKILL to what is left after `timeout_s`. Each child is reaped
        through its Popen, so `child.proc.returncode` is its real exit status (infra.broker's
        stop_groups reaps by pid, which left Popen to report 0 for any exit)."""
        running: dict[subprocess.Popen[bytes], int] = {}
        for name in names:
            proc = self.children[name].proc
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    running[proc] = os.getpgid(proc.pid)
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            for pgid in running.values():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, sig)
            deadline = time.monotonic() + wait
            while running and time.monotonic() < deadline:
                for proc, pgid in list(running.items()):
                    if proc.poll() is not None and not _group_alive(pgid):
                        del running[proc]
                time.sleep(0.05)
            if not running:
                return
        for proc in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)

    def metrics_urls(self) -> dict[str, str]:
        """Every scrape endpoint of the stack's services, by process name."""
        urls = {name: f"http://127.0.0.1:{port}/metrics" for name, port in
                (("ingest", self.ingest_port), ("accounting", self.accounting_port))
                if name in self.services}
        for name, port in self.metrics_ports.items():
            standby = name == COORDINATOR_STANDBY
            if ("coordinator" if standby else name) in self.services and (
                    not standby or self.coordinator_standby):
                urls[name] = f"http://127.0.0.1:{port}/metrics"
        return urls

    def describe(self) -> dict[str, object]:
        return {
            "metrics": self.metrics_urls(),
            "bootstrap": self.bootstrap,
            "ingest_url": self.ingest_url,
            "accounting_url": self.accounting_url,
            "coordinator_url": f"http://127.0.0.1:{self.coordinator_web_port}",
            "reconciler_url": self.reconciler_url,
            "provider_url": self.provider_url if self.fake_provider else None,
            "data_dir": str(self.data_dir),
            "admin_token_file": str(self.data_dir / ADMIN_TOKEN_FILE),
            "services": {n: {"pid": c.pid, "restarts": c.restarts, "log": str(c.log_path)}
                         for n, c in self.children.items()},
            "broker": ({"pid": self.broker.pid, "restarts": self.broker.restarts,
                        "log": str(self.broker.log_file), "bootstrap": self.broker.bootstrap}
                       if self.broker is not None else None),
        }


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
