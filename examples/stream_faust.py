"""A faust worker that reacts to finished fleetplane tasks (docs/consumers.md).

    FLEETPLANE_KAFKA_BOOTSTRAP=127.0.0.1:9092 python examples/stream_faust.py worker -l info

Prints one JSON line per TaskCompleted / TaskFailed on tasks.outcomes (swap the print for a
Slack message, a ticket, a metric). Its consumer group commits what it handled; a restart goes on
from there.
"""

from __future__ import annotations

import json
import os
import sys

import faust

from fleetplane.core.events import TaskCompleted, TaskFailed
from fleetplane.stream.faust_codec import register

register()
app = faust.App(
    os.environ.get("FLEETPLANE_EXAMPLE_GROUP", "fleetplane-example-outcomes"),
    broker=f"kafka://{os.environ.get('FLEETPLANE_KAFKA_BOOTSTRAP', '127.0.0.1:9092')}",
    web_enabled=False,
    topic_allow_declare=False,  # fleetplane's topics exist; a consumer never creates them
    topic_disable_leader=True,
    datadir=os.environ.get("FLEETPLANE_EXAMPLE_DATADIR", ".faust-example"),
    consumer_auto_offset_reset="earliest",
)
outcomes = app.topic("tasks.outcomes", value_serializer="fleetplane")


@app.agent(outcomes)
async def on_outcome(stream: faust.StreamT) -> None:
    async for event in stream:
        if isinstance(event, TaskCompleted | TaskFailed):
            line = {"type": type(event).__name__, "task_id": event.task_id,
                    "team": event.team, "cost_usd": getattr(event, "cost_usd", None)}
            print(json.dumps(line), flush=True)
            sys.stdout.flush()


if __name__ == "__main__":
    app.main()
