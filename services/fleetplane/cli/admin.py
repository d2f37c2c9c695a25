"""`fleetplane repo add | list | remove` and `fleetplane admin pause | resume | kill-switch |
tokens`: ingest's admin API through the SDK, with the caller's token (FLEETPLANE_TOKEN, the
config file, or the local stack's admin token). The API's errors are the CLI's: a team token
gets "403 ... an admin token is required" and exit status 1."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fleetplane.cli.lazy import lazy

if TYPE_CHECKING:
    from fleetplane import client as fclient
    from fleetplane.client import ApiError
else:
    fclient = lazy("fleetplane.client")


console = Console()
err = Console(stderr=True)

repo_app = typer.Typer(help="Repositories tasks may name (spec.workspace.repository).",
                       no_args_is_help=True)
admin_app = typer.Typer(help="Fleet administration through the ingest API (admin token).",
                        no_args_is_help=True)

_URL = re.compile(r"^[a-z][a-z0-9+.-]*://|^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:")
Reason = Annotated[str | None, typer.Option(help="Why (recorded on the command).")]
Output = Annotated[str, typer.Option("-o", "--output", help="table or json")]


def _fail(exc: ApiError) -> typer.Exit:
    status = f"{exc.status} " if exc.status else ""
    err.print(f"[red]error:[/red] {status}{exc}")
    return typer.Exit(code=1)


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        with fclient.Client(source="cli") as c:
            return fn(c, *args, **kwargs)
    except fclient.ApiError as exc:
        raise _fail(exc) from exc


def location_of(path_or_url: str) -> str:
    """A URL as given; a path made absolute (relative to the current directory)."""
    if _URL.match(path_or_url):
        return path_or_url
    return str(Path(path_or_url).expanduser().resolve())


# -- repositories --------------------------------------------------------------------------------
@repo_app.command("add")
def repo_add(
    name: Annotated[str, typer.Argument(help="The name tasks use (spec.workspace.repository).")],
    location: Annotated[str, typer.Argument(
        metavar="PATH|URL", help="A git repository on the executors' machines, or a git URL.")],
    description: Annotated[str, typer.Option(help="What the repository is.")] = "",
) -> None:
    """Register a repository (or point a registered name elsewhere)."""
    loc = location_of(location)
    if not _URL.match(loc) and not Path(loc).exists():
        err.print(f"[yellow]warning:[/yellow] {loc} does not exist here; executors must have it")
    rec = _call(fclient.Client.add_repository, name, loc, description)
    console.print(f"repository/{rec['name']} registered: {rec['location']} ({rec['kind']})")


@repo_app.command("list")
def repo_list(output: Output = "table") -> None:
    """Registered repositories (and those configured in infra/repositories.yaml)."""
    rows = _call(fclient.Client.repositories)
    if output == "json":
        console.print_json(json.dumps(rows))
        return
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "KIND", "LOCATION", "CREATED", "BY", "DESCRIPTION"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["name"]), "static" if r.get("static") else str(r.get("kind", "")),
                      str(r.get("location", "(admins only)")), str(r.get("created_at", "")),
                      str(r.get("created_by", "")), str(r.get("description", "")))
    console.print(table)


@repo_app.command("remove")
def repo_remove(name: Annotated[str, typer.Argument(help="A registered repository.")]) -> None:
    """Unregister a repository (tasks naming it are refused from now on)."""
    _call(fclient.Client.remove_repository, name)
    console.print(f"repository/{name} removed")


# -- admin ----------------------------------------------------------------------------------------
@admin_app.command("pause")
def admin_pause(team: Annotated[str, typer.Argument(help="The team to pause.")],
                reason: Reason = None) -> None:
    """Hold the team's waiting work (`paused`); running work finishes."""
    result = _call(fclient.Client.pause_team, team, reason)
    console.print(f"pause sent for team {team} (event {result.get('event_id')})")


@admin_app.command("resume")
def admin_resume(team: Annotated[str, typer.Argument(help="The team to resume.")],
                 reason: Reason = None) -> None:
    """Dispatch the team's work again."""
    result = _call(fclient.Client.resume_team, team, reason)
    console.print(f"resume sent for team {team} (event {result.get('event_id')})")


@admin_app.command("kill-switch")
def admin_kill_switch(state: Annotated[str, typer.Argument(help="on | off")],
                      reason: Reason = None) -> None:
    """on: cancel every running attempt and dispatch nothing; off: dispatch again."""
    if state not in ("on", "off"):
        err.print("[red]error:[/red] STATE must be `on` or `off`")
        raise typer.Exit(code=2)
    result = _call(fclient.Client.kill_switch, state == "on", reason)
    console.print(f"kill switch {state} sent (event {result.get('event_id')})")


@admin_app.command("tokens")
def admin_tokens(team: Annotated[str | None, typer.Option(help="Only this team's.")] = None,
                 output: Output = "table") -> None:
    """Token metadata (id, team, role, created, revoked); never tokens or hashes."""
    rows = _call(fclient.Client.tokens, team)
    if output == "json":
        console.print_json(json.dumps(rows))
        return
    table = Table(box=None, header_style="bold")
    for col in ("ID", "TEAM", "ROLE", "CREATED", "BY", "REVOKED", "DESCRIPTION"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["token_id"]), str(r["team"]), str(r.get("role", "")),
                      str(r.get("created_at", "")), str(r.get("created_by", "")),
                      str(r.get("revoked_at") or ""), str(r.get("description", "")))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(repo_app, name="repo")
    app.add_typer(admin_app, name="admin")
