"""`fleetplane audit replay|verify --task ID`: a task's timeline rebuilt from the Kafka topics
and/or from ClickHouse (through the accounting API), and its audit hash chains checked."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.table import Table

from fleetplane.cli import common
from fleetplane.cli.lazy import lazy

if TYPE_CHECKING:
    from fleetplane.accounting import audit
    from fleetplane.core import localstack
    from fleetplane.core import settings as fsettings
    from fleetplane.core.settings import Settings
else:
    audit = lazy("fleetplane.accounting.audit")
    localstack = lazy("fleetplane.core.localstack")
    fsettings = lazy("fleetplane.core.settings")

audit_app = typer.Typer(help="Replay and verify a task's audit trail.", no_args_is_help=True)
Task = Annotated[str, typer.Option("--task", help="Task id.")]


def kafka_settings() -> Settings:
    """The CLI's settings, pointed at the embedded stack's broker when it is up."""
    return localstack.kafka_settings(fsettings.get_settings())


def from_kafka(task_id: str) -> list[audit.Entry]:
    try:
        entries = audit.replay_kafka(kafka_settings(), task_id)
    except Exception as exc:
        raise common.fail(f"replaying the topics failed: {exc}") from exc
    if not entries:
        raise common.fail(f"no events for task {task_id!r} on the topics")
    return entries


def from_clickhouse(task_id: str) -> list[audit.Entry]:
    url = f"{localstack.accounting_url(fsettings.get_settings())}/v1/tasks/{task_id}/events"
    rows: list[dict[str, Any]] = common.api_get(url, {"limit": 100_000})
    return audit.entries_from_rows(rows)


def print_timeline(entries: list[audit.Entry], title: str) -> None:
    table = Table(title=title)
    for c in ("TIME (UTC)", "EVENT", "ATTEMPT", "DETAIL"):
        table.add_column(c)
    for t in audit.timeline(entries):
        table.add_row(t["occurred_at"][11:23], t["event_type"],
                      "" if t["attempt"] is None else str(t["attempt"]), t["detail"])
    common.console.print(table)


@audit_app.command("replay")
def replay(task: Task,
           source: Annotated[Literal["kafka", "clickhouse", "both"], typer.Option(
               help="Replay the topics, read ClickHouse, or both and compare.")] = "both",
           output: Annotated[str, typer.Option("-o", "--output", help="table or json")] = "table"
           ) -> None:
    """Rebuild a task's timeline: submission, routing, admission, model and tool calls, outcome."""
    kafka = from_kafka(task) if source in ("kafka", "both") else None
    ch = from_clickhouse(task) if source in ("clickhouse", "both") else None
    primary = kafka if kafka is not None else ch
    assert primary is not None
    if output == "json":
        body: dict[str, Any] = {"task_id": task, "timeline": audit.timeline(primary)}
        if kafka is not None and ch is not None:
            body["sources_agree"] = audit.timeline(kafka) == audit.timeline(ch)
        common.console.print_json(json.dumps(body))
    else:
        print_timeline(primary, f"task {task} ({'kafka' if kafka is not None else 'clickhouse'})")
    if kafka is not None and ch is not None:
        if audit.timeline(kafka) != audit.timeline(ch):
            only_k = {e.event.event_id for e in kafka} - {e.event.event_id for e in ch}
            only_c = {e.event.event_id for e in ch} - {e.event.event_id for e in kafka}
            common.err.print(f"[red]kafka and clickhouse disagree[/red]: {len(only_k)} events only "
                          f"on the topics, {len(only_c)} only in ClickHouse")
            raise typer.Exit(code=2)
        if output != "json":
            common.console.print(f"[green]kafka and clickhouse agree[/green]: {len(kafka)} events")


@audit_app.command("verify")
def verify(task: Task,
           source: Annotated[Literal["kafka", "clickhouse"], typer.Option(
               help="Where to read the audit events.")] = "clickhouse") -> None:
    """Check each attempt's audit hash chain; exit 1 when an event was changed, removed or
    reordered."""
    entries = from_kafka(task) if source == "kafka" else from_clickhouse(task)
    result = audit.verify_task(entries)
    for a in result["attempts"]:
        mark = "[green]ok[/green]" if a["ok"] else "[red]TAMPERED[/red]"
        common.console.print(f"attempt {a['attempt']}: {mark} ({a['events']} audit events, "
                          f"outcome recorded {a['recorded_count']})")
        for p in a["problems"]:
            common.console.print(f"  - {p}")
    if not result["attempts"]:
        common.console.print("no audit events or outcomes for this task yet")
    if not result["ok"]:
        raise typer.Exit(code=1)
    common.console.print(f"[green]verified[/green] ({source})")


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
