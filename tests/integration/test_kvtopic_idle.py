"""The ingest's key-value tables (tokens, idempotency marks, names) follow their topics with
the idle backoff: an idle table stops fetching (on the embedded broker a consumer fetching
back to back costs CPU in librdkafka and the broker), and a record written while it is parked
is still applied at once."""

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
