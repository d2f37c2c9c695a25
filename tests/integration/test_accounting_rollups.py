"""Issue 18: the rollup answers equal the raw-row answers on the same data, also when events are
delivered twice and when accounting restarts mid-batch; retention; the dashboard's reads do not
grow with history. Real ClickHouse (chdb) fed through the real sink."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fleetplane.accounting import analytics, columnar, queries, rollups
from fleetplane.accounting.rows import COLUMNS, rows_for
from fleetplane.accounting.schema import apply_ddl
from fleetplane.accounting.sink import MARK_AHEAD, ClickHouseSink
from fleetplane.accounting.store import Store, is_chdb
from fleetplane.accounting.whatif import Selection, success_stats, what_if
from fleetplane.core import events as ev
from fleetplane.core.catalog import catalog_for
from fleetplane.core.loop import Record
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.topics import topic_for
from tests.integration.test_accounting import close_test_store, open_test_store

TYPES = ("summarize", "codegen", "debug", "review")
MODELS = (("claude-haiku-4-5", "small"), ("claude-sonnet-4-6", "standard"),
          ("claude-opus-4-7", "frontier"))
NOW = datetime.now(UTC).replace(microsecond=0)


def fleet(n_tasks: int, seed: int = 7, prefix: str = "ru") -> list[ev.Event]:
    """Task lifecycles over the last three days: retries, final failures, cached completions,
    several teams, task types, models and tiers."""
    rnd = random.Random(seed)
    out: list[ev.Event] = []
    for i in range(n_tasks):
        task_id, team = f"{prefix}-{i}", f"{prefix}-team-{i % 3}"
        task_type = TYPES[rnd.randrange(len(TYPES))]
        spec = ev.TaskSpec(name="t", task_type=task_type, prompt="p")
        t = NOW - timedelta(seconds=rnd.randrange(3 * 86_400))

        def at(s: float, t: datetime = t) -> datetime:
            return t + timedelta(seconds=s)

        out.append(ev.TaskSubmitted(task_id=task_id, team=team, spec=spec, occurred_at=at(0)))
        if rnd.random() < 0.1:      # a cached completion: no model call
            model = MODELS[rnd.randrange(3)][0]
            out.append(ev.TaskCompleted(task_id=task_id, team=team, attempt=1, model=model,
                                        output="o", cost_usd=0.0, duration_ms=5, cached=True,
                                        occurred_at=at(1)))
            continue
        attempts = 1 + (rnd.random() < 0.3)
        for attempt in range(1, attempts + 1):
            model, tier = MODELS[rnd.randrange(3)]
            out.append(ev.TaskDispatched(task_id=task_id, team=team, spec=spec, attempt=attempt,
                                         model=model, provider="anthropic", tier=tier,
                                         occurred_at=at(attempt * 100)))
            calls = rnd.randrange(0, 4)
            cost = 0.0
            for c in range(calls):
                inp, outp = rnd.randrange(100, 5000), rnd.randrange(10, 900)
                call_cost = round(inp * 3e-6 + outp * 15e-6, 6)
                cost += call_cost
                out.append(ev.ModelCall(
                    task_id=task_id, team=team, attempt=attempt, call_index=c, model=model,
                    provider="anthropic", tier=tier, input_tokens=inp, output_tokens=outp,
                    cache_read_input_tokens=rnd.choice((0, 1000)), cost_usd=call_cost,
                    latency_ms=float(rnd.randrange(100, 3000)),
                    outcome="ok" if rnd.random() < 0.95 else "error",
                    occurred_at=at(attempt * 100 + c + 1)))
            last = attempt == attempts
            if last and rnd.random() < 0.75:
                out.append(ev.TaskCompleted(task_id=task_id, team=team, attempt=attempt,
                                            model=model, output="o", cost_usd=cost,
                                            duration_ms=1000 + c * 7 if calls else 900,
                                            occurred_at=at(attempt * 100 + 50)))
            else:
                out.append(ev.TaskFailed(task_id=task_id, team=team, attempt=attempt,
                                         failure_class="model_error", reason="r", final=last,
                                         cost_usd=cost, occurred_at=at(attempt * 100 + 50)))
    return out


def deliver(sink: ClickHouseSink, events: list[ev.Event], offset: int = 0) -> None:
    for i, event in enumerate(events):
        sink.add(rows_for(event, Record(topic_for(event), 0, offset + i, None, b"")))


@pytest.fixture(scope="module")
def chdb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One chdb directory for the module (chdb serves one data directory per process); each
    store is its own database in it."""
    return tmp_path_factory.mktemp("accounting-rollups-ch")


@pytest.fixture(scope="module")
def store(chdb_dir: Path) -> Iterator[Store]:
    s = open_test_store(chdb_dir)
    events = fleet(600)
    half = len(events) // 2
    sink = ClickHouseSink(s, flush_rows=700)
    deliver(sink, events[:half])
    # a batch delivered twice within one buffer, and again after it was flushed
    deliver(sink, events[half - 200:half])
    sink.flush()
    deliver(sink, events[half - 300:half - 100])
    sink.flush()
    # accounting restarts mid-batch: the first process inserted part of the batch (it flushed
    # by size) and died before committing; the next process gets the whole batch again.
    crashed = ClickHouseSink(s, flush_rows=250)
    deliver(crashed, events[half:half + 400])        # flushed by size, never committed
    restarted = ClickHouseSink(s, flush_rows=5_000)
    deliver(restarted, events[half:])
    restarted.flush()
    INSERTED["rows"] = sum(k.stats.rows for k in (sink, crashed, restarted))
    yield s
    close_test_store(s)


#: rows the store fixture's sinks inserted (all tables), redeliveries included
INSERTED: dict[str, int] = {}


def distinct_rows(events: list[ev.Event]) -> int:
    """The rows of each event once (what ClickHouse holds after deduplication)."""
    return sum(len(v) for e in events
               for v in rows_for(e, Record(topic_for(e), 0, 0, None, b"")).values())


def json_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as the HTTP API returns them, floats rounded like pytest.approx would compare."""
    import json

    return [{k: (pytest.approx(v) if isinstance(v, float) else v) for k, v in r.items()}
            for r in json.loads(json.dumps(rows, default=str))]


def rounded(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    return {r[key]: {k: (round(float(v), 9) if isinstance(v, float) else v)
                     for k, v in r.items()} for r in rows}


def test_the_data_really_has_duplicates_that_the_raw_rows_collapse(store: Store) -> None:
    raw = int(store.command(f"SELECT count() FROM {store.table('model_calls')} FINAL"))
    assert raw == len([e for e in fleet(600) if isinstance(e, ev.ModelCall)])
    # the tables the sink does not deduplicate (lifecycle rows, events) did receive the
    # redeliveries
    assert INSERTED["rows"] > distinct_rows(fleet(600)) + 300


@pytest.mark.parametrize("by", ["team", "task_type", "model", "tier"])
def test_cost_by_from_rollups_equals_raw_rows(store: Store, by: str) -> None:
    rollup = rounded(queries.cost_by(store, by), by)   # type: ignore[arg-type]
    raw = rounded(queries.cost_by_raw(store, by), by)  # type: ignore[arg-type]
    assert rollup == raw
    assert sum(r["calls"] for r in raw.values()) > 500


@pytest.mark.parametrize("by", ["team", "task_type", "model", "tier"])
def test_daily_cost_equals_raw_rows_per_day(store: Store, by: str) -> None:
    """/v1/cost/daily (analytics.cost_daily, read from the daily rollup) against the raw model
    calls grouped by UTC day, over data delivered twice; and a window of whole days."""
    def raw(since: datetime | None = None, until: datetime | None = None
            ) -> dict[tuple[str, str], tuple[float, int]]:
        where: list[str] = []
        params: dict[str, datetime] = {}
        if since is not None:
            where.append("toDate(occurred_at) >= toDate({since:DateTime64(3, 'UTC')})")
            params["since"] = since
        if until is not None:
            where.append("toDate(occurred_at) < toDate({until:DateTime64(3, 'UTC')})")
            params["until"] = until
        rows = store.query_rows(
            f"SELECT toString(toDate(occurred_at)), toString({by}), sum(cost_usd), count() "
            f"FROM {store.table('model_calls')} FINAL "
            f"{queries.where_clause(where)} GROUP BY 1, 2", params)
        return {(d, k): (round(float(c), 9), int(n)) for d, k, c, n in rows}

    def daily(**window: datetime) -> dict[tuple[str, str], tuple[float, int]]:
        return {(str(r["day"]), r[by]): (round(float(r["cost_usd"]), 9), int(r["calls"]))
                for r in analytics.cost_daily(store, by, **window)}  # type: ignore[arg-type]

    everything = raw()
    assert daily() == everything
    assert len({day for day, _ in everything}) >= 3
    since, until = NOW - timedelta(days=2), NOW - timedelta(hours=1)
    window = raw(since, until)
    assert daily(since=since, until=until) == window
    assert window and len(window) < len(everything)


def test_one_query_breakdown_equals_raw_rows_per_dimension(store: Store) -> None:
    dims = ("team", "task_type", "model")
    got = queries.cost_breakdown(store, dims)    # type: ignore[arg-type]
    for by in dims:
        assert rounded(got[by], by) == rounded(queries.cost_by_raw(store, by), by)  # type: ignore[arg-type]
        assert [r[by] for r in got[by]] == [r[by] for r in queries.cost_by(store, by)]  # type: ignore[arg-type]


@pytest.mark.parametrize("since,until", [
    (NOW - timedelta(days=2), None),                                       # partial hour start
    (None, NOW - timedelta(hours=30, minutes=17)),                          # partial hour end
    ((NOW - timedelta(days=1)).replace(minute=0, second=0), NOW.replace(minute=0, second=0)),
    (NOW - timedelta(hours=5, minutes=40), NOW - timedelta(hours=5, minutes=10)),  # in one hour
    (NOW - timedelta(days=2, hours=5, minutes=17), NOW - timedelta(hours=3, minutes=7)),  # days
    ((NOW - timedelta(days=2)).replace(hour=0, minute=0, second=0), None),   # whole days
])
def test_windows_on_and_off_the_hour_equal_raw_rows(store: Store, since: datetime | None,
                                                    until: datetime | None) -> None:
    rollup = rounded(queries.cost_by(store, "team", since=since, until=until), "team")
    raw = rounded(queries.cost_by_raw(store, "team", since=since, until=until), "team")
    assert rollup == raw
    assert rollup


@pytest.mark.parametrize("by", ["team", "task_type"])
def test_cost_to_value_from_rollups_equals_raw_rows(store: Store, by: str) -> None:
    rollup = rounded(analytics.cost_to_value(store, by), by)             # type: ignore[arg-type]
    raw = rounded(analytics.cost_to_value(store, by, source="raw"), by)  # type: ignore[arg-type]
    assert rollup == raw
    assert sum(r["successes"] for r in raw.values()) > 300
    team = sorted(raw)[0] if by == "team" else None
    if team:
        assert rounded(analytics.cost_to_value(store, by, team=team), by) == rounded(
            analytics.cost_to_value(store, by, team=team, source="raw"), by)


def test_success_counts_per_model_and_task_type_equal_raw_rows(store: Store) -> None:
    rollup = success_stats(store, list(TYPES))
    raw = success_stats(store, list(TYPES), source="raw")
    assert rollup == raw
    assert len(rollup) == len(TYPES) * len(MODELS)


@pytest.mark.parametrize("scenario", ["tier", "type"])
def test_what_if_from_rollups_equals_raw_rows(store: Store, scenario: str) -> None:
    catalog = catalog_for(Settings().catalog_file)
    if scenario == "tier":
        sel = Selection(share=0.2, target=catalog.default_model("small"), from_tier="frontier")
    else:
        sel = Selection(share=0.3, target=catalog.model("claude-sonnet-4-6"), task_type="debug")
    rollup, raw = what_if(store, catalog, sel), what_if(store, catalog, sel, source="raw")
    assert rollup["by_task_type"] and rollup["moved_tasks"] > 0
    assert rollup["cost_change_usd"] == pytest.approx(raw["cost_change_usd"], rel=1e-9)
    assert rollup["expected_successes_lost"] == pytest.approx(raw["expected_successes_lost"])
    for a, b in zip(rollup["by_task_type"], raw["by_task_type"], strict=True):
        assert {k: v for k, v in a.items() if not isinstance(v, float)} == \
               {k: v for k, v in b.items() if not isinstance(v, float)}


def test_rebuild_from_raw_rows_gives_the_same_rollups(store: Store) -> None:
    before = rounded(queries.cost_by(store, "model"), "model")
    stats = success_stats(store, list(TYPES))
    rollups.rebuild(store)
    assert rounded(queries.cost_by(store, "model"), "model") == before
    assert success_stats(store, list(TYPES)) == stats


# -- retention -------------------------------------------------------------------------------
def test_raw_rows_expire_after_the_ttl_and_the_rollups_and_the_audit_log_keep_them(
        chdb_dir: Path) -> None:
    s = open_test_store(chdb_dir)
    try:
        # a database of the first issue-18 version: its default put the 90-day TTL on `events`
        apply_ddl(s, ttl_days=90, audit_ttl_days=90)
        assert "TTL" in str(s.command(f"SHOW CREATE TABLE {s.table('events')}"))
        apply_ddl(s, ttl_days=30)            # this version's start: audit log kept by default
        create = str(s.command(f"SHOW CREATE TABLE {s.table('model_calls')}"))
        assert "TTL" in create and "toIntervalDay(30)" in create
        assert "toYYYYMM(occurred_at)" in create          # monthly partitions
        assert "TTL" not in str(s.command(f"SHOW CREATE TABLE {s.table('events')}"))
        old = [e.model_copy(update={"occurred_at": e.occurred_at - timedelta(days=40)})
               for e in fleet(40, seed=3, prefix="old")]
        new = fleet(40, seed=4, prefix="new")
        sink = ClickHouseSink(s)
        deliver(sink, old + new)
        sink.flush()
        before = queries.cost_by(s, "team")
        for table in ("model_calls", "attempt_outcomes", "events"):
            s.command(f"OPTIMIZE TABLE {s.table(table)} FINAL")
        teams_raw = {r["team"] for r in queries.cost_by_raw(s, "team")}
        assert teams_raw and all(t.startswith("new-") for t in teams_raw)
        assert queries.cost_by(s, "team") == before      # the rollups kept the old hours
        assert {r["team"] for r in before} >= {f"old-team-{i}" for i in range(3)}
        # the audit log still holds every old event: an old task's timeline replays in full
        old_task = old[0].task_id
        assert len(queries.task_events(s, old_task)) == sum(
            1 for e in old if e.task_id == old_task)
        # an explicit audit retention applies to the audit log alone
        apply_ddl(s, ttl_days=30, audit_ttl_days=35)
        s.command(f"ALTER TABLE {s.table('events')} MATERIALIZE TTL SETTINGS mutations_sync = 1")
        assert queries.task_events(s, old_task) == []
        assert queries.task_events(s, new[0].task_id)
    finally:
        close_test_store(s)


def test_a_restart_mid_batch_looks_up_only_the_redelivered_records(chdb_dir: Path) -> None:
    """The sink asks ClickHouse for stored event ids only for records at or below the offsets an
    earlier process recorded in sink_progress; a steady flush asks nothing; answers stay exact."""
    s = open_test_store(chdb_dir)
    try:
        events = fleet(150, seed=9, prefix="rs")
        crashed = ClickHouseSink(s, flush_rows=120, group="acct")
        deliver(crashed, events[: len(events) * 2 // 3])   # flushed by size, then SIGKILL
        assert crashed.stats.flushes >= 2 and crashed.stats.lookups == 0
        assert crashed.pending > 0                          # the unflushed tail is lost
        restarted = ClickHouseSink(s, flush_rows=100_000, group="acct")
        restarted.reassigned()
        deliver(restarted, events)           # nothing was committed: all of it comes again
        restarted.flush()
        assert restarted.stats.lookups >= 1 and restarted.stats.duplicates > 0
        lookups = restarted.stats.lookups
        more = fleet(40, seed=10, prefix="rs2")              # new records past the marks
        deliver(restarted, more, offset=len(events) + MARK_AHEAD)
        restarted.flush()
        assert restarted.stats.lookups == lookups
        calls = [e for e in events + more if isinstance(e, ev.ModelCall)]
        assert int(s.command(f"SELECT count() FROM {s.table('model_calls')}")) == len(calls)
        for by in ("team", "model"):
            assert rounded(queries.cost_by(s, by), by) == rounded(  # type: ignore[arg-type]
                queries.cost_by_raw(s, by), by)                     # type: ignore[arg-type]
        assert success_stats(s, list(TYPES)) == success_stats(s, list(TYPES), source="raw")
    finally:
        close_test_store(s)


def test_migration_backfills_rollups_of_a_database_that_predates_them(chdb_dir: Path) -> None:
    s = open_test_store(chdb_dir)
    try:
        sink = ClickHouseSink(s)
        deliver(sink, fleet(80, seed=5, prefix="mig"))
        sink.flush()
        expected = rounded(queries.cost_by(s, "task_type"), "task_type")
        stats = success_stats(s, list(TYPES))
        for rollup in (rollups.CALLS_ROLLUP, rollups.ATTEMPTS_ROLLUP, *rollups.DAILY.values()):
            s.command(f"TRUNCATE TABLE {s.table(rollup)}")
        s.command(f"ALTER TABLE {s.table('attempt_outcomes')} UPDATE task_type = '', "
                  "call_model = '', tier = '' WHERE cached = 0 SETTINGS mutations_sync = 1")
        assert queries.cost_by(s, "task_type") == []
        apply_ddl(s)                                        # the start of a new version
        assert rounded(queries.cost_by(s, "task_type"), "task_type") == expected
        assert success_stats(s, list(TYPES)) == stats
    finally:
        close_test_store(s)


def test_a_database_from_before_first_calls_gets_its_task_counts_at_the_next_start(
        chdb_dir: Path) -> None:
    """Rollups and raw rows stored before model_calls.first_call existed (every flag 0, the
    rollup view without it): the next start replaces the view, sets the flags from the rows
    and adds the task counts to the rollups, which keep their other sums."""
    s = open_test_store(chdb_dir)
    try:
        sink = ClickHouseSink(s)
        deliver(sink, fleet(120, seed=9, prefix="old"))
        sink.flush()
        expected = {by: rounded(queries.cost_by(s, by), by)  # type: ignore[arg-type]
                    for by in ("team", "model")}
        assert all(r["tasks"] for rows in expected.values() for r in rows.values())
        # the database as an older version left it
        s.command(f"ALTER TABLE {s.table('model_calls')} UPDATE first_call = 0 WHERE 1 "
                  "SETTINGS mutations_sync = 2")
        rollups.rebuild(s)
        for table in (rollups.CALLS_ROLLUP, rollups.DAILY[rollups.CALLS_ROLLUP]):
            s.command(f"DROP VIEW {s.table(table + '_mv')}")
            s.command(f"CREATE MATERIALIZED VIEW {s.table(table + '_mv')} TO {s.table(table)} "
                      f"AS SELECT toStartOfHour(toDateTime(occurred_at, 'UTC')) AS hour, team, "
                      f"task_type, model, tier, toUInt64(count()) AS calls, "
                      f"sum(cost_usd) AS cost_usd FROM {s.table('model_calls')} "
                      f"GROUP BY hour, team, task_type, model, tier")
        assert {r["tasks"] for r in queries.cost_by(s, "team")} == {0}
        apply_ddl(s)                                        # the start of a new version
        for by, rows in expected.items():
            assert rounded(queries.cost_by(s, by), by) == rows  # type: ignore[arg-type]
            assert rounded(queries.cost_by_raw(s, by), by) == rows  # type: ignore[arg-type]
    finally:
        close_test_store(s)


# -- the dashboard at growing history --------------------------------------------------------
def dashboard_reads(s: Store) -> tuple[int, int, dict[str, Any]]:
    """(queries, rows ClickHouse reads for them, the payload) of one dashboard refresh. Rows: the
    query summaries' read_rows on a server; on chdb, whose summary counts result rows, the
    EXPLAIN ESTIMATE of each query (granule-rounded)."""
    from fleetplane.accounting.dashboard import dashboard_data

    with s.metered() as meter:
        body = dashboard_data(s, Settings())
    if not is_chdb(s.dsn):
        return meter.queries, meter.read_rows, body
    rows = 0
    for sql, params in meter.statements:
        for r in s.query("EXPLAIN ESTIMATE " + sql, params):
            rows += int(r["rows"])
    return meter.queries, rows, body


def history_store(chdb_dir: Path, rows: int) -> Store:
    """`rows` model calls of history older than the live window, then the same recent fleet."""
    from fleetplane.accounting.bench import generate_history

    s = open_test_store(chdb_dir)
    generate_history(s, rows, teams=3, types=4, days=20, min_age_s=3 * 3600)
    for table in (rollups.CALLS_ROLLUP, rollups.ATTEMPTS_ROLLUP, *rollups.DAILY.values()):
        s.command(f"OPTIMIZE TABLE {s.table(table)} FINAL")   # steady state: parts merged
    recent = [e.model_copy(update={"occurred_at": NOW - timedelta(minutes=20)
                                   + (e.occurred_at - NOW) / 300})
              for e in fleet(40, seed=11, prefix="now")]
    sink = ClickHouseSink(s)
    deliver(sink, recent)
    sink.flush()
    return s


def test_dashboard_reads_stay_flat_as_history_grows(chdb_dir: Path) -> None:
    small = history_store(chdb_dir, 100_000)
    large = history_store(chdb_dir, 1_000_000)
    try:
        n_small, read_small, body_small = dashboard_reads(small)
        n_large, read_large, body_large = dashboard_reads(large)
        assert n_small == n_large
        # the history is there (spend, value), the live sections see the same recent fleet
        assert body_large["spend_usd"] > 5 * body_small["spend_usd"] > 0
        assert body_large["overview"]["total"] == body_small["overview"]["total"]
        assert len(body_large["tasks"]) == len(body_small["tasks"]) == 25
        # 10x the history; what a refresh reads may not follow it
        assert read_large < 1.3 * read_small + 10_000, (read_small, read_large)
        # and it is far below the history itself
        assert read_large < 200_000
    finally:
        close_test_store(small)
        close_test_store(large)


def test_dashboard_endpoint_shape(store: Store) -> None:
    from fastapi.testclient import TestClient

    from fleetplane.accounting.api import create_app

    with TestClient(create_app(store, settings=Settings())) as client:
        body = client.get("/v1/dashboard").json()
    assert set(body) >= {"generated_at", "live_window_s", "overview", "budgets", "spend_usd",
                         "cost_by_team", "cost_by_task_type", "cost_by_model", "value", "cache",
                         "utilization", "queue_wait", "held_time", "alerts", "tasks"}
    assert body["spend_usd"] == pytest.approx(
        sum(r["cost_usd"] for r in queries.cost_by_raw(store, "team")))
    assert {r["model"] for r in body["cost_by_model"]} == {m for m, _ in MODELS}
    # value and cache savings on the dashboard are the endpoints' answers
    assert body["value"] == json_rows(analytics.cost_to_value(store, "task_type", source="raw"))
    assert body["cache"]["cached_tasks"] == analytics.cache_savings(store)["cached_tasks"] > 0
    assert set(body["overview"]["total"]) == {"queued", "running", "held", "completed",
                                              "failed", "other"}


def deliver_batches(sink: ClickHouseSink, events: list[ev.Event], offset: int = 0,
                    size: int = 64) -> None:
    """As accounting's loop delivers them: consumed batches of Avro records, each turned into
    rows by the fast path (columnar.rows_of) and handed over in one add_batch."""
    serde = default_serde()
    for start in range(0, len(events), size):
        batch: dict[str, list[tuple[Any, ...]]] = {t: [] for t in COLUMNS}
        offsets: dict[tuple[str, int], tuple[int, int]] = {}
        for i, event in enumerate(events[start:start + size], start=offset + start):
            value = serde.encode(event)
            name, fields = serde.decode_record(value)
            event_row, fact, transition = columnar.rows_of(name, fields, topic_for(event), 0, i,
                                                           value)
            batch["events"].append(event_row)
            if fact is not None:
                batch[fact[0]].append(fact[1])
            if transition is not None:
                batch["task_transitions"].append(transition)
            low, high = offsets.get((topic_for(event), 0), (i, i))
            offsets[(topic_for(event), 0)] = (min(low, i), max(high, i))
        sink.add_batch(batch, offsets)


def test_batches_redelivered_after_a_restart_mid_batch_are_not_counted_twice(
        chdb_dir: Path) -> None:
    """The loop's batch path: a process flushed part of its batches and died before storing
    offsets; the next one gets everything again (and one batch twice): every raw row once, the
    rollups equal the raw rows."""
    s = open_test_store(chdb_dir)
    try:
        events = fleet(150, seed=11, prefix="rb")
        crashed = ClickHouseSink(s, flush_rows=120, group="acct")
        deliver_batches(crashed, events[: len(events) * 2 // 3])
        assert crashed.stats.flushes >= 2 and crashed.pending > 0
        restarted = ClickHouseSink(s, flush_rows=100_000, group="acct")
        restarted.reassigned()
        deliver_batches(restarted, events)
        deliver_batches(restarted, events[10:74], offset=10)   # a redelivered batch
        restarted.flush()
        assert restarted.stats.duplicates > 0
        calls = [e for e in events if isinstance(e, ev.ModelCall)]
        assert int(s.command(f"SELECT count() FROM {s.table('model_calls')}")) == len(calls)
        outcomes = [e for e in events if isinstance(e, ev.TaskCompleted | ev.TaskFailed)]
        assert int(s.command(f"SELECT count() FROM {s.table('attempt_outcomes')}")) == len(
            outcomes)
        for by in ("team", "model", "task_type"):
            assert rounded(queries.cost_by(s, by), by) == rounded(  # type: ignore[arg-type]
                queries.cost_by_raw(s, by), by)                     # type: ignore[arg-type]
        assert success_stats(s, list(TYPES)) == success_stats(s, list(TYPES), source="raw")
        for by in ("task_type", "team"):
            assert json_rows(analytics.cost_to_value(s, by)) == json_rows(  # type: ignore[arg-type]
                analytics.cost_to_value(s, by, source="raw"))                # type: ignore[arg-type]
    finally:
        close_test_store(s)


def test_rows_a_crash_kept_out_of_the_views_are_recounted_at_the_next_start(
        chdb_dir: Path) -> None:
    """A materialized view is not atomic with the insert that feeds it: a SIGKILL during an
    insert can leave raw rows without their rollup rows, and the sink skips raw rows it finds
    on redelivery. The start's repair (rollups.repair_recent) recounts the recent buckets from
    raw rows (the CI chaos run: cost per team 2.2-12.6% low in the rollups, raw rows complete)."""
    s = open_test_store(chdb_dir)
    try:
        events = fleet(300, seed=11, prefix="rp")
        half = len(events) // 2
        sink = ClickHouseSink(s, flush_rows=10_000)
        deliver(sink, events[:half])
        sink.flush()
        views = [str(r["name"]) for r in s.query(
            "SELECT name FROM system.tables WHERE database = {db:String} "
            "AND engine = 'MaterializedView'", {"db": s.database})]
        for view in views:  # the crash: raw parts written, the views' parts not
            s.command(f"DETACH TABLE {s.table(view)}")
        deliver(sink, events[half:])
        sink.flush()
        for view in views:
            s.command(f"ATTACH TABLE {s.table(view)}")
        raw = rounded(queries.cost_by_raw(s, "team"), "team")
        assert rounded(queries.cost_by(s, "team"), "team") != raw  # the rollups are short

        # the views of calls and attempts (hourly, daily) and utilization
        assert rollups.repair_recent(s, hours=4 * 24) >= 5
        assert rounded(queries.cost_by(s, "team"), "team") == raw
        daily: dict[str, float] = {}
        for r in analytics.cost_daily(s, "team"):  # the daily rollup behind /v1/cost/daily
            daily[r["team"]] = daily.get(r["team"], 0.0) + r["cost_usd"]
        assert {t: round(c, 9) for t, c in daily.items()} == \
            {t: round(r["cost_usd"], 9) for t, r in raw.items()}
        # a second start changes nothing
        rollups.repair_recent(s, hours=4 * 24)
        assert rounded(queries.cost_by(s, "team"), "team") == raw
    finally:
        close_test_store(s)


#: every rollup the model_calls and attempt_outcomes views feed (named here, not read from the
#: views: a view the bench's history path left out must fail the test)
ROLLUP_TABLES = ("model_calls_hourly", "model_calls_daily", "attempts_hourly", "attempts_daily")


def rollup_contents(s: Store, table: str) -> list[tuple[Any, ...]]:
    """A rollup's rows, merged (FINAL) and sorted; float sums rounded (summation order)."""
    cols = s.query_rows("SELECT name, type FROM system.columns WHERE database = {db:String} "
                        "AND table = {t:String} ORDER BY position", {"db": s.database, "t": table})
    exprs = [f"round(`{name}`, 6)" if "Float" in str(kind) else f"`{name}`"
             for name, kind in cols if "AggregateFunction(uniq" not in str(kind)]
    return [tuple(r) for r in s.query_rows(
        f"SELECT {', '.join(exprs)} FROM {s.table(table)} FINAL ORDER BY ALL")]


def test_the_benchs_history_without_raw_rows_stores_the_rollups_the_views_would(
        chdb_dir: Path) -> None:
    """The 100M bench stores its history straight into the rollups (generate_history(raw=False):
    each view's own SELECT over the generated rows). Its figures stand only if that equals what
    the materialized views store when the same rows are inserted raw, as the sink inserts."""
    from fleetplane.accounting.bench import generate_history

    now = datetime.now(UTC)
    through_views, direct = open_test_store(chdb_dir), open_test_store(chdb_dir)
    try:
        generate_history(through_views, 30_000, teams=3, types=4, days=3, now=now)
        generate_history(direct, 30_000, teams=3, types=4, days=3, now=now, raw=False)
        assert int(direct.command(f"SELECT count() FROM {direct.table('model_calls')}")) == 0
        for table in ROLLUP_TABLES:
            expected = rollup_contents(through_views, table)
            assert expected, table
            assert rollup_contents(direct, table) == expected, table
    finally:
        close_test_store(through_views)
        close_test_store(direct)


def test_a_database_with_the_first_cost_rollups_loses_them_at_the_next_start(
        chdb_dir: Path) -> None:
    """The issue-6 daily cost tables and their views (010_cost_rollups.sql before stop 33)
    cost every model-call insert two more pipelines; /v1/cost/daily reads model_calls_daily
    now. A database that has them (as created then) loses them when the schema is applied."""
    s = open_test_store(chdb_dir)
    try:
        s.command(f"CREATE TABLE {s.table('cost_daily_team')} (day Date, team String, "
                  "cost_usd Float64, calls UInt64) ENGINE = SummingMergeTree ORDER BY (day, team)")
        s.command(f"CREATE MATERIALIZED VIEW {s.table('cost_daily_team_mv')} TO "
                  f"{s.table('cost_daily_team')} AS SELECT toDate(occurred_at) AS day, team, "
                  f"sum(cost_usd) AS cost_usd, count() AS calls FROM {s.table('model_calls')} "
                  "GROUP BY day, team")

        def tables() -> set[str]:
            return {str(r[0]) for r in s.query_rows(
                "SELECT name FROM system.tables WHERE database = {db:String}",
                {"db": s.database})}

        assert {"cost_daily_team", "cost_daily_team_mv"} <= tables()
        apply_ddl(s)
        assert not {t for t in tables() if t.startswith("cost_daily")}
        sink = ClickHouseSink(s)
        events = fleet(40, seed=5, prefix="cd")
        deliver(sink, events)
        sink.flush()
        daily = analytics.cost_daily(s, "team")
        assert sum(r["calls"] for r in daily) == sum(isinstance(e, ev.ModelCall) for e in events)
    finally:
        close_test_store(s)
