"""The reconciler's pass reads the log to its end and stops, also while tasks keep arriving
(a steady stream never leaves the log quiet for a moment)."""

from __future__ import annotations

import threading
import time

from fleetplane.core import events as ev
from fleetplane.core.kafka import EventProducer
from fleetplane.core.settings import Settings
from fleetplane.reconciler.main import Reconciler


def test_a_pass_reaches_the_end_while_records_keep_arriving(
        base_settings: Settings, unique: str) -> None:
    reconciler = Reconciler(base_settings)
    reconciler.open()
    producer = EventProducer(base_settings)
    stop = threading.Event()
    sent: list[str] = []

    def stream() -> None:  # about 50 tasks a second, until the pass is over
        i = 0
        while not stop.is_set():
            spec = ev.TaskSpec(name=f"n{i}", task_type="summarize", prompt="p")
            task = ev.TaskAccepted(task_id=f"{unique}-stream-{i}", team="t", spec=spec)
            producer.send([task])
            sent.append(task.task_id)
            i += 1
            time.sleep(0.02)

    try:
        assert reconciler.catch_up()  # what was there before: read to the end
        feeder = threading.Thread(target=stream, daemon=True)
        feeder.start()
        while len(sent) < 20:
            time.sleep(0.05)
        reached = [reconciler.catch_up() for _ in range(3)]
        stop.set()
        feeder.join(10)
        # every pass ended at the end of the log (the old pass waited for a quiet 0.3 s and
        # gave up after 10 s without reaching it), and the records are seen
        assert reached == [True, True, True]
        assert reconciler.catch_up()
        seen = {t for t in sent if t in reconciler.tracker.tracks}
        assert seen == set(sent)
    finally:
        stop.set()
        producer.close()
        reconciler.close()
