"""Chaos run: N tasks through the services while each service is SIGKILLed and restarted in
turn, the broker is restarted cleanly and then SIGKILLed (the supervisor restarts it), and the
fake provider fails 10% of calls and stalls some.

    python -m bench.chaos --tasks 2000           (make chaos)

Then it proves from the topics and from ClickHouse (through the accounting API) that every
accepted task reached exactly one terminal state, that no attempt's effects happened twice (model
calls, commits in the git repository, cost in ClickHouse), that no two overlapping write scopes ran
at once and no team ran more than its quota; it prints lost / duplicated / stuck counts and writes
them to bench/results/chaos-<time>.json. tests/e2e/test_chaos.py runs the same at a small scale.

A SIGKILLed embedded broker loses the writes it acknowledged in its last moments
(docs/operations.md): submissions answered 202 whose records the broker lost are counted apart
(``broker_lost``, each named), and the run then does what a client with idempotency keys does:
it submits them again with the same keys until they are accepted. They count as lost only if
that does not get them done. Tasks the broker kept must all end (stuck 0): the reconciler
re-drives those whose next event was lost.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.table import Table

from bench.measure import bench_dir
from bench.pipeline import bench_teams_file
from fleetplane.cli.stack import Stack
from fleetplane.core import events as ev
from fleetplane.core.settings import Settings
from fleetplane.core.teams import load_teams
from fleetplane.ingest.idempotency import task_id_for
from fleetplane.metrics.lag import ConsumerLag, open_transactions
from fleetplane.testing.invariants import Log, Verdict, check, read_log

RESULTS = Path(__file__).resolve().parent / "results"
REPO = "chaos"
WORKSPACE_EVERY = 3  # every third task edits the repository, the others are plain calls


@dataclass
class ChaosConfig:
    tasks: int = 2000
    rate: float = 40.0               # submissions per second (paced, so faults hit a busy stack)
    failure_rate: float = 0.10       # fake provider: share of calls answered 429/500/529
    stall_rate: float = 0.02         # share of calls that stall
    stall_ms: float = 3000.0
    latency_ms: float = 100.0        # every call, so attempts are in flight when the executor dies
    down_s: float = 2.0              # how long a killed service stays down
    settle_s: float = 600.0          # wait for terminal states after the last submission
    # the executor first, while attempts are in flight (after the coordinator's restart the
    # fleet is briefly idle); the coordinator last before the broker
    kill_order: tuple[str, ...] = ("executor", "ingest", "router", "accounting", "reconciler",
                                   "coordinator")
    areas: int = 0                   # write-scope groups (tasks of one area serialize on its
                                     # lease); 0: one per 40 tasks, at least 8

    @property
    def area_count(self) -> int:
        return self.areas or max(8, self.tasks // 40)
    restart_broker: bool = True      # a clean broker stop and start
    kill_broker: bool = True         # then SIGKILL of the broker; the supervisor restarts it
    reconciler_deadline_s: float = 20.0
    client_retry_rounds: int = 3     # re-submissions of broker-lost tasks, same keys
    # audit chains are reported level-triggered too (executor/chains.py: an attempt declared
    # lost whose dispatch never came back is reported from the journal ~30-45 s after the
    # declaration): once every task ended, the audit check waits up to this long for them
    audit_settle_s: float = 120.0


@dataclass
class ChaosResult:
    config: dict[str, Any]
    faults: list[str] = field(default_factory=list)
    unplanned_restarts: dict[str, int] = field(default_factory=dict)
    submit_retries: int = 0
    verdict: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    clickhouse: dict[str, Any] = field(default_factory=dict)
    git: dict[str, Any] = field(default_factory=dict)
    broker_lost: list[str] = field(default_factory=list)  # "i: task id", acked then lost
    broker_lost_done: int = 0  # of those, done after the client re-submitted them
    reconciler: dict[str, Any] = field(default_factory=dict)
    load_average: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    phases_s: dict[str, float] = field(default_factory=dict)
    #: when there are problems, read before the stack stops: partitions held by an open
    #: transaction and each consumer group's lag (where the pipeline stands still)
    diagnosis: dict[str, Any] = field(default_factory=dict)

    @property
    def problems(self) -> dict[str, int]:
        out = {k: v for k, v in self.counts.items() if v}
        out.update({f"clickhouse.{k}": len(v) for k, v in self.clickhouse.items()
                    if isinstance(v, list) and v})
        out.update({f"git.{k}": len(v) for k, v in self.git.items()
                    if isinstance(v, list) and v})
        return out


def make_repo(root: Path, areas: int) -> Path:
    """A bare repository (the intended setup for registered repositories) with one commit."""
    work = root / "chaos-src"
    bare = root / "chaos.git"
    work.mkdir(parents=True)
    for k in range(areas):
        (work / f"area-{k}").mkdir()
        (work / f"area-{k}" / "README.md").write_text(f"area {k}\n")

    def git(*args: str, cwd: Path = work) -> None:
        subprocess.run(["git", "-c", "user.name=chaos", "-c", "user.email=chaos@localhost",
                        *args], cwd=cwd, check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    git("add", "-A")
    git("commit", "-q", "-m", "chaos: initial")
    git("clone", "-q", "--bare", str(work), str(bare), cwd=root)
    return bare


def provider_script(cfg: ChaosConfig) -> dict[str, Any]:
    """Workspace tasks write one file in their area, then answer; everything may fail or stall."""
    replies = [{"match": f"<write:area-{k}>", "times": None,
                "tool_uses": [{"name": "write_file",
                               "input": {"path": f"area-{k}/notes.md",
                                         "content": f"chaos notes for area {k}\n"}}]}
               for k in range(cfg.area_count)]
    return {"replies": replies, "failure_rate": cfg.failure_rate, "stall_rate": cfg.stall_rate,
            "stall_ms": cfg.stall_ms, "latency_ms": cfg.latency_ms, "seed": 7}


def team_of(i: int, teams: list[str]) -> str:
    """Round robin over the teams, shifted every WORKSPACE_EVERY tasks so that every team gets
    workspace tasks too."""
    return teams[(i + i // WORKSPACE_EVERY) % len(teams)]


def manifest(i: int, run: str, teams: list[str], areas: int) -> dict[str, Any]:
    team = team_of(i, teams)
    spec: dict[str, Any] = {"taskType": "summarize", "prompt": f"[chaos:{run}:{i}] summarize"}
    if i % WORKSPACE_EVERY == 0:
        area = (i // WORKSPACE_EVERY) % areas
        spec = {"taskType": "codegen",
                "prompt": f"[chaos:{run}:{i}] <write:area-{area}> update the notes",
                "workspace": {"repository": REPO}, "writeScope": [f"area-{area}/**"],
                "limits": {"maxTurns": 4}}
    return {"apiVersion": "fleetplane/v1", "kind": "AgentTask",
            "metadata": {"name": f"chaos-{i}", "team": team},
            "idempotencyKey": f"{run}-{i}", "spec": spec}


class Submitter:
    """Paced HTTP submissions with idempotency keys, retried through ingest restarts."""

    def __init__(self, stack: Stack, run: str, teams: list[str], cfg: ChaosConfig) -> None:
        self.stack, self.run, self.teams, self.cfg = stack, run, teams, cfg
        self.acknowledged: set[str] = set()
        self.answers: Counter[int] = Counter()  # HTTP status of the final answers
        self.retries = 0
        self.gave_up: list[int] = []
        self._lock = threading.Lock()
        self._local = threading.local()

    def one(self, i: int, start: float) -> None:
        delay = start + i / self.cfg.rate - time.time()
        if delay > 0:
            time.sleep(delay)
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = httpx.Client(timeout=15)
        m = manifest(i, self.run, self.teams, self.cfg.area_count)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                resp = client.post(f"{self.stack.ingest_url}/v1/tasks", json=m,
                                   headers={"Authorization": f"Bearer {self.stack.admin_token}"})
                if resp.status_code in (200, 202):
                    with self._lock:
                        self.acknowledged.add(resp.json()["task_id"])
                        self.answers[resp.status_code] += 1
                    return
                if resp.status_code < 500 and resp.status_code != 429:
                    raise RuntimeError(f"task {i} refused: {resp.status_code} {resp.text[:300]}")
            except httpx.HTTPError:
                pass
            with self._lock:
                self.retries += 1
            time.sleep(0.5)
        with self._lock:
            self.gave_up.append(i)

    def run_all(self, n: int) -> None:
        start = time.time()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: self.one(i, start), range(n)))


class Faults:
    """Kills each service in turn (SIGKILL, restart after down_s), then restarts the broker, at
    even intervals over the submission window; restarts anything that exits on its own."""

    def __init__(self, stack: Stack, cfg: ChaosConfig, window_s: float,
                 log: Callable[[str], None]) -> None:
        self.stack, self.cfg, self.log = stack, cfg, log
        steps: list[str] = list(cfg.kill_order) + (["broker"] if cfg.restart_broker else []) \
            + (["broker-kill"] if cfg.kill_broker else [])
        self.plan = steps
        self.every = max(3.0, window_s / (len(steps) + 1))
        self.done: list[str] = []
        self.unplanned: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)

    def _supervise(self) -> None:
        for name in self.stack.supervise_once(backoff_s=0.5):
            self.unplanned[name] += 1
            self.log(f"{name} exited on its own: restarted")

    def _kill_broker(self) -> None:
        """SIGKILL the broker's process group (a host crash, the OOM killer), then supervise
        until the supervisor's backoff restarts it."""
        broker = self.stack.broker
        assert broker is not None and broker.pid is not None
        os.killpg(os.getpgid(broker.pid), signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            restarted = self.stack.supervise_once(backoff_s=0.5)
            if "broker" in restarted:  # the services are restarted with it
                self.log(f"supervisor restarted {', '.join(restarted)}")
                return
            for name in restarted:
                self.unplanned[name] += 1
                self.log(f"{name} exited on its own: restarted")
            time.sleep(0.2)
        raise RuntimeError("the supervisor did not restart the broker within 120 s")

    def _run(self) -> None:
        for step in self.plan:
            until = time.monotonic() + self.every
            while time.monotonic() < until:
                if self._stop.wait(0.5):
                    return
                self._supervise()
            t = time.time()
            if step == "broker-kill":
                self._kill_broker()
            elif step == "broker":
                assert self.stack.broker is not None
                self.stack.broker.stop(timeout_s=5)
                time.sleep(self.cfg.down_s)
                self.stack.broker.start()
            else:
                self.stack.kill(step)
                time.sleep(self.cfg.down_s)
                self.stack.restart(step)
            self.done.append(step)
            what = {"broker": "restarted", "broker-kill": "SIGKILL, restarted by the supervisor"}
            self.log(f"{step}: {what.get(step, 'SIGKILL + restart')} ({time.time() - t:.1f} s)")
        while not self._stop.wait(0.5):
            self._supervise()


def clickhouse_checks(stack: Stack, teams: list[str], acknowledged: set[str],
                      verdict_terminal: dict[str, str], topic_cost: dict[str, float],
                      timeout_s: float) -> dict[str, Any]:
    """What analysts see must match the log: one row per task in its terminal state, and cost per
    team equal to the distinct model calls' cost on the topic (no call charged twice)."""
    out: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s
    rows: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=stack.accounting_url, timeout=30) as http:
        while time.monotonic() < deadline:
            rows = {}
            try:
                for team in teams:
                    for r in http.get("/v1/tasks", params={"team": team,
                                                           "limit": 100_000}).json():
                        rows[r["task_id"]] = r
            except (httpx.HTTPError, ValueError):
                time.sleep(1)
                continue
            if all(rows.get(t, {}).get("state") == s for t, s in verdict_terminal.items()):
                # the model calls are on other partitions than the outcomes: the sink may still
                # be behind on them; ClickHouse below the topic is waited for (above it is not
                # lag: calls the broker lost after accounting stored them, explain_broker_loss)
                try:
                    costs = {r["team"]: r["cost_usd"] for r in http.get(
                        "/v1/cost", params={"by": "team"}).json()}
                except (httpx.HTTPError, ValueError):
                    costs = {}
                if all(costs.get(t, 0.0) >= topic_cost.get(t, 0.0) - 1e-9 for t in teams):
                    break
            time.sleep(1)
        out["tasks_in_clickhouse"] = len(rows)
        out["missing"] = sorted(t for t in acknowledged if t not in rows)
        out["state_mismatches"] = sorted(
            f"{t}: log {s}, clickhouse {rows.get(t, {}).get('state')}"
            for t, s in verdict_terminal.items() if rows.get(t, {}).get("state") != s)
        costs = {r["team"]: r for r in http.get("/v1/cost", params={"by": "team"}).json()}
        out["cost_by_team"] = {t: round(costs.get(t, {}).get("cost_usd", 0.0), 9)
                               for t in teams}
        out["cost_mismatches"] = sorted(
            f"{t}: topic {topic_cost.get(t, 0.0):.9f}, clickhouse "
            f"{costs.get(t, {}).get('cost_usd', 0.0):.9f}" for t in teams
            if abs(costs.get(t, {}).get("cost_usd", 0.0) - topic_cost.get(t, 0.0)) > 1e-9)
        # the daily rollups (materialized views) behind /v1/cost/daily and the dashboard
        daily = {t: sum(r["cost_usd"] for r in http.get("/v1/cost/daily", params={
            "by": "team", "team": t}).json()) for t in teams}
        out["daily_cost_mismatches"] = sorted(
            f"{t}: topic {topic_cost.get(t, 0.0):.9f}, daily rollup {daily[t]:.9f}"
            for t in teams if abs(daily[t] - topic_cost.get(t, 0.0)) > 1e-9)
    return out


STATE_OF = {"TaskCompleted": "completed", "TaskFailed": "failed", "TaskAbandoned": "abandoned",
            "TaskCancelled": "cancelled", "TaskRolledBack": "rolled_back"}


def git_checks(bare: Path, verdict_terminal: dict[str, str],
               completed_attempt: dict[str, int], workspace_ids: set[str]) -> dict[str, Any]:
    """The repository itself: at most one commit per attempt on any ref, and every completed
    workspace task's commit on its attempt's branch."""
    fmt = "%H%x1f%(trailers:key=Fleetplane-Task,valueonly,separator=)%x1f" \
          "%(trailers:key=Fleetplane-Attempt,valueonly,separator=)"
    out = subprocess.run(["git", "--git-dir", str(bare), "log", "--all", f"--format={fmt}"],
                         capture_output=True, text=True, check=True).stdout
    per_attempt: dict[tuple[str, str], set[str]] = {}
    for line in out.splitlines():
        sha, task, attempt = [*line.split("\x1f"), "", ""][:3]
        if task.strip():
            per_attempt.setdefault((task.strip(), attempt.strip()), set()).add(sha)
    branches = subprocess.run(["git", "--git-dir", str(bare), "for-each-ref", "--format=%(refname)",
                               "refs/heads/fleetplane/"], capture_output=True, text=True,
                              check=True).stdout.split()
    missing = []
    for task in workspace_ids:
        if verdict_terminal.get(task) == "completed":
            a = completed_attempt[task]
            if not per_attempt.get((task, str(a))):
                missing.append(f"{task}/a{a}: no commit")
            elif f"refs/heads/fleetplane/{task}/attempt-{a}" not in branches:
                missing.append(f"{task}/a{a}: branch gone")
    return {"commits": sum(len(s) for s in per_attempt.values()),
            "branches": len(branches),
            "double_commits": sorted(f"{t}/a{a}: {len(s)} commits"
                                     for (t, a), s in per_attempt.items() if len(s) > 1),
            "completed_without_commit": sorted(missing)}


def waiting_at(log: Log, stuck: list[str]) -> dict[str, int]:
    """Stuck tasks by the last event the log has of them (TaskAccepted: not routed or not
    dispatched yet; TaskDispatched: not started; TaskStarted / TaskHeartbeat: running)."""
    wanted = set(stuck)
    last: dict[str, str] = {}
    for _topic, e in log.records:
        if e.task_id in wanted:
            last[e.task_id] = type(e).__name__
    return dict(Counter(last.get(t, "nothing") for t in stuck))


def explain_broker_loss(result: ChaosResult, settings: Settings, topic_ids: set[str],
                        topic_cost: dict[str, float]) -> None:
    """After a broker SIGKILL: ClickHouse may hold model calls the broker lost after
    accounting had stored them (the embedded broker loses its last acknowledged writes). Those
    calls happened and were billed; the log no longer has them. Read from the raw rows (the
    stack is stopped: chdb is free), they explain a cost difference only if ClickHouse minus
    them equals the topic exactly, per team; what they do not explain stays a mismatch. They
    are reported on their own (`kept_after_broker_loss`): each is also a model call whose
    attempt may have run twice (invariant 2 on a broker that loses acknowledged writes)."""
    from fleetplane.accounting.store import connect

    ch = result.clickhouse
    store = connect(settings)
    try:
        rows = store.query(f"SELECT event_id, team, cost_usd FROM {store.table('model_calls')} "
                           "FINAL")
    finally:
        store.close()
    kept = [r for r in rows if r["event_id"] not in topic_ids]
    extra: dict[str, float] = {}
    for r in kept:
        extra[r["team"]] = extra.get(r["team"], 0.0) + float(r["cost_usd"])
    ch["kept_after_broker_loss"] = {"calls": len(kept), "cost_usd": round(sum(extra.values()), 9),
                                    "examples": sorted(r["event_id"] for r in kept)[:5]}
    raw = {t: extra.get(t, 0.0) + topic_cost.get(t, 0.0) for t in ch["cost_by_team"]}
    unexplained = {t for t, c in ch["cost_by_team"].items() if abs(c - round(raw[t], 9)) > 2e-9}
    for key in ("cost_mismatches", "daily_cost_mismatches"):
        ch[key] = [m for m in ch[key] if m.split(":", 1)[0] in unexplained]


AUDIT_SHORT = re.compile(r"^(?P<task>[0-9a-f]+)/a(?P<attempt>\d+): (?P<log>\d+) audit events, "
                         r"the outcome recorded (?P<claimed>\d+)")


def explain_audit_loss(result: ChaosResult, settings: Settings, breaks: list[str]) -> None:
    """After a broker SIGKILL: an attempt's outcome may claim audit events the log no longer
    holds because the broker lost them after acknowledging them (and after accounting stored
    them); or the log may have lost the executor's report itself, leaving the coordinator's
    declaration (which claims none) as the attempt's only outcome: a break where ClickHouse's
    raw events hold the executor's report with exactly the log's count is reported on its own
    too. A break where the log holds fewer events than the outcome claims, and ClickHouse's
    raw rows hold exactly the claimed number for that attempt, is reported on its own
    (`audit_kept_after_broker_loss`), not as a break: the audit trail is whole in ClickHouse,
    the log lost part of it. Every other break stays one."""
    from fleetplane.accounting.store import connect

    store = connect(settings)
    explained: list[str] = []
    try:
        for line in breaks:
            m = AUDIT_SHORT.match(line)
            if m is not None and int(m["log"]) > int(m["claimed"]) and int(store.command(
                    f"SELECT count() FROM {store.table('events')} WHERE task_id = {{t:String}} "
                    "AND event_type IN ('TaskCompleted', 'TaskFailed') "
                    "AND JSONExtractInt(payload, 'attempt') = {a:Int64} "
                    "AND JSONExtractInt(payload, 'audit_count') = {n:Int64}",
                    {"t": m["task"], "a": int(m["attempt"]), "n": int(m["log"])})):
                # the log lost the executor's report (the coordinator then declared the
                # attempt lost, claiming none); ClickHouse stored the report, whose count is
                # exactly the events on the log: the chain is whole there
                explained.append(line)
                continue
            if m is None or int(m["log"]) >= int(m["claimed"]):
                continue
            stored = sum(int(store.command(
                f"SELECT count() FROM {store.table(t)} FINAL WHERE task_id = {{t:String}} "
                "AND attempt = {a:UInt32}", {"t": m["task"], "a": int(m["attempt"])}))
                for t in ("model_calls", "tool_calls", "workspace_changes"))
            if stored == int(m["claimed"]):
                explained.append(line)
    finally:
        store.close()
    if explained:
        result.verdict["audit_kept_after_broker_loss"] = explained
        result.counts["audit_breaks"] -= len(explained)


def read_log_steadily(settings: Settings, wanted: Callable[[str], bool],
                      within_s: float = 180.0) -> Log:
    """`read_log`, again while the broker is down: the run reads the log every 10 s while its
    faults go on, and a read that meets the broker's SIGKILL (or its restart, at load 40)
    failed with a transport error and ended the run without a verdict."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return read_log(settings, wanted)
        except (KafkaException, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(5)


#: asked for even when the broker does not list them (a group with no committed offset yet;
#: the reconciler's group is never joined: it reads by assignment)
SERVICE_GROUPS = ("fleetplane-router", "fleetplane-coordinator",
                  "fleetplane-coordinator-scheduler", "fleetplane-executor",
                  "fleetplane-accounting")


def group_states(admin: AdminClient) -> dict[str, str]:
    """Each consumer group as the broker holds it: state, and per member its client id and
    how many partitions it is assigned (a group stuck in a rebalance, or a member that holds
    partitions and reads nothing, shows here)."""
    listed = admin.list_consumer_groups(request_timeout=10).result()
    names = sorted({g.group_id for g in listed.valid} | set(SERVICE_GROUPS))
    out: dict[str, str] = {}
    for name, future in admin.describe_consumer_groups(names, request_timeout=10).items():
        try:
            d = future.result()
        except KafkaException as exc:
            out[name] = f"not described: {exc}"
            continue
        members = ", ".join(f"{m.group_instance_id or m.client_id}:"
                            f"{len(m.assignment.topic_partitions)}" for m in d.members)
        out[name] = f"{d.state.name} [{members}]"
    return out


def diagnose(settings: Settings) -> dict[str, Any]:
    """Where the pipeline stands still: partitions whose transaction stays open (sampled twice,
    5 s apart: an open transaction seen both times is not a commit in flight) and the consumer
    groups' lag per topic."""
    admin = AdminClient(settings.client_config())
    out: dict[str, Any] = {}
    try:
        first = open_transactions(admin)
        time.sleep(5)
        again = open_transactions(admin)
        out["open_transactions"] = {f"{t}[{p}]": f"stable {again[(t, p)][0]}, end "
                                    f"{again[(t, p)][1]}" for (t, p) in first if (t, p) in again
                                    and again[(t, p)][0] == first[(t, p)][0]}
        lag = ConsumerLag(settings.client_config(), groups=["fleetplane-accounting"])
        out["consumer_lag"] = {f"{g} {t}": n for (g, t), n in sorted(lag.lag().items()) if n}
        lag.close()
        out["groups"] = group_states(admin)
    except (KafkaException, ValueError, RuntimeError) as exc:
        out["error"] = str(exc)
    return out


def run_chaos(cfg: ChaosConfig, data_dir: Path | None = None,
              console: Console | None = None) -> ChaosResult:
    console = console or Console()
    data_dir = data_dir or bench_dir("fleetplane-chaos-")
    bare = make_repo(data_dir / "repos", cfg.area_count)
    # the intake rate limit lifted (the run paces itself); budgets and quotas as shipped
    teams_path = bench_teams_file(data_dir, lift_budgets=False, name="teams-chaos.yaml")
    stack = Stack(data_dir=data_dir, extra_env={
        "FLEETPLANE_LOG_LEVEL": "WARNING",
        "FLEETPLANE_TEAMS_FILE": str(teams_path),
        "FLEETPLANE_EXECUTOR_REPOSITORIES": json.dumps({REPO: str(bare)}),
        "FLEETPLANE_MODEL_TIMEOUT_S": "10",
        "FLEETPLANE_RECONCILER_DEADLINE_S": str(cfg.reconciler_deadline_s),
    })
    result = ChaosResult(config=asdict(cfg))
    started = time.monotonic()
    console.print(f"chaos: starting the stack in {data_dir} ...")
    stack.start(timeout_s=240)
    result.phases_s["start"] = round(time.monotonic() - started, 1)
    faults: Faults | None = None
    try:
        httpx.post(f"{stack.provider_url}/_fake/script", json=provider_script(cfg),
                   timeout=10).raise_for_status()
        run = uuid.uuid4().hex[:6]
        teams = [f"chaos-{run}-{x}" for x in ("pay", "search", "plat")]
        submitter = Submitter(stack, run, teams, cfg)
        window = cfg.tasks / cfg.rate
        faults = Faults(stack, cfg, window, lambda s: console.print(f"  fault: {s}"))
        console.print(f"chaos: {cfg.tasks} tasks at {cfg.rate}/s over {window:.0f} s; "
                      f"faults every {faults.every:.0f} s: {', '.join(faults.plan)}")
        faults.start()
        submitter.run_all(cfg.tasks)
        result.phases_s["submit"] = round(time.monotonic() - started, 1)
        ids = {task_id_for(team_of(i, teams), f"{run}-{i}") for i in range(cfg.tasks)}
        workspace_ids = {task_id_for(team_of(i, teams), f"{run}-{i}")
                         for i in range(0, cfg.tasks, WORKSPACE_EVERY)}
        settings = stack.settings()
        # wait for every acknowledged task to end (faults keep running until the plan is done)
        deadline = time.monotonic() + cfg.settle_s
        log = read_log_steadily(settings, ids.__contains__)
        shown = time.monotonic()
        while time.monotonic() < deadline:
            v = check(log, submitter.acknowledged, lambda t: 10**6)
            if not v.stuck and len(faults.done) == len(faults.plan):
                break
            if time.monotonic() - shown >= 60:  # slow, or stuck for good? where they wait
                shown = time.monotonic()
                console.print(f"  settle: {sum(v.terminal.values())} terminal, stuck "
                              f"{len(v.stuck)}: {waiting_at(log, v.stuck)}")
            time.sleep(10)
            log = read_log_steadily(settings, ids.__contains__)
        # submissions acknowledged, then lost by the broker: a client with idempotency keys
        # sends them again until they are accepted
        by_id = {task_id_for(team_of(i, teams), f"{run}-{i}"): i for i in range(cfg.tasks)}
        v = check(log, submitter.acknowledged, lambda t: 10**6)
        result.broker_lost = [f"{by_id[t]}: {t}" for t in v.lost if t in by_id]
        lost_now = [by_id[t] for t in v.lost if t in by_id]
        for _round in range(cfg.client_retry_rounds if lost_now else 0):
            console.print(f"chaos: the broker lost {len(lost_now)} acknowledged submissions: "
                          "submitting them again with the same idempotency keys")
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda i: submitter.one(i, 0.0), lost_now))
            until = time.monotonic() + max(60.0, cfg.reconciler_deadline_s * 3)
            while time.monotonic() < until:
                time.sleep(5)
                log = read_log_steadily(settings, ids.__contains__)
                v = check(log, submitter.acknowledged, lambda t: 10**6)
                if not v.stuck and not set(v.lost) & {t for t in by_id if by_id[t] in lost_now}:
                    break
            lost_now = [by_id[t] for t in v.lost if t in by_id]
            if not lost_now:
                break
        result.broker_lost_done = len(result.broker_lost) - len(lost_now)
        faults.stop()
        result.phases_s["settled"] = round(time.monotonic() - started, 1)
        time.sleep(2)
        log = read_log_steadily(settings, ids.__contains__)
        audit_until = time.monotonic() + cfg.audit_settle_s
        while check(log, submitter.acknowledged, lambda t: 10**6).audit_breaks \
                and time.monotonic() < audit_until:
            time.sleep(10)
            log = read_log_steadily(settings, ids.__contains__)
        result.phases_s["audit_settled"] = round(time.monotonic() - started, 1)
        try:
            result.reconciler = httpx.get(f"{stack.reconciler_url}/reconciler/stats",
                                          timeout=10).json()
        except (httpx.HTTPError, ValueError):
            result.reconciler = {}
        policies = load_teams(teams_path)
        verdict: Verdict = check(log, submitter.acknowledged,
                                 lambda t: policies.policy(t).max_running)
        verdict.lost += [f"submission {i} never acknowledged" for i in submitter.gave_up]
        terminal: dict[str, str] = {}
        completed_attempt: dict[str, int] = {}
        for topic, e in log.records:
            if topic == "tasks.outcomes" and ev.is_terminal(e):
                terminal.setdefault(e.task_id, STATE_OF[type(e).__name__])
                if isinstance(e, ev.TaskCompleted):
                    completed_attempt.setdefault(e.task_id, e.attempt)
        topic_cost: dict[str, float] = {}
        seen_calls: set[str] = set()
        for e in log.of(ev.ModelCall):
            if e.event_id not in seen_calls:
                seen_calls.add(e.event_id)
                assert isinstance(e, ev.ModelCall)
                topic_cost[e.team] = topic_cost.get(e.team, 0.0) + e.cost_usd
        result.clickhouse = clickhouse_checks(stack, teams, submitter.acknowledged, terminal,
                                              topic_cost, timeout_s=120)
        result.git = git_checks(bare, terminal, completed_attempt, workspace_ids)
        result.faults = faults.done
        result.unplanned_restarts = dict(faults.unplanned)
        result.submit_retries = submitter.retries
        result.verdict = {k: v for k, v in asdict(verdict).items()
                          if not isinstance(v, list)}
        result.verdict["examples"] = {k: v[:5] for k, v in asdict(verdict).items()
                                      if isinstance(v, list) and v}
        result.counts = verdict.counts()
        result.verdict["stuck_waiting_at"] = waiting_at(log, verdict.stuck)
        failures = Counter(e.failure_class for e in log.of(ev.TaskFailed)
                           if isinstance(e, ev.TaskFailed))
        result.verdict["attempt_failures"] = dict(failures)
        result.verdict["model_call_outcomes"] = dict(Counter(
            e.outcome for e in log.of(ev.ModelCall) if isinstance(e, ev.ModelCall)))
        if result.problems:
            result.diagnosis = diagnose(settings)
    finally:
        if faults is not None:  # its supervision would restart what the stop ends
            faults.stop()
        stack.stop()
    if cfg.kill_broker and (result.clickhouse.get("cost_mismatches")
                            or result.clickhouse.get("daily_cost_mismatches")):
        explain_broker_loss(result, stack.settings(), seen_calls, topic_cost)
    if cfg.kill_broker and result.counts.get("audit_breaks"):
        explain_audit_loss(result, stack.settings(), verdict.audit_breaks)
    result.elapsed_s = round(time.monotonic() - started, 1)
    result.load_average = [round(x, 1) for x in os.getloadavg()]
    return result


def print_result(result: ChaosResult, console: Console) -> None:
    v = result.verdict
    table = Table(title="fleetplane chaos run")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("tasks acknowledged / accepted", f"{v['acknowledged']} / {v['accepted']}")
    table.add_row("terminal states", ", ".join(f"{k}={n}" for k, n in v["terminal"].items()))
    table.add_row("faults injected", ", ".join(result.faults))
    table.add_row("unplanned restarts", json.dumps(result.unplanned_restarts))
    table.add_row("attempts / model calls / commits",
                  f"{v['attempts']} / {v['model_calls']} / {v['commits']}")
    table.add_row("audit chains verified (attempt outcomes)", str(v["audits_verified"]))
    table.add_row("attempt failures by class", json.dumps(v.get("attempt_failures", {})))
    table.add_row("model call outcomes", json.dumps(v.get("model_call_outcomes", {})))
    table.add_row("HTTP submit retries (ingest down)", str(result.submit_retries))
    table.add_row("acknowledged, then lost by the broker (SIGKILL) / done after the client "
                  "re-submitted them", f"{len(result.broker_lost)} / {result.broker_lost_done}")
    table.add_row("reconciler re-drives", json.dumps(
        (result.reconciler or {}).get("counters", {})))
    table.add_row("max running per team", json.dumps(v["max_running"]))
    for k, n in result.counts.items():
        table.add_row(k, str(n))
        if k == "stuck" and n:
            table.add_row("stuck, by the last event on the log",
                          json.dumps(v.get("stuck_waiting_at", {})))
    ch = result.clickhouse
    table.add_row("clickhouse: missing / state mismatches / cost mismatches (calls, daily)",
                  f"{len(ch['missing'])} / {len(ch['state_mismatches'])} / "
                  f"{len(ch['cost_mismatches'])}, {len(ch['daily_cost_mismatches'])}")
    if v.get("audit_kept_after_broker_loss"):
        table.add_row("audit chains whose events the broker lost after accounting stored them "
                      "(whole in ClickHouse)", str(len(v["audit_kept_after_broker_loss"])))
    kept = ch.get("kept_after_broker_loss")
    if kept:
        table.add_row("model calls in ClickHouse that the broker lost after accounting stored "
                      "them (calls, cost)", f"{kept['calls']}, ${kept['cost_usd']}")
    g = result.git
    table.add_row("git: commits / double commits / completed without commit",
                  f"{g['commits']} / {len(g['double_commits'])} / "
                  f"{len(g['completed_without_commit'])}")
    table.add_row("elapsed (started, submitted, settled, audit settled at)",
                  f"{result.elapsed_s} s ({', '.join(f'{v} s' for v in result.phases_s.values())})")
    table.add_row("load average (1, 5, 15 min) at the end", str(result.load_average))
    console.print(table)
    if result.broker_lost:
        console.print(f"broker-lost submissions (index: task id): {result.broker_lost[:50]}")
    if result.problems:
        console.print(f"[red]PROBLEMS: {result.problems}[/red]")
        console.print(f"diagnosis: {json.dumps(result.diagnosis)}")
        console.print(json.dumps(result.verdict.get("examples", {}), indent=2)[:4000])
        console.print(json.dumps({k: v for k, v in {**ch, **g}.items()
                                  if isinstance(v, list) and v}, indent=2)[:4000])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("--failure-rate", type=float, default=0.10)
    parser.add_argument("--stall-rate", type=float, default=0.02)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--areas", type=int, default=0,
                        help="write-scope groups (0: one per 40 tasks, at least 8)")
    parser.add_argument("--no-broker-restart", action="store_true")
    parser.add_argument("--no-broker-kill", action="store_true",
                        help="no SIGKILL of the broker (it loses acknowledged writes)")
    parser.add_argument("--settle", type=float, default=600.0,
                        help="seconds to wait for terminal states after the submissions")
    parser.add_argument("--reconciler-deadline", type=float, default=20.0)
    args = parser.parse_args()
    cfg = ChaosConfig(tasks=args.tasks, rate=args.rate, failure_rate=args.failure_rate,
                      stall_rate=args.stall_rate, latency_ms=args.latency_ms,
                      areas=args.areas, restart_broker=not args.no_broker_restart,
                      kill_broker=not args.no_broker_kill, settle_s=args.settle,
                      reconciler_deadline_s=args.reconciler_deadline)
    console = Console()
    result = run_chaos(cfg, console=console)
    print_result(result, console)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"chaos-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(asdict(result), indent=2, default=str))
    console.print(f"written to {out}")
    raise SystemExit(1 if result.problems else 0)


if __name__ == "__main__":
    main()
