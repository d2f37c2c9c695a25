"""`fleetplane submit | get tasks | describe task | cancel`: the intake API, like kubectl.

Every command goes through the ingest API with the caller's token (FLEETPLANE_TOKEN, the config
file, or the local stack's admin token), so a team sees only its own tasks."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fleetplane.cli.lazy import lazy

if TYPE_CHECKING:
    from fleetplane import client as fclient
    from fleetplane.client import ApiError, Client
else:
    fclient = lazy("fleetplane.client")


console = Console()
err = Console(stderr=True)


def _fail(exc: ApiError) -> typer.Exit:
    err.print(f"[red]error:[/red] {exc}")
    return typer.Exit(code=1)


def client() -> Client:
    return fclient.Client(source="cli")


def _age(ts: str) -> str:
    if not ts:
        return ""
    try:
        then = datetime.fromisoformat(ts.replace(" ", "T"))
    except ValueError:
        return ts
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    s = int((datetime.now(UTC) - then).total_seconds())
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{max(s, 0)}s"


def submit(file: Annotated[Path, typer.Option("-f", "--file", help="Task manifest (YAML).")]
           ) -> None:
    """Submit the task(s) in a YAML manifest (apiVersion: fleetplane/v1, kind: AgentTask).

    A file of several documents is sent as one batch (1,000 per request): every manifest gets
    its own answer, and the exit status is 1 if any was refused."""
    try:
        with client() as c:
            docs = fclient.load_manifests(file)
            if len(docs) == 1:
                result = c.submit(docs[0])
                again = " (idempotency key: existing task)" if result.idempotent_replay else ""
                console.print(f"task/{result.name} submitted: {result.task_id} "
                              f"(team {result.team}){again}")
                return
            refused = 0
            for item in c.submit_many(docs):
                meta = docs[item.index].get("metadata")
                name = str(meta.get("name") if isinstance(meta, dict) else "") \
                    or f"#{item.index}"
                if item.ok:
                    again = " (idempotency key: existing task)" if item.status == 200 else ""
                    console.print(f"task/{name} submitted: {item.task_id} "
                                  f"(team {item.team}){again}")
                    continue
                refused += 1
                fields = "; ".join(f"{e.get('field')}: {e.get('reason')}" for e in item.errors)
                err.print(f"[red]refused[/red] document {item.index + 1} ({name}): "
                          f"{item.status} {item.error}" + (f" ({fields})" if fields else ""))
            console.print(f"{len(docs) - refused} of {len(docs)} submitted")
            if refused:
                raise typer.Exit(code=1)
    except fclient.ApiError as exc:
        raise _fail(exc) from exc


def get_tasks(
    state: Annotated[str | None, typer.Option(help="Filter by state.")] = None,
    task_type: Annotated[str | None, typer.Option("--type", help="Filter by task type.")] = None,
    team: Annotated[str | None, typer.Option(help="Filter by team (admin tokens).")] = None,
    limit: Annotated[int, typer.Option(help="Rows to show.")] = 50,
    output: Annotated[str, typer.Option("-o", "--output", help="table or json")] = "table",
) -> None:
    """List tasks and their states (your team's; every team's with an admin token)."""
    try:
        with client() as c:
            tasks = c.list(state=state, type=task_type, team=team, limit=limit)
    except fclient.ApiError as exc:
        raise _fail(exc) from exc
    if output == "json":
        console.print_json(json.dumps([t.raw for t in tasks], default=str))
        return
    table = Table(box=None, header_style="bold")
    for col in ("TASK", "TEAM", "TYPE", "STATE", "MODEL", "TIER", "ATTEMPTS", "COST $", "AGE"):
        table.add_column(col, justify="right" if col in ("ATTEMPTS", "COST $") else "left")
    for t in tasks:
        table.add_row(t.task_id, t.team, t.task_type, t.state, t.model, t.tier, str(t.attempts),
                      f"{t.cost_usd:.6f}", _age(t.submitted_at))
    console.print(table)


def _details(payload: dict[str, Any]) -> str:
    keys = ("attempt", "model", "tier", "reason", "kind", "executor_id", "tool", "outcome",
            "cost_usd", "failure_class", "field", "requested_by", "from_tier", "to_tier")
    parts = []
    for k in keys:
        v = payload.get(k)
        if v not in (None, "", [], {}):
            parts.append(f"{k}={v}")
    return " ".join(parts)[:160]


def describe_task(task_id: Annotated[str, typer.Argument(help="Task id.")]) -> None:
    """A task's state and its timeline (every recorded event, in order)."""
    try:
        with client() as c:
            task = c.get(task_id)
            events = c.events(task_id) if task.state != "submitted" else []
    except fclient.ApiError as exc:
        raise _fail(exc) from exc
    raw = task.raw
    for label, value in (("Task", task.task_id), ("Team", task.team),
                         ("Type", task.task_type), ("State", task.state),
                         ("Reason", task.reason), ("Model", f"{task.model} ({task.tier})"
                                                   if task.model else ""),
                         ("Attempts", str(task.attempts)), ("Cost", f"${task.cost_usd:.6f}"),
                         ("Model calls", str(raw.get("model_calls", ""))),
                         ("Submitted", task.submitted_at), ("Updated", task.updated_at),
                         ("Trace", ", ".join(_trace_ids(task.task_id)))):
        if value:
            console.print(f"[bold]{label + ':':<13}[/bold]{value}")
    table = Table(title="Events", box=None, header_style="bold", title_justify="left")
    for col in ("TIME", "EVENT", "DETAILS"):
        table.add_column(col)
    for e in events:
        table.add_row(str(e.get("occurred_at", "")), str(e.get("event_type", "")),
                      _details(e.get("payload") or {}))
    console.print(table)


def _trace_ids(task_id: str) -> list[str]:
    """The task's trace id(s) as accounting recorded them (docs/operations.md, "Traces")."""
    from fleetplane.core import localstack
    from fleetplane.core.settings import get_settings
    from fleetplane.tracing.records import trace_ids

    return trace_ids(str(localstack.accounting_url(get_settings())), task_id)


def cancel(task_id: Annotated[str, typer.Argument(help="Task id.")],
           reason: Annotated[str | None, typer.Option(help="Why (recorded).")] = None) -> None:
    """Cancel a task (publishes a cancel command; the coordinator stops it)."""
    try:
        with client() as c:
            result = c.cancel(task_id, reason)
    except fclient.ApiError as exc:
        raise _fail(exc) from exc
    console.print(f"task/{task_id} {result.get('state', 'cancelling')}")


def register(app: typer.Typer, get_app: typer.Typer) -> None:
    describe_app = typer.Typer(help="Show one resource in detail.", no_args_is_help=True)
    describe_app.command("task")(describe_task)
    app.add_typer(describe_app, name="describe")
    app.command()(submit)
    app.command()(cancel)
    get_app.command("tasks")(get_tasks)
