"""core.table.ChangelogTable on the real broker: a restore sees exactly the committed rows (last
value per key, tombstones applied, aborted transactions ignored)."""

from __future__ import annotations

import threading

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from fleetplane.core.settings import Settings
from fleetplane.core.table import ChangelogTable, Follower


def test_restore_reads_committed_rows_only(base_settings: Settings, unique: str) -> None:
    topic = f"test-changelog-{unique}"
    admin = AdminClient(base_settings.client_config())
    for fut in admin.create_topics([NewTopic(topic, 1, 1, config={
            "cleanup.policy": "compact"})]).values():
        fut.result()
    empty = ChangelogTable(topic)
    assert empty.restore(base_settings.client_config()).rows == 0 and len(empty) == 0

    table = ChangelogTable(topic)
    producer = Producer(base_settings.producer_config(f"test-table-{unique}"))
    producer.init_transactions(30)

    def write(rows: dict[bytes, bytes | None], commit: bool) -> None:
        producer.begin_transaction()
        for key, value in rows.items():
            table.put(key, value)
        for rec in table.changes():
            producer.produce(rec.topic, key=rec.key, value=rec.value, partition=rec.partition)
        if commit:
            producer.commit_transaction(30)
        else:
            producer.abort_transaction(30)

    write({b"a": b"1", b"b": b"1", b"c": b"1"}, commit=True)
    write({b"a": b"2", b"b": None}, commit=True)  # an update and a tombstone
    write({b"a": b"aborted", b"d": b"aborted"}, commit=False)
    assert table.changes() == []  # handed out once

    restored = ChangelogTable(topic)
    info = restored.restore(base_settings.client_config())
    assert dict(restored) == {b"a": b"2", b"c": b"1"}
    assert info.rows == 2 and info.records == 5  # the aborted records are never read
    # after an abort of its own, the owner forgets its rows and reads them again
    restored.put(b"z", b"uncommitted")
    restored.invalidate()
    assert len(restored) == 0 and restored.restored is None
    restored.restore(base_settings.client_config())
    assert dict(restored) == {b"a": b"2", b"c": b"1"}


def test_the_follower_parks_while_nothing_is_written_and_a_takeover_reads_the_tail(
        base_settings: Settings, unique: str) -> None:
    """A standby's warm copy (``follow``) reads the changelog in rounds and stops fetching
    while the partition's end does not move (the embedded broker answers an empty fetch at
    once: a consumer left on an idle partition re-fetches back to back); a takeover's restore
    then gets every committed row, the tail written since the last round included."""
    topic = f"test-changelog-follow-{unique}"
    admin = AdminClient(base_settings.client_config())
    for fut in admin.create_topics([NewTopic(topic, 1, 1, config={
            "cleanup.policy": "compact"})]).values():
        fut.result()
    producer = Producer(base_settings.producer_config(f"test-follow-{unique}"))
    producer.init_transactions(30)

    def write(rows: dict[bytes, bytes | None]) -> None:
        producer.begin_transaction()
        for key, value in rows.items():
            producer.produce(topic, key=key, value=value, partition=0)
        producer.commit_transaction(30)

    write({f"k{i}".encode(): b"1" for i in range(50)})
    follower = Follower(topic, 0, base_settings.client_config(), probe_s=0.2)
    try:
        with follower._moved:
            assert follower._moved.wait_for(lambda: follower.position >= 51, 60)
        rounds = follower.rounds
        assert follower.records == 50
        # idle: its looks find the same end, so no new round (and no fetch) starts
        threading.Event().wait(1.5)
        assert follower.rounds == rounds and follower.error is None
        write({b"k0": b"2", b"k1": None, b"new": b"1"})
        taken = follower.take(55, 60)  # 51 + 3 records + the commit marker
        assert taken is not None
        rows, records = taken
        assert records == 53 and rows[b"k0"] == b"2" and b"k1" not in rows
        assert rows[b"new"] == b"1" and len(rows) == 50
    finally:
        follower.stop()
