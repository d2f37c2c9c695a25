"""The stream-consumer kit (fleetplane.stream, docs/consumers.md) on the real test broker: typed
events of every schema version, garbage reported instead of raised, a consumer group that commits
what was handled, and the faust example worker receiving a TaskCompleted."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

from confluent_kafka import Producer
from fastavro import schemaless_writer

from fleetplane.core import events as ev
from fleetplane.core.kafka import EventProducer
from fleetplane.core.serde import MAGIC, default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.topics import LIFECYCLE, OUTCOMES
from fleetplane.stream import follow, read_to_end

REPO = Path(__file__).resolve().parents[2]


def completed(task_id: str, team: str = "stream") -> ev.TaskCompleted:
    return ev.TaskCompleted(task_id=task_id, team=team, attempt=1, model="m", output="ok",
                            cost_usd=0.25, duration_ms=10)


def v1_started(task_id: str) -> bytes:
    """A TaskStarted as an executor of the first schema version wrote it (no lease_ms)."""
    serde = default_serde()
    old = next(e for e in serde.schemas.by_fingerprint.values()
               if e.name == "TaskStarted" and e is not serde.schemas.current["TaskStarted"])
    body = ev.TaskStarted(task_id=task_id, team="stream", attempt=1, executor_id="x").model_dump()
    body.pop("lease_ms")
    buf = io.BytesIO()
    buf.write(MAGIC + old.fingerprint)
    schemaless_writer(buf, old.parsed, body)
    return buf.getvalue()


def test_read_to_end_gives_typed_events_of_every_version_and_names_garbage(
        base_settings: Settings, producer: EventProducer, unique: str) -> None:
    done, started, junk = f"done-{unique}", f"started-{unique}", f"junk-{unique}"
    producer.send([completed(done)], 10)
    raw = Producer({"bootstrap.servers": base_settings.kafka_bootstrap})
    raw.produce(LIFECYCLE, key=started.encode(), value=v1_started(started))
    raw.produce(LIFECYCLE, key=junk.encode(), value=b"not avro at all")
    assert raw.flush(10) == 0
    records = list(read_to_end(base_settings, [OUTCOMES, LIFECYCLE],
                               wanted={done, started, junk}.__contains__, timeout_s=60))
    by_key = {r.key: r for r in records}
    assert set(by_key) == {done, started, junk}
    assert isinstance(by_key[done].event, ev.TaskCompleted)
    assert by_key[done].event.cost_usd == 0.25 and by_key[done].topic == OUTCOMES
    old = by_key[started].event
    assert isinstance(old, ev.TaskStarted) and old.lease_ms == 0 and old.executor_id == "x"
    assert by_key[junk].event is None and "C3 01" in (by_key[junk].error or "")


def test_follow_commits_what_the_loop_handled(base_settings: Settings, producer: EventProducer,
                                              unique: str) -> None:
    """At-least-once: a record is committed when the loop asks for the next one, so after a
    stop the group resumes with the record it was handling, never before it."""
    ids = [f"follow-{unique}-{i}" for i in range(3)]
    producer.send([completed(ids[0]), completed(ids[1])], 10)
    group = f"follow-{unique}"

    def ours(limit: int) -> list[str]:
        seen: list[str] = []
        deadline = time.monotonic() + 60
        for rec in follow(base_settings, [OUTCOMES], group=group,
                          stop=lambda: time.monotonic() > deadline):
            if rec.key in ids:
                seen.append(rec.key)
                if len(seen) == limit:
                    break
        return seen

    first = ours(2)  # different keys, maybe different partitions: any order
    assert sorted(first) == ids[:2]
    producer.send([completed(ids[2])], 10)
    # the one it was handling when it stopped comes again; the one before it does not
    assert sorted(ours(2)) == sorted([first[-1], ids[2]])


def test_the_faust_example_worker_receives_a_task_completed(
        base_settings: Settings, producer: EventProducer, unique: str, tmp_path: Path) -> None:
    env = {**os.environ, "FLEETPLANE_KAFKA_BOOTSTRAP": base_settings.kafka_bootstrap,
           "FLEETPLANE_EXAMPLE_GROUP": f"faust-example-{unique}",
           "FLEETPLANE_EXAMPLE_DATADIR": str(tmp_path / "faust")}
    task_id = f"faust-{unique}"
    producer.send([completed(task_id, team="faust-team")], 10)
    worker = subprocess.Popen([sys.executable, str(REPO / "examples" / "stream_faust.py"),
                               "worker", "-l", "warn"], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        assert worker.stdout is not None
        os.set_blocking(worker.stdout.fileno(), False)
        while time.monotonic() < deadline and worker.poll() is None:
            line = worker.stdout.readline()
            if not line:
                time.sleep(0.2)
                continue
            lines.append(line)
            if task_id in line:
                break
    finally:
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
    hit = [x for x in lines if task_id in x]
    assert hit, "".join(lines[-40:])
    assert '"type": "TaskCompleted"' in hit[0] and '"team": "faust-team"' in hit[0]
