"""The router as an OS process on the real broker: learned statistics, the response cache and
budget holds survive a restart (state rebuilt from the topics); a cache hit completes a task;
an escalation is routed one tier up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from fleetplane.core import events as ev
from fleetplane.core.kafka import EventProducer
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import REPO_ROOT, Settings
from fleetplane.core.topics import LIFECYCLE, OUTCOMES, ROUTED


class RouterProcess:
    def __init__(self, settings: Settings, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "services"),
                    "FLEETPLANE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
                    "FLEETPLANE_DATA_DIR": str(data_dir),
                    "FLEETPLANE_INSTANCE_ID": f"it-{uuid.uuid4().hex[:6]}",
                    "FLEETPLANE_ROUTER_EXPLORATION_SHARE": "0"}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.data_dir / f"router-{self.starts}.log"

    def start(self, timeout_s: float = 240.0) -> None:  # litellm imports slowly on a busy machine
        self.starts += 1
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "fleetplane.router.main"],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while "processor started" not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"router did not start: {self.log()}")
            time.sleep(0.1)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


class Tail:
    """Events on some topics from their end at creation time (read_committed)."""

    def __init__(self, settings: Settings, *topics: str) -> None:
        self.consumer = Consumer({**settings.consumer_config(f"tail-{uuid.uuid4().hex}"),
                                  "enable.auto.commit": False})
        tps = []
        for topic in topics:
            meta = self.consumer.list_topics(topic, timeout=10).topics[topic]
            for p in meta.partitions:
                _, high = self.consumer.get_watermark_offsets(TopicPartition(topic, p), 10)
                tps.append(TopicPartition(topic, p, high))
        self.consumer.assign(tps)
        self.serde = default_serde()
        self.events: list[ev.Event] = []

    def wait_for(self, task_id: str, cls: type[ev.Event] | tuple[type[ev.Event], ...],
                 timeout_s: float = 60.0,
                 **match: Any) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for e in self.events:
                if e.task_id == task_id and isinstance(e, cls) \
                        and all(getattr(e, k) == v for k, v in match.items()):
                    return e
            for m in self.consumer.consume(500, 0.2):
                if m.error() is None:
                    self.events.append(self.serde.decode(m.value() or b""))
        raise AssertionError(f"no {cls} {match} for {task_id} in {timeout_s}s")

    def drain(self, seconds: float) -> None:
        """Read for `seconds` more."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for m in self.consumer.consume(500, 0.2):
                if m.error() is None:
                    self.events.append(self.serde.decode(m.value() or b""))

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def router(base_settings: Settings, tmp_path: Path) -> Iterator[RouterProcess]:
    r = RouterProcess(base_settings, tmp_path)
    r.start()
    try:
        yield r
    finally:
        assert r.stop() == 0, r.log()


def cache_hit(tail: Tail, producer: EventProducer, prefix: str, team: str, ttype: str,
              prompt: str) -> ev.TaskCompleted:
    """Submit the prompt until the router answers from the cache (the completion that fills the
    cache and the next submission travel on different topics, so the first repeat may be read
    before it; the router then routes it normally)."""
    for k in range(5):
        producer.send([accepted(f"{prefix}-{k}", team, ttype, prompt)])
        out = tail.wait_for(f"{prefix}-{k}", (ev.TaskCompleted, ev.TaskRouted))
        if isinstance(out, ev.TaskCompleted):
            return out
        time.sleep(1)
    raise AssertionError(f"no cache hit for {prompt!r} in 5 submissions")


def accepted(task_id: str, team: str, task_type: str, prompt: str, **spec: Any) -> ev.TaskAccepted:
    return ev.TaskAccepted(task_id=task_id, team=team, spec=ev.TaskSpec(
        name="it", task_type=task_type, prompt=prompt, **spec))


def test_stats_cache_and_holds_survive_a_restart_and_escalation_goes_up(
        router: RouterProcess, base_settings: Settings, producer: EventProducer,
        unique: str) -> None:
    team, ttype = f"team-{unique}", f"it-{unique}"  # an unknown type: default tier standard
    tail = Tail(base_settings, ROUTED, LIFECYCLE, OUTCOMES)
    try:
        # 1. learn: 20 pinned attempts on gpt-4o-mini succeed
        ids = [f"{unique}-learn-{i}" for i in range(20)]
        producer.send(accepted(t, team, ttype, f"job {i}", model_preference="pinned",
                               model="gpt-4o-mini") for i, t in enumerate(ids))
        for t in ids:
            tail.wait_for(t, ev.TaskRouted, model="gpt-4o-mini")
        producer.send(ev.TaskCompleted(task_id=t, team=team, attempt=1, model="gpt-4o-mini",
                                       output="done", cost_usd=0.0004, duration_ms=10)
                      for t in ids)
        # 2. a repeated prompt: the first runs, the second is answered from the cache
        producer.send([accepted(f"{unique}-c1", team, ttype, "What is 2+2?")])
        first = tail.wait_for(f"{unique}-c1", ev.TaskRouted)
        producer.send([ev.TaskCompleted(task_id=f"{unique}-c1", team=team, attempt=1,
                                        model=first.model, output="4", cost_usd=0.002,
                                        duration_ms=10)])
        hit = cache_hit(tail, producer, f"{unique}-c2", team, ttype, "What is 2+2?")
        assert (hit.cached, hit.model, hit.cost_usd, hit.output) == (True, "cache", 0.0, "4")
        # the learned policy now picks the cheap model for an auto task
        # (the outcomes travel on other partitions than the submissions: allow a few tries)
        for k in range(5):
            producer.send([accepted(f"{unique}-auto1-{k}", team, ttype, f"job auto 1-{k}")])
            auto1 = tail.wait_for(f"{unique}-auto1-{k}", ev.TaskRouted)
            if auto1.reason.startswith("objective:"):
                break
            time.sleep(1)
        assert auto1.model == "gpt-4o-mini" and auto1.reason.startswith("objective:"), auto1.reason
        # 3. escalation: attempt 2 goes one tier up, with the reason
        producer.send([ev.TaskEscalated(task_id=auto1.task_id, team=team, attempt=2,
                                        from_tier="small", to_tier="standard",
                                        reason="timeout: policy escalate", spec=auto1.spec)])
        esc = tail.wait_for(auto1.task_id, ev.TaskRouted, attempt=2)
        assert esc.tier == "standard" and "escalated from small to standard" in esc.reason
        # 4. a spent budget holds the team's task
        producer.send([ev.BudgetStatus(task_id="", team=team, period="day", budget_usd=10.0,
                                       spent_usd=10.0, remaining_usd=0.0, state="exhausted")])
        producer.send([accepted(f"{unique}-held", team, ttype, "held job",
                                labels={"fleetplane/cache": "off"})])
        held = tail.wait_for(f"{unique}-held", ev.TaskHeld)
        assert held.kind == "budget" and "spent" in held.reason

        # restart: the state is rebuilt from the topics
        assert router.stop() == 0, router.log()
        router.start()
        assert "router state rebuilt" in router.log()

        producer.send([accepted(f"{unique}-auto2", team, ttype, "job auto 2")])
        producer.send([ev.BudgetStatus(task_id="", team=team, period="day", budget_usd=10.0,
                                       spent_usd=9.0, remaining_usd=1.0, state="low")])
        # the spent status came before auto2, and it is no longer spent: auto2 may be held
        # until the new status; the held task is released once budget shows again
        released = tail.wait_for(f"{unique}-held", ev.TaskRouted)
        assert "released from the budget hold" in released.reason
        hit2 = cache_hit(tail, producer, f"{unique}-c3", team, ttype, "What is 2+2?")
        assert hit2.cached and hit2.output == "4"
        assert hit2.task_id.endswith("-0")  # the rebuilt cache answers the first repeat
        auto2 = tail.wait_for(f"{unique}-auto2", ev.TaskRouted)
        assert auto2.model == "gpt-4o-mini" and "objective:" in auto2.reason, auto2.reason
    finally:
        tail.close()
