"""What accounting publishes back onto Kafka: BudgetStatus per team (fleet.budget) and anomaly
Alerts (fleet.alerts), computed from ClickHouse every `accounting_check_interval_s`.

Budgets are published when they change (state, period, or spend moved by at least a cent) and
every `budget_republish_s` regardless, so a router or coordinator that starts late learns every
team's status (fleet.budget is also compacted by team). Alerts get event ids derived from what
they are about (type, metric, task, attempt), so a restart or a second accounting instance
re-publishing one is a duplicate every consumer drops, and ids already stored are skipped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from fleetplane.accounting import analytics
from fleetplane.accounting.anomaly import Anomaly, attempt_anomalies, failure_rate_anomalies
from fleetplane.accounting.budgets import changed, statuses
from fleetplane.accounting.store import Store
from fleetplane.core.events import Alert, BudgetStatus, Event, derived_id
from fleetplane.core.logging import get_logger
from fleetplane.core.periods import period_start
from fleetplane.core.settings import Settings
from fleetplane.core.teams import teams_for

log = get_logger(__name__)

MIN_SPEND_DELTA_USD = 0.01
FAILURE_WINDOW = 20
LOOKBACK = timedelta(days=7)   # baselines come from attempts that ended in the last week


def alert_for(a: Anomaly, threshold: float, now: datetime) -> Alert:
    severity = "critical" if a.score > 2 * threshold else "warning"
    if a.metric == "failure_rate":
        message = (f"{a.task_type}: failure rate {a.value:.0%} over the last {FAILURE_WINDOW} "
                   f"attempts, baseline {a.baseline:.0%}")
    else:
        on = f" on {a.model}" if a.model else ""
        message = (f"{a.task_type}{on}: {a.metric} {a.value:.6g} on task {a.task_id} attempt "
                   f"{a.attempt}, baseline median {a.baseline:.6g} (robust z {a.score:.1f})")
    return Alert(event_id=derived_id("anomaly", a.key), task_id=a.task_id, team=a.team,
                 occurred_at=now, severity=severity, kind=f"anomaly.{a.metric}",
                 message=message, metric=a.metric, value=a.value, baseline=a.baseline)


class Publisher:
    """Computes budgets and anomalies; `send` publishes (an EventProducer's send in production)."""

    def __init__(self, store: Store, settings: Settings,
                 send: Callable[[list[Event]], None],
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.store = store
        self.settings = settings
        self.send = send
        self.clock = clock
        self.last_budget: dict[str, BudgetStatus] = {}
        self.last_budget_at = 0.0
        self.scored: set[tuple[str, int]] = set()
        self.alerted: set[str] | None = None
        self.last_scored_at: datetime | None = None
        self.published_budgets = 0
        self.published_alerts = 0

    # -- budgets ---------------------------------------------------------------------------
    def budget_statuses(self) -> list[BudgetStatus]:
        now = self.clock()
        teams = teams_for(self.settings.teams_file)
        periods = {teams.policy(t).budget_period for t in teams.teams} | {
            teams.defaults.budget_period}
        spent: dict[str, dict[str, float]] = {
            p: analytics.spend_since(self.store, period_start(p, now))
            for p in sorted(periods)}
        extra = {t for by_team in spent.values() for t in by_team if t}
        return statuses(teams, spent, now, extra)

    def check_budgets(self, force: bool = False) -> list[BudgetStatus]:
        current = self.budget_statuses()
        due = force or time.monotonic() - self.last_budget_at >= self.settings.budget_republish_s
        out = [s for s in current
               if due or changed(self.last_budget.get(s.team), s, MIN_SPEND_DELTA_USD)]
        if out:
            self.send(list(out))
            self.published_budgets += len(out)
            for s in out:
                self.last_budget[s.team] = s
        if due:
            self.last_budget_at = time.monotonic()
        return out

    # -- anomalies -------------------------------------------------------------------------
    def _known_alerts(self) -> set[str]:
        if self.alerted is None:
            rows = self.store.query(
                f"SELECT DISTINCT event_id FROM {self.store.table('alerts')} "
                "WHERE kind LIKE 'anomaly.%'")
            self.alerted = {r["event_id"] for r in rows}
        return self.alerted

    def check_anomalies(self) -> list[Alert]:
        """Score the attempts that finished since the last check (nothing to do, no query
        beyond one count, when no outcome arrived)."""
        s = self.settings
        started = self.clock()
        if self.last_scored_at is not None and not analytics.outcomes_ingested_since(
                self.store, self.last_scored_at - timedelta(seconds=1)):
            return []
        rows = analytics.recent_attempts(self.store, window=s.anomaly_window + 1,
                                         since=started - LOOKBACK)
        self.last_scored_at = started
        new_ids = {(r["task_id"], int(r["attempt"])) for r in rows} - self.scored
        found = attempt_anomalies(rows, new_ids=new_ids, min_samples=s.anomaly_min_samples,
                                  threshold=s.anomaly_threshold, min_ratio=s.anomaly_min_ratio,
                                  min_duration_excess_ms=s.anomaly_min_duration_excess_ms)
        found += failure_rate_anomalies(rows, recent=FAILURE_WINDOW, min_windows=3,
                                        threshold=s.anomaly_threshold)
        self.scored |= new_ids
        known = self._known_alerts()
        now = self.clock()
        alerts = [alert_for(a, s.anomaly_threshold, now) for a in found]
        alerts = [a for a in alerts if a.event_id not in known]
        if alerts:
            self.send(list(alerts))
            self.published_alerts += len(alerts)
            known.update(a.event_id for a in alerts)
        return alerts

    def check(self, force_budgets: bool = False) -> dict[str, Any]:
        budgets = self.check_budgets(force=force_budgets)
        alerts = self.check_anomalies()
        return {"budgets": len(budgets), "alerts": len(alerts)}


def run_in_thread(publisher: Publisher, stop: threading.Event) -> threading.Thread:
    """Check every accounting_check_interval_s until `stop` is set; errors are logged and the
    next round tries again (ClickHouse or the broker may be briefly away)."""

    def loop() -> None:
        first = True
        while not stop.wait(0 if first else publisher.settings.accounting_check_interval_s):
            try:
                publisher.check(force_budgets=first)
                first = False
            except Exception:
                log.warning("budget/anomaly check failed; retrying next round", exc_info=True)

    thread = threading.Thread(target=loop, name="accounting-publisher", daemon=True)
    thread.start()
    return thread
