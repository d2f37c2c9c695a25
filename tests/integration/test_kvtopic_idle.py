"""The ingest's key-value tables (tokens, idempotency marks, names) follow their topics with
the idle backoff: an idle table stops fetching (on the embedded broker a consumer fetching
back to back costs CPU in librdkafka and the broker), and a record written while it is parked
is still applied at once. With the hand-off doorbell, a quiet table is probed less and less
often, and a writer's ring reads its record at once."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fleetplane.core.settings import Settings
from fleetplane.ingest.kvtopic import TopicTable, TopicWriter

TOPIC = "ingest.idempotency"


def test_a_parked_table_applies_a_new_record_promptly(base_settings: Settings) -> None:
    seen: dict[str, dict[str, Any] | None] = {}
    table = TopicTable(base_settings, {TOPIC: seen.__setitem__})
    writer = TopicWriter(base_settings)
    try:
        assert table.start(60)
        time.sleep(base_settings.idle_backoff_s + 1.0)  # idle: parked by now
        for i in range(3):
            key = f"kv-{uuid.uuid4().hex[:8]}-{i}"
            writer.put(TOPIC, key, {"n": i})
            sent = time.monotonic()
            while key not in seen and time.monotonic() - sent < 30:
                time.sleep(0.01)
            assert seen.get(key) == {"n": i}
            time.sleep(base_settings.idle_backoff_s + 0.5)  # parked again before the next
    finally:
        writer.close()
        table.stop()


def test_a_quiet_table_probes_less_often_and_a_writers_ring_reads_its_record(
        base_settings: Settings) -> None:
    """Nothing comes: the wait between the table's probes doubles up to idle_quiet_probe_s
    (every idle_probe_s it was 50 probes a second, about 20 ms of ingest's CPU per second on
    an idle stack). A TopicWriter rings the tables' doorbell once its record is acknowledged:
    the parked reader is woken by that ring, not by its next probe."""
    settings = base_settings.model_copy(update={
        "handoff_doorbell": True, "idle_probe_s": 0.02, "idle_quiet_probe_s": 0.5})
    seen: dict[str, dict[str, Any] | None] = {}
    waits: dict[str, float] = {}

    def apply(key: str, value: dict[str, Any] | None) -> None:
        assert table.idle is not None
        waits[key] = table.idle.wait_s  # as the record was read
        seen[key] = value

    table = TopicTable(settings, {TOPIC: apply})
    writer = TopicWriter(settings)
    try:
        assert table.start(60)
        assert table.idle is not None and table.idle.bell is not None
        time.sleep(2.0)  # quiet for 0.1 s (QUIET_AFTER_S), then the wait grows: 20 ... 500 ms
        probes = table.idle.probes
        time.sleep(3.0)
        # every 500 ms: 6 in 3 s (150 at 20 ms); one more for a probe in hand
        assert table.idle.probes - probes <= 7
        assert table.idle.wait_s == 0.5
        rung = table.idle.rung
        key = f"kv-{uuid.uuid4().hex[:8]}-rung"
        writer.put(TOPIC, key, {"n": 1})
        sent = time.monotonic()
        while key not in seen and time.monotonic() - sent < 30:
            time.sleep(0.01)
        assert seen.get(key) == {"n": 1}
        assert table.idle.rung > rung, "the record was read without the writer's ring"
        assert waits[key] == settings.idle_probe_s  # the record reset the wait
    finally:
        writer.close()
        table.stop()
