"""core.table.ChangelogTable on the real broker: a restore sees exactly the committed rows (last
value per key, tombstones applied, aborted transactions ignored)."""

from __future__ import annotations

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from fleetplane.core.settings import Settings
from fleetplane.core.table import ChangelogTable


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
