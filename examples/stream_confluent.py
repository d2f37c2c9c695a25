"""Follow fleetplane's outcomes with confluent-kafka and the stream kit (docs/consumers.md).

    python examples/stream_confluent.py 127.0.0.1:9092 [group]

Prints each finished task with its cost; offsets are committed after each record is handled.
"""

from __future__ import annotations

import sys

from fleetplane.core.events import TaskCompleted, TaskFailed
from fleetplane.stream import follow


def main() -> None:
    bootstrap = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9092"
    group = sys.argv[2] if len(sys.argv) > 2 else "fleetplane-example-confluent"
    for rec in follow(bootstrap, ["tasks.outcomes"], group=group):
        if rec.error is not None:
            print(f"skipped {rec.topic}[{rec.partition}]@{rec.offset}: {rec.error}")
        elif isinstance(rec.event, TaskCompleted | TaskFailed):
            print(f"{type(rec.event).__name__} {rec.event.task_id} team={rec.event.team}",
                  flush=True)


if __name__ == "__main__":
    main()
