"""After the executor's loop rewinds (a transaction that failed during a broker restart), the
dispatches read again are judged against the outcomes committed by then (executor/leases.py,
`LeaseTable.sync(fresh=True)`). The make chaos run published 13 outcomes twice (same event id):
the redelivered dispatches were answered from the journal while the read_committed outcome
follower, paced and just reconnected, had not read the outcomes committed before the rewind.
Real broker, real followers; the follower's pace is long here so that what it has read by
itself is known."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from fleetplane.core import events as ev
from fleetplane.core.follower import Follower
from fleetplane.core.kafka import EventProducer
from fleetplane.core.settings import Settings
from fleetplane.executor.leases import LeaseTable

PACE_S = 3.0


def _completed(task_id: str) -> ev.TaskCompleted:
    return ev.TaskCompleted(task_id=task_id, team="a", attempt=1, model="m", output="ok",
                            cost_usd=0.001, duration_ms=5)


@pytest.fixture
def followed(base_settings: Settings, unique: str
             ) -> Iterator[tuple[LeaseTable, EventProducer]]:
    """A lease table on real followers, assigned, and a producer of outcomes."""
    settings = Settings(kafka_bootstrap=base_settings.kafka_bootstrap)
    claims = Follower(settings, f"claims-{unique}", pace_s=PACE_S)
    outcomes = Follower(settings, f"outcomes-{unique}", "read_committed", pace_s=PACE_S)
    leases = LeaseTable(settings, f"exec-{unique}", lookback_s=60)
    leases.follow(claims, outcomes)
    claims.start()
    outcomes.start()
    producer = EventProducer(settings)
    try:
        assert outcomes.assigned.wait(60), "the outcome follower was not assigned"
        yield leases, producer
    finally:
        producer.close()
        claims.close()
        outcomes.close()


def test_an_outcome_committed_before_a_rewind_is_known_to_the_dispatches_read_again(
        followed: tuple[LeaseTable, EventProducer], unique: str) -> None:
    leases, producer = followed
    leases.sync()  # the first redelivery after start-up: once per process
    before = f"{unique}-before"
    producer.send([_completed(before)])
    leases.sync()  # a later redelivery, no rewind: no second wait
    again = f"{unique}-after-rewind"
    producer.send([_completed(again)])
    started = time.monotonic()
    leases.sync(fresh=True)  # a dispatch read again after a rewind
    lease = leases.get(again, 1)
    assert lease is not None and lease.done, (
        "an outcome committed before the rewind is not known after a fresh sync "
        f"({time.monotonic() - started:.2f} s)")


def test_a_failed_commit_is_tried_again_without_the_outcomes_already_on_the_log(
        followed: tuple[LeaseTable, EventProducer], unique: str) -> None:
    """The make chaos run's last duplicate: a commit that failed during the broker restart had
    gone through on the broker, and the loop committed the same TaskCompleted again. Before a
    retry the loop asks the lease table (`before_retry`): outcomes the read_committed follower
    finds on the log are dropped; the others, and audit events, are committed again."""
    leases, producer = followed
    leases.sync()
    committed = _completed(f"{unique}-committed")
    producer.send([committed])  # the failed commit that went through all the same
    pending = _completed(f"{unique}-pending")
    call = ev.ModelCall(task_id=committed.task_id, team="a", attempt=1, call_index=0,
                        model="m", provider="anthropic", tier="small", input_tokens=1,
                        output_tokens=1, cost_usd=0.0, latency_ms=1.0, outcome="ok")
    kept = leases.drop_committed([call, committed, pending])
    assert kept == [call, pending]
