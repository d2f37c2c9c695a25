"""What metrics and traces cost per record (docs/operations.md, "Metrics", "Traces").

In process, no broker: a Processor handles N decoded records (a router-sized handler returning
one event) and each output's Kafka headers are built as the loop's produce would build them,
three ways: nothing installed (tests), loop metrics (every service), loop metrics and traces
(every record traced, spans to a file exporter). Prints CPU microseconds per record and the
added cost of each layer.

    python -m bench.observability [--records 20000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from fleetplane.core import events as ev
from fleetplane.core.kafka import event_headers
from fleetplane.core.loop import Output, Processor, Record
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings
from fleetplane.metrics.setup import instrument

SPEC = ev.TaskSpec(name="n", task_type="summarize", prompt="p")
CLIENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def run(mode: str, n: int, trace_dir: Path) -> float:
    """CPU seconds per record for one mode."""
    settings = Settings(trace_file=str(trace_dir / f"{mode}-{{service}}.jsonl")
                        if mode == "traces" else "")
    obs = instrument(settings, "router", registry=CollectorRegistry()) if mode != "bare" \
        else None
    out = ev.TaskRouted(task_id="t", team="pay", spec=SPEC, attempt=1, model="m",
                        provider="anthropic", tier="small", reason="r")

    def handler(event: ev.Event, rec: Record) -> list[Output]:
        return [out.model_copy(update={"task_id": event.task_id})]

    p = Processor("router", ["tasks.accepted"], handler, settings)
    serde = default_serde()
    records = []
    for i in range(n):
        event = ev.TaskAccepted(task_id=f"t{i}", team="pay", spec=SPEC)
        records.append(Record("tasks.accepted", 0, i, event.task_id.encode(),
                              serde.encode(event), {"traceparent": CLIENT.encode()}))
    try:
        started = time.process_time()
        for i in range(0, n, 500):
            batch = records[i:i + 500]
            p.instruments.consumed(batch)
            for r in batch:
                for o in p._handle_one(r):
                    if isinstance(o, ev.Event):
                        event_headers(o)
            p.instruments.committed(0.001)
        if obs is not None and obs.tracing is not None:  # the export is part of the cost
            processor = getattr(obs.tracing.tracer, "_span_processor", None)
            if processor is not None:
                processor.force_flush()
        return (time.process_time() - started) / n
    finally:
        if obs is not None:
            obs.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run("bare", 500, Path(tmp))  # warm-up
        cost = {mode: run(mode, args.records, Path(tmp)) for mode in ("bare", "metrics",
                                                                       "traces")}
    print(f"per record, {args.records} records (CPU µs): "
          f"bare {cost['bare'] * 1e6:.1f}, with loop metrics {cost['metrics'] * 1e6:.1f} "
          f"(+{(cost['metrics'] - cost['bare']) * 1e6:.1f}), with metrics and traces "
          f"{cost['traces'] * 1e6:.1f} (+{(cost['traces'] - cost['metrics']) * 1e6:.1f})")


if __name__ == "__main__":
    main()
