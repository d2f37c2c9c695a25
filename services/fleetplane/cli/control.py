"""Operator control of the coordinator: pause/resume a team, the global kill switch,
approve/reject held tasks (ControlCommand events on fleet.control), and `get held` (the
coordinator's /coordinator/held/ page: each held task with its reason)."""

from __future__ import annotations

import getpass
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fleetplane.cli.lazy import lazy

if TYPE_CHECKING:
    import httpx

    from fleetplane.core import events as ev
    from fleetplane.core import localstack
    from fleetplane.core import settings as fsettings
    from fleetplane.core.settings import Settings
else:
    httpx = lazy("httpx")
    ev = lazy("fleetplane.core.events")
    localstack = lazy("fleetplane.core.localstack")
    fsettings = lazy("fleetplane.core.settings")


console = Console()
err = Console(stderr=True)


def coordinator_url(settings: Settings) -> str:
    return localstack.coordinator_url(settings)


def publish(command: str, *, task_id: str = "", team: str = "", reason: str = "") -> None:
    """Publish one ControlCommand and wait for the broker's acknowledgement."""
    from fleetplane.core.kafka import EventProducer

    settings = localstack.kafka_settings(fsettings.get_settings())
    cmd = ev.ControlCommand(task_id=task_id, team=team, command=command,
                            requested_by=getpass.getuser(), reason=reason)
    producer = EventProducer(settings)
    try:
        producer.send([cmd], timeout_s=15)
    except Exception as exc:
        err.print(f"[red]error:[/red] cannot publish to {settings.kafka_bootstrap}: {exc}")
        raise typer.Exit(code=1) from exc
    finally:
        producer.close()
    target = task_id or (f"team {team}" if team else "the fleet")
    console.print(f"{command} sent for {target} (event {cmd.event_id})")


Reason = Annotated[str, typer.Option(help="Why (recorded on the event).")]


def pause(team: Annotated[str, typer.Option(help="The team to pause.")],
          reason: Reason = "") -> None:
    """Stop dispatching the team's tasks (running ones finish); they are held as `paused`."""
    publish("pause", team=team, reason=reason)


def resume(team: Annotated[str, typer.Option(help="The team to resume.")],
           reason: Reason = "") -> None:
    """Dispatch the team's tasks again."""
    publish("resume", team=team, reason=reason)


def kill_switch(state: Annotated[str, typer.Argument(help="on | off")],
                reason: Reason = "") -> None:
    """on: cancel every running attempt and dispatch nothing (queued work is held as
    `kill_switch`); off: dispatch again."""
    if state not in ("on", "off"):
        err.print("[red]error:[/red] STATE must be `on` or `off`")
        raise typer.Exit(code=2)
    publish("kill_switch" if state == "on" else "kill_switch_off", reason=reason)


def approve(task_id: Annotated[str, typer.Argument(help="Task held for approval.")],
            reason: Reason = "") -> None:
    """Approve a task held for approval: a failed attempt is retried; a conflict is kept."""
    publish("approve", task_id=task_id, reason=reason)


def reject(task_id: Annotated[str, typer.Argument(help="Task held for approval.")],
           reason: Reason = "") -> None:
    """Reject a task held for approval: a failed attempt fails the task; a conflict is rolled
    back."""
    publish("reject", task_id=task_id, reason=reason)


def held(
    kind: Annotated[str | None, typer.Option(help="Only this hold kind.")] = None,
    team: Annotated[str | None, typer.Option(help="Only this team.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """Held tasks with the reason each waits (from the coordinator)."""
    url = f"{coordinator_url(fsettings.get_settings())}/coordinator/held/"
    try:
        resp = httpx.get(url, timeout=10)
        resp.raise_for_status()
    except httpx.HTTPError as exc:
        err.print(f"[red]error:[/red] cannot read {url} ({exc}); is the stack up?")
        raise typer.Exit(code=1) from exc
    rows: list[dict[str, Any]] = [r for r in resp.json()
                                  if (kind is None or r["kind"] == kind)
                                  and (team is None or r["team"] == team)]
    if as_json:
        import json

        console.print_json(json.dumps(rows))
        return
    table = Table(title=f"held tasks ({len(rows)})")
    for col in ("task", "team", "kind", "held by", "paths", "since", "reason"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["task_id"], r["team"], r["kind"], r.get("held_by") or "",
                      ", ".join(r.get("paths") or []), r["since"], r["reason"])
    console.print(table)


def register(app: typer.Typer, get_app: typer.Typer) -> None:
    app.command()(pause)
    app.command()(resume)
    app.command("kill-switch")(kill_switch)
    app.command()(approve)
    app.command()(reject)
    get_app.command("held")(held)
