"""Two router replicas (one consumer group, the real broker, the real loop) learn from all
outcomes through the shared statistics topic, and a restarted replica takes its statistics
from the topic instead of recounting the history (docs/routing.md, "Shared state").

The replicas run in this process (threads) so that their statistics can be compared, on a
broker of their own: a fresh router group on the session broker would route every earlier
test's tasks again."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetplane.core import events as ev
from fleetplane.core.follower import Follower
from fleetplane.core.kafka import EventProducer
from fleetplane.core.loop import Processor, headers_dict
from fleetplane.core.settings import Settings
from fleetplane.core.topics import LIFECYCLE, OUTCOMES, ROUTED
from fleetplane.router.handlers import Router
from fleetplane.router.holds import HOLDS_TOPIC, WRITER_HEADER
from fleetplane.router.main import build_router, start
from fleetplane.router.rebuild import read_messages
from fleetplane.router.shared import STATS_TOPIC
from tests.own_broker import settings_on_own_broker

from .test_executor_process import wait_group_assigned
from .test_router import Tail

MODELS = ("gpt-4o-mini", "claude-haiku-4-5", "claude-sonnet-4-6")
TYPES = ("summarize", "refactor")


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with settings_on_own_broker(tmp_path_factory.mktemp("router-shared-broker"),
                                router_prompt_signal=False) as s:
        yield s


class Replica:
    def __init__(self, settings: Settings, name: str, data_dir: Path) -> None:
        self.settings = settings.model_copy(update={"instance_id": name,
                                                    "data_dir": data_dir})
        self.router: Router = build_router(self.settings)
        self.processor: Processor
        self.follower: Follower | None
        self.processor, self.follower = start(self.router, self.settings)
        self.thread = threading.Thread(target=self.processor.run, daemon=True)
        self.thread.start()

    def table(self) -> dict[tuple[str, str], tuple[int, int, float]]:
        with self.router.lock:  # between two events of the loop's thread
            return {k: (s.successes, s.failures, round(s.cost_usd, 9))
                    for k, s in self.router.state.stats.items()}

    def stop(self) -> None:
        self.processor.stop()
        self.thread.join(60)
        assert not self.thread.is_alive()
        if self.follower is not None:
            self.follower.close()


def wait(cond: object, what: object, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out: {what() if callable(what) else what}")


def test_two_replicas_converge_and_a_restart_reads_the_snapshot(settings: Settings,
                                                                 tmp_path: Path) -> None:
    a, b = Replica(settings, "rs-a", tmp_path / "a"), Replica(settings, "rs-b", tmp_path / "b")
    replicas = [a, b]
    producer = EventProducer(settings)
    tail = Tail(settings, ROUTED, OUTCOMES)
    try:
        # (Processor.partitions: an idle loop's parked partitions are not in its consumer's
        # assignment(), and the consumer is the loop thread's)
        # first the broker's own view of the group (its failure message says what the broker
        # holds: members, state, assignments), then each loop's (a CI run timed out here with
        # neither loop assigned and nothing more to go on)
        wait_group_assigned(settings, a.processor.group_id, members=2, timeout_s=90)
        wait(lambda: all(len(r.processor.partitions) > 0 for r in (a, b)),
             "both replicas hold partitions")
        rng = random.Random(5)
        work = [(f"rs-{i}", rng.choice(TYPES), rng.choice(MODELS), rng.random() < 0.7)
                for i in range(48)]
        producer.send(ev.TaskAccepted(task_id=tid, team="t", spec=ev.TaskSpec(
            name="n", task_type=tt, prompt=f"job {tid}", model_preference="pinned", model=m,
            labels={"fleetplane/cache": "off"})) for tid, tt, m, _ in work)
        for tid, _, m, _ in work:
            tail.wait_for(tid, ev.TaskRouted, model=m)
        producer.send((ev.TaskCompleted(task_id=tid, team="t", attempt=1, model=m, output="ok",
                                        cost_usd=0.001, duration_ms=1) if ok else
                       ev.TaskFailed(task_id=tid, team="t", attempt=1, final=True,
                                     failure_class="model_error", reason="x", cost_usd=0.001))
                      for tid, _, m, ok in work)
        expected: dict[tuple[str, str], list[float]] = {}
        for _, tt, m, ok in work:
            e = expected.setdefault((tt, m), [0, 0, 0.0])
            e[0 if ok else 1] += 1
            e[2] = round(e[2] + 0.001, 9)
        want = {k: (int(v[0]), int(v[1]), v[2]) for k, v in expected.items()}
        wait(lambda: a.table() == want and b.table() == want,
             lambda: f"both replicas hold every outcome's statistics: want {want}, a "
                     f"{a.table()} (own {a.router.state.stats.own}), b {b.table()} (own "
                     f"{b.router.state.stats.own}), inbox {a.router.inbox.applied}/"
                     f"{b.router.inbox.applied}")
        # each consumed only its own partitions' outcomes, and learned the rest from the other
        own_a, own_b = a.router.state.stats.own, b.router.state.stats.own
        assert own_a and own_b
        assert sum(s.attempts for s in own_a.values()) + sum(
            s.attempts for s in own_b.values()) == len(work)
        assert a.router.state.stats.replicas() == {"rs-b"}
        assert b.router.state.stats.replicas() == {"rs-a"}

        # restart a: its statistics come from the topic, the history is not counted again
        a.stop()
        a2 = Replica(settings, "rs-a", tmp_path / "a2")
        replicas.append(a2)
        assert a2.router.rebuilt.get(STATS_TOPIC, 0) > 0
        assert a2.table() == want
        assert sum(s.attempts for s in a2.router.state.stats.own.values()) == sum(
            s.attempts for s in own_a.values())
        # and both go on learning from each other's new outcomes
        late = [(f"rs-late-{i}", "summarize", "gpt-4o-mini", True) for i in range(8)]
        producer.send(ev.TaskAccepted(task_id=tid, team="t", spec=ev.TaskSpec(
            name="n", task_type=tt, prompt=f"job {tid}", model_preference="pinned", model=m,
            labels={"fleetplane/cache": "off"})) for tid, tt, m, _ in late)
        for tid, _, m, _ in late:
            tail.wait_for(tid, ev.TaskRouted, model=m)
        producer.send(ev.TaskCompleted(task_id=tid, team="t", attempt=1, model=m, output="ok",
                                       cost_usd=0.001, duration_ms=1) for tid, _, m, _ in late)
        s, f, c = want.get(("summarize", "gpt-4o-mini"), (0, 0, 0.0))
        want[("summarize", "gpt-4o-mini")] = (s + 8, f, round(c + 0.008, 9))
        wait(lambda: a2.table() == want and b.table() == want,
             "both replicas hold the late outcomes")
    finally:
        tail.close()
        producer.close()
        for r in replicas:
            if r.thread.is_alive():
                r.stop()


def test_a_budget_status_releases_the_holds_of_both_replicas(settings: Settings,
                                                             tmp_path: Path) -> None:
    """fleet.budget has one partition: one replica reads the team's status, while both hold
    tasks (tasks.accepted is split between them). The holds on router.holds, followed by both,
    let the reader of the status release all of them, each once."""
    group = settings.model_copy(update={"router_group_id": f"rh-{uuid.uuid4().hex[:6]}"})
    a, b = Replica(group, "rh-a", tmp_path / "a"), Replica(group, "rh-b", tmp_path / "b")
    producer = EventProducer(settings)
    tail = Tail(settings, ROUTED, LIFECYCLE)
    team = f"held-{uuid.uuid4().hex[:6]}"
    try:
        wait_group_assigned(settings, group.router_group_id, members=2, timeout_s=90)
        wait(lambda: all(len(r.processor.partitions) > 0 for r in (a, b)),
             "both replicas hold partitions")
        producer.send([ev.BudgetStatus(task_id="", team=team, period="month", budget_usd=5.0,
                                       spent_usd=5.0, remaining_usd=0.0, state="exhausted")])
        time.sleep(2.0)  # the status is read before the submissions (another topic)
        ids = [f"{team}-{i}" for i in range(16)]
        producer.send(ev.TaskAccepted(task_id=tid, team=team, spec=ev.TaskSpec(
            name="n", task_type="summarize", prompt=f"job {tid}",
            labels={"fleetplane/cache": "off"})) for tid in ids)
        for tid in ids:
            tail.wait_for(tid, ev.TaskHeld)
        # both replicas held some of them
        writers = hold_writers(settings, set(ids))
        assert writers == {"rh-a", "rh-b"}, writers
        producer.send([ev.BudgetStatus(task_id="", team=team, period="month", budget_usd=5.0,
                                       spent_usd=1.0, remaining_usd=4.0, state="ok")])
        for tid in ids:
            tail.wait_for(tid, ev.TaskRouted)
        tail.drain(3.0)
        routed = [e.task_id for e in tail.events if isinstance(e, ev.TaskRouted)
                  and e.task_id in ids]
        assert sorted(routed) == sorted(ids)  # each released once
    finally:
        tail.close()
        producer.close()
        for r in (a, b):
            if r.thread.is_alive():
                r.stop()


def hold_writers(settings: Settings, ids: set[str]) -> set[str]:
    """The replicas that wrote router.holds records of `ids` (the header on each record)."""
    found: set[str] = set()
    for msg in read_messages(settings, HOLDS_TOPIC):
        if (msg.key() or b"").decode() in ids and msg.value() is not None:
            found.add(headers_dict(msg.headers())[WRITER_HEADER].decode())
    return found
