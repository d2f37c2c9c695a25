"""The router's shared statistics published once per transaction (Router.shared_records, the
loop's before_commit hook) instead of once per outcome: at most one record per changed cell,
and the replicas learn exactly what they learn from the per-outcome records."""

from __future__ import annotations

from fleetplane.core.loop import RawRecord

from .test_router_shared import deliver, outcomes, replica, table, workload


def test_one_record_per_changed_cell_per_transaction_and_the_same_statistics() -> None:
    a, b, alone = replica("a"), replica("b"), replica(None)
    a.batch_shared = b.batch_shared = True
    work_a, work_b = workload(120, 1), workload(80, 2)
    assert outcomes(a, work_a) == []  # nothing per outcome
    assert outcomes(b, work_b) == []
    outcomes(alone, work_a + work_b)
    raw_a, raw_b = a.shared_records(), b.shared_records()
    cells_a = {(t, m) for _, t, m, _ in work_a}
    assert len([r for r in raw_a if r.key and r.key.startswith(b"stats|")]) == len(cells_a)
    assert len({r.key for r in raw_a}) == len(raw_a)  # one record per key
    assert a.shared_records() == []  # nothing changed since
    deliver(raw_b, a)
    deliver(raw_a, b)
    assert table(a) == table(b) == table(alone)
    # an aborted transaction lost them: every own cell is published again at the next commit
    a.on_abort()
    again: list[RawRecord] = a.shared_records()
    assert {r.key for r in again if r.key and r.key.startswith(b"stats|")} == {
        r.key for r in raw_a if r.key and r.key.startswith(b"stats|")}
