"""Shared router statistics (fleetplane.router.shared), without a broker: what replicas publish,
how they sum each other's contributions, and what a restarted replica restores. The same over
the real broker: tests/integration/test_router_shared.py."""

from __future__ import annotations

import json
import random

from fleetplane.core import events as ev
from fleetplane.core.catalog import catalog_for
from fleetplane.core.loop import RawRecord
from fleetplane.core.settings import Settings
from fleetplane.core.teams import parse_teams
from fleetplane.router.handlers import Router
from fleetplane.router.policy import PolicyConfig
from fleetplane.router.shared import STATS_TOPIC, apply_record
from fleetplane.router.state import RouterState

MODELS = ("gpt-4o-mini", "claude-haiku-4-5", "claude-sonnet-4-6")
TYPES = ("summarize", "refactor", "codegen")


def replica(name: str | None) -> Router:
    cat = catalog_for(Settings().catalog_file)
    teams = parse_teams({"defaults": {"low_budget_share": 0.2}})
    return Router(cat, teams, RouterState(cat, 3600.0), PolicyConfig(exploration_share=0.0),
                  replica=name)


def outcomes(r: Router, tasks: list[tuple[str, str, str, bool]]) -> list[RawRecord]:
    """Pinned tasks routed and finished through the handler as the loop calls it; the raw
    records it publishes."""
    raw: list[RawRecord] = []
    for tid, task_type, model, ok in tasks:
        spec = ev.TaskSpec(name="n", task_type=task_type, prompt="p " + tid,
                           model_preference="pinned", model=model,
                           labels={"fleetplane/cache": "off"})
        outs = r(ev.TaskAccepted(task_id=tid, team="a", spec=spec))
        assert any(isinstance(o, ev.TaskRouted) and o.model == model for o in outs)
        end: ev.Event = (ev.TaskCompleted(task_id=tid, team="a", attempt=1, model=model,
                                          output="ok", cost_usd=0.002, duration_ms=1) if ok
                         else ev.TaskFailed(task_id=tid, team="a", attempt=1, final=True,
                                            failure_class="model_error", reason="x",
                                            cost_usd=0.002))
        raw += [o for o in r(end) if isinstance(o, RawRecord)]
    return raw


def workload(n: int, seed: int) -> list[tuple[str, str, str, bool]]:
    rng = random.Random(seed)
    return [(f"t{seed}-{i}", rng.choice(TYPES), rng.choice(MODELS), rng.random() < 0.7)
            for i in range(n)]


def table(r: Router) -> dict[tuple[str, str], tuple[int, int, float]]:
    return {k: (s.successes, s.failures, round(s.cost_usd, 9)) for k, s in r.state.stats.items()}


def deliver(raw: list[RawRecord], to: Router) -> None:
    for rec in raw:
        assert rec.topic == STATS_TOPIC and rec.value is not None
        to.inbox.put(json.loads(rec.value))
    to.inbox.drain(str(to.replica), to.state.stats)


def test_two_replicas_sum_each_others_outcomes_to_what_one_router_learns() -> None:
    a, b, alone = replica("a"), replica("b"), replica(None)
    work_a, work_b = workload(120, 1), workload(80, 2)
    raw_a, raw_b = outcomes(a, work_a), outcomes(b, work_b)
    assert outcomes(alone, work_a + work_b) == []  # no replica id: nothing published
    assert raw_a and raw_b
    deliver(raw_b, a)
    deliver(raw_a, b)
    assert table(a) == table(b) == table(alone)
    assert sum(n + f for n, f, _ in table(a).values()) == 200
    # delivered again (a follower re-reading the topic), nothing is counted twice
    deliver(raw_a + raw_b, a)
    assert table(a) == table(alone)
    # the replicas now decide on the same evidence
    assert a.state.stats.overall("gpt-4o-mini").attempts == alone.state.stats.overall(
        "gpt-4o-mini").attempts


def test_a_restarted_replica_restores_its_own_cells_and_the_others() -> None:
    a, b = replica("a"), replica("b")
    raw = outcomes(a, workload(90, 3)) + outcomes(b, workload(60, 4))
    deliver([r for r in raw if r.key and r.key.startswith(b"stats|b|")], a)
    restarted = replica("a")
    for rec in raw:  # the compacted topic read at start-up
        assert rec.value is not None
        apply_record("a", json.loads(rec.value), restarted.state.stats, restarted.state.signal,
                     restoring=True)
    assert table(restarted) == table(a)
    # and it goes on publishing absolute counts from there, not from zero
    more = outcomes(restarted, [("late-1", "summarize", "gpt-4o-mini", True)])
    (cell,) = [json.loads(r.value or b"") for r in more if r.key and b"stats|a|" in r.key]
    assert cell["cell"][0] == a.state.stats.own[("summarize", "gpt-4o-mini")].successes + 1


def test_live_records_of_its_own_cells_do_not_count_twice_and_bad_records_are_skipped() -> None:
    a = replica("a")
    raw = outcomes(a, workload(30, 5))
    before = table(a)
    deliver(raw, a)  # its own records, read back by its follower
    assert table(a) == before
    a.inbox.put({"kind": "stats", "replica": "z", "task_type": "x", "model": "m", "cell": [1]})
    a.inbox.put({"kind": "nonsense", "replica": "z"})
    a.inbox.drain("a", a.state.stats)
    assert a.inbox.malformed == 2 and table(a) == before
