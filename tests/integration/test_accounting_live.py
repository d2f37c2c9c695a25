"""Issue 18: the dashboard's live sections, read from the pre-aggregated per-minute task states
(recent_task_states) and utilization (recent_utilization_minutes), equal the same definitions
computed from the raw lifecycle rows (live_raw.py, utilization FINAL), on a generated live
fleet delivered through the real sink with redelivered duplicates and a restart mid-batch.
Real ClickHouse (chdb)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fleetplane.accounting import analytics, live, live_raw
from fleetplane.accounting.schema import apply_ddl
from fleetplane.accounting.sink import ClickHouseSink
from fleetplane.accounting.store import Store
from fleetplane.core import events as ev
from tests.integration.test_accounting import close_test_store, open_test_store
from tests.integration.test_accounting_rollups import deliver, deliver_batches, distinct_rows

NOW = datetime.now(UTC)
KINDS = ("quota", "conflict", "budget", "approval")


def live_fleet(n_tasks: int, now: datetime, seed: int = 5, prefix: str = "lv") -> list[ev.Event]:
    """Task lifecycles active over the last ~95 minutes (some begin before the live window):
    holds of several kinds (one to three per task, some still open), dispatches, retries,
    completions, final failures, cancellations, tasks still running or queued, and a late
    redelivered start after a terminal event; plus executor utilization windows."""
    rnd = random.Random(seed)
    out: list[ev.Event] = []
    for i in range(n_tasks):
        task_id, team = f"{prefix}-{i}", f"{prefix}-team-{i % 3}"
        spec = ev.TaskSpec(name="t", task_type=("codegen", "debug", "review")[i % 3], prompt="p")
        t0 = now - timedelta(seconds=rnd.randrange(60, 95 * 60), milliseconds=rnd.randrange(1000))
        events: list[ev.Event] = []

        def at(s: float, t0: datetime = t0) -> datetime:
            return t0 + timedelta(seconds=s)

        kw: dict[str, Any] = {"task_id": task_id, "team": team}
        events.append(ev.TaskSubmitted(**kw, spec=spec, occurred_at=at(0)))
        events.append(ev.TaskAccepted(**kw, spec=spec, occurred_at=at(0.2)))
        clock = 0.5
        if rnd.random() < 0.1:              # never routed yet: queued
            out.extend(events)
            continue
        for attempt in (1, 2):
            events.append(ev.TaskRouted(**kw, spec=spec, attempt=attempt, model="m",
                                        provider="anthropic", tier="small", reason="r",
                                        occurred_at=at(clock)))
            if rnd.random() < 0.35:          # held, once or more
                for _ in range(rnd.randrange(1, 4)):
                    clock += rnd.randrange(1, 400)
                    events.append(ev.TaskHeld(**kw, reason=f"why {i}", held_by=f"other-{i}",
                                              kind=rnd.choice(KINDS), attempt=attempt,
                                              occurred_at=at(clock)))
                if rnd.random() < 0.3:       # still held, or cancelled while held
                    if rnd.random() < 0.4:
                        events.append(ev.TaskCancelled(**kw, reason="user",
                                                       occurred_at=at(clock + 30)))
                    break
            clock += rnd.randrange(1, 300)
            events.append(ev.TaskDispatched(**kw, spec=spec, attempt=attempt, model="m",
                                            provider="anthropic", tier="small",
                                            occurred_at=at(clock)))
            events.append(ev.TaskStarted(**kw, attempt=attempt, executor_id="x",
                                         occurred_at=at(clock + 0.4)))
            clock += rnd.randrange(5, 900)
            r = rnd.random()
            if r < 0.15:                     # still running
                break
            if r < 0.55:
                events.append(ev.TaskCompleted(**kw, attempt=attempt, model="m", output="o",
                                               cost_usd=0.01, duration_ms=5,
                                               occurred_at=at(clock)))
                if rnd.random() < 0.1:       # a late, redelivered start after the end
                    events.append(ev.TaskStarted(**kw, attempt=attempt, executor_id="x",
                                                 occurred_at=at(clock + 5)))
                break
            if r < 0.65:
                events.append(ev.TaskCancelled(**kw, reason="user", occurred_at=at(clock)))
                break
            final = attempt == 2
            events.append(ev.TaskFailed(**kw, attempt=attempt, failure_class="model_error",
                                        reason="r", final=final, cost_usd=0.0,
                                        occurred_at=at(clock)))
            if final:
                break
            events.append(ev.TaskRetrying(**kw, attempt=attempt, delay_ms=100, reason="r",
                                          occurred_at=at(clock + 0.1)))
            clock += 1
        out.extend(e for e in events if e.occurred_at <= now)
    minute = now.replace(second=0, microsecond=0)
    for k in range(6 * 70):                  # 3 executors x 4 slots, 10-s windows, 70 minutes
        start = minute - timedelta(minutes=69) + timedelta(seconds=10 * k)
        if start > now:
            break
        for executor in range(3):
            for slot in range(4):
                busy = round(rnd.random() * 10, 3)
                model = round(busy * rnd.random(), 3)
                out.append(ev.ExecutorUtilization(
                    task_id="", team="", executor_id=f"{prefix}-exec-{executor}", slot=slot,
                    window_start=start, window_s=10.0, busy_s=busy, idle_s=10.0 - busy,
                    model_s=model, tool_s=round((busy - model) / 2, 3), attempts=k % 2,
                    occurred_at=start + timedelta(seconds=10)))
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    s = open_test_store(tmp_path_factory.mktemp("accounting-live-ch"))
    events = live_fleet(500, NOW)
    random.Random(3).shuffle(events)    # several partitions' interleaving: any order
    half = len(events) // 2
    sink = ClickHouseSink(s, flush_rows=900)
    deliver(sink, events[:half])
    deliver(sink, events[half - 300:half])          # copies within the buffer
    sink.flush()
    deliver(sink, events[half - 600:half - 200])    # redelivered after they were stored
    sink.flush()
    # a restart mid-batch: the first process stored part and died before committing
    crashed = ClickHouseSink(s, flush_rows=300)
    deliver_batches(crashed, events[half:half + 700], offset=10_000)
    restarted = ClickHouseSink(s, flush_rows=5_000)
    deliver_batches(restarted, events[half:], offset=10_000)
    restarted.flush()
    INSERTED["rows"] = sum(k.stats.rows for k in (sink, crashed, restarted))
    yield s
    close_test_store(s)


def approx(value: Any) -> Any:
    """Floats compared like pytest.approx (sums in another order), everything else as is."""
    if isinstance(value, float):
        return pytest.approx(value, rel=1e-9, abs=1e-9)
    if isinstance(value, dict):
        return {k: approx(v) for k, v in value.items()}
    if isinstance(value, list):
        return [approx(v) for v in value]
    return value


INSERTED: dict[str, int] = {}


def test_the_live_fleet_was_delivered_with_duplicates(store: Store) -> None:
    # the lifecycle rows and holds are not deduplicated by the sink: the copies were inserted
    assert INSERTED["rows"] > distinct_rows(live_fleet(500, NOW)) + 1000
    holds = int(store.command(f"SELECT count() FROM {store.table('holds')} FINAL"))
    assert holds > 100


def test_overview_equals_the_raw_lifecycle_rows(store: Store) -> None:
    fast, raw = live.overview(store, NOW), live_raw.overview(store, NOW)
    assert fast["total"] == raw["total"]
    assert fast["teams"] == raw["teams"]
    key = "task_id"
    assert sorted(fast["held"], key=lambda h: h[key]) == sorted(raw["held"], key=lambda h: h[key])
    # the fleet has every kind of task in the window
    total = fast["total"]
    assert min(total["queued"], total["running"], total["held"], total["completed"],
               total["failed"], total["other"]) > 0, total
    assert {h["kind"] for h in fast["held"]} == set(KINDS)


def test_queue_wait_and_held_time_equal_the_raw_lifecycle_rows(store: Store) -> None:
    wait = live.queue_wait(store, NOW)
    assert wait is not None and wait["tasks"] > 100
    assert approx(wait) == live_raw.queue_wait(store, NOW)
    held = live.held_time(store, NOW)
    assert {h["kind"] for h in held} == set(KINDS)
    assert sum(h["still_held"] for h in held) > 0
    assert approx(held) == live_raw.held_time(store, NOW)


def test_recent_tasks_equal_the_raw_lifecycle_rows(store: Store) -> None:
    fast = live.recent_tasks(store, NOW, limit=60)
    assert len(fast) == 60
    assert fast == live_raw.recent_tasks(store, NOW, limit=60)


def test_utilization_per_minute_equals_the_reported_windows(store: Store) -> None:
    since = live.window_start(NOW)
    fast = analytics.utilization(store, bucket_s=60, since=since, recent=True)
    raw = analytics.utilization(store, bucket_s=60, since=since)
    assert len(fast["series"]) >= 60 and fast["total"]["slots"] == 12
    assert approx(fast) == raw
    five = analytics.utilization(store, bucket_s=300, since=since, recent=True)
    assert approx(five) == analytics.utilization(store, bucket_s=300, since=since)


def test_a_database_from_before_the_live_tables_is_backfilled_at_start(store: Store) -> None:
    """The live tables of a database created before 014_live_state.sql are filled from the
    raw rows of the last hours at the next start (apply_ddl)."""
    expected = live.overview(store, NOW)
    for table in (live.TABLE, "recent_utilization_minutes"):
        store.command(f"TRUNCATE TABLE {store.table(table)}")
    assert live.overview(store, NOW)["total"]["running"] == 0
    apply_ddl(store)
    assert live.overview(store, NOW) == expected
    assert approx(live.held_time(store, NOW)) == live_raw.held_time(store, NOW)
    since = live.window_start(NOW)
    assert approx(analytics.utilization(store, bucket_s=60, since=since, recent=True)) == \
        analytics.utilization(store, bucket_s=60, since=since)


def test_the_state_codes_of_the_ddl_are_the_state_vocabulary() -> None:
    """recent_task_states.latest encodes a state by its position in a list written in the DDL;
    live.py decodes it with core.states.STATES: both lists must be the same."""
    import re

    from fleetplane.accounting.schema import DDL_DIR
    from fleetplane.core.states import STATES

    ddl = (DDL_DIR / "014_live_state.sql").read_text()
    listed = re.search(r"indexOf\(\[(.*?)\]", ddl, re.S)
    assert listed is not None
    assert tuple(re.findall(r"'(\w+)'", listed.group(1))) == STATES == live.STATE_CODES
