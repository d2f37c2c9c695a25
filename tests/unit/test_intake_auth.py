"""Pure parts of intake: token hashing and checks, token buckets, idempotency decisions."""

from __future__ import annotations

import pytest

from fleetplane.core import events as ev
from fleetplane.ingest.handlers import accept
from fleetplane.ingest.idempotency import Mark, task_id_for
from fleetplane.ingest.ratelimit import Limiter
from fleetplane.ingest.tokens import TokenStore, digest, new_token, record_for


def test_tokens_are_stored_as_hashes_and_checked_exactly() -> None:
    store = TokenStore()
    token_id, token = new_token()
    rec = record_for(token, "payments", "team")
    assert token not in str(rec) and rec["sha256"] == digest(token)
    store.apply(token_id, rec)
    who = store.verify(token)
    assert who is not None and (who.team, who.role, who.token_id) == ("payments", "team",
                                                                      token_id)
    assert who.may_see("payments") and not who.may_see("search")
    assert store.verify(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert store.verify("fpt_" + token_id + "_" + "x" * 43) is None
    assert store.verify("Bearer " + token) is None and store.verify("") is None
    store.apply(token_id, {**rec, "revoked_at": "2026-11-24T00:00:00+00:00"})
    assert store.verify(token) is None
    _, admin = new_token()
    store.apply(admin.split("_")[1], record_for(admin, "sre", "admin"))
    boss = store.verify(admin)
    assert boss is not None and boss.is_admin and boss.may_see("payments")
    with pytest.raises(ValueError):
        record_for(token, "payments", "root")


def test_token_bucket_allows_the_burst_then_says_how_long_to_wait() -> None:
    now = [100.0]
    limiter = Limiter(lambda team: (2.0, 3.0) if team == "slow" else (100.0, 100.0),
                      clock=lambda: now[0])
    assert [limiter.take("slow") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("slow") == pytest.approx(0.5)
    assert limiter.take("fast") == 0.0  # teams do not share buckets
    now[0] += 0.5
    assert limiter.take("slow") == 0.0
    assert limiter.blocked_for("slow") == pytest.approx(0.5)
    now[0] += 10
    assert limiter.blocked_for("slow") == 0.0
    assert [limiter.take("slow") for _ in range(4)][-1] > 0  # refilled to the burst, not more


def submitted(task_id: str, key: str | None, team: str = "payments") -> ev.TaskSubmitted:
    return ev.TaskSubmitted(task_id=task_id, team=team, idempotency_key=key,
                            spec=ev.TaskSpec(name="n", task_type="codegen", prompt="p"))


def test_idempotency_decisions() -> None:
    first = submitted("t1", "k")
    marks = {("payments", "k"): Mark("t1", first.event_id, "h", 0.0)}

    def seen(team: str, key: str) -> Mark | None:
        return marks.get((team, key))

    # the submission that made the mark (re-read after a crash): accepted again, same event id
    (again,) = accept(first, None, seen)
    assert isinstance(again, ev.TaskAccepted)
    assert again.event_id == next(iter(accept(first))).event_id
    # the same task submitted again (HTTP retry, producer retry): nothing new
    assert list(accept(submitted("t1", "k"), None, seen)) == []
    # a new task id with a used key: rejected, naming the original
    (dup,) = accept(submitted("t2", "k"), None, seen)
    assert isinstance(dup, ev.TaskRejected) and dup.field == "idempotency_key"
    assert "t1" in dup.reason
    # another team, or no key: independent
    assert isinstance(next(iter(accept(submitted("t3", "k", team="search"), None, seen))),
                      ev.TaskAccepted)
    assert isinstance(next(iter(accept(submitted("t4", None), None, seen))), ev.TaskAccepted)


def test_http_task_ids_follow_team_and_key() -> None:
    assert task_id_for("payments", "k") == task_id_for("payments", "k")
    assert task_id_for("payments", "k") != task_id_for("search", "k")
    assert task_id_for("payments", "k") != task_id_for("payments", "k2")
    assert len(task_id_for("a", "b")) == 32
