"""`fleetplane token create | list | revoke`: team API tokens.

These commands talk to Kafka directly (fleet.tokens): whoever runs them needs access to the
brokers, i.e. is an operator of the deployment. A token is printed once; only its hash is kept."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from fleetplane.cli.lazy import lazy

if TYPE_CHECKING:
    from fleetplane.core import settings as fsettings
    from fleetplane.ingest import manifest as fmanifest
    from fleetplane.ingest import tokens as ftokens
else:
    fsettings = lazy("fleetplane.core.settings")
    fmanifest = lazy("fleetplane.ingest.manifest")
    ftokens = lazy("fleetplane.ingest.tokens")


app = typer.Typer(help="Team API tokens (stored as hashes on fleet.tokens).",
                  no_args_is_help=True)
console = Console()
err = Console(stderr=True)


@app.command("create")
def create(
    team: Annotated[str, typer.Option(help="The team the token acts for.")],
    admin: Annotated[bool, typer.Option("--admin", help="Admin role: sees every team.")] = False,
    description: Annotated[str, typer.Option(help="What the token is for.")] = "",
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Print only the token.")] = False,
) -> None:
    """Issue a token for a team. It is shown once: store it (e.g. FLEETPLANE_TOKEN)."""
    if not fmanifest.NAME_RE.match(team):
        err.print(f"[red]error:[/red] team must match {fmanifest.NAME_RE.pattern}")
        raise typer.Exit(code=1)
    token, record = ftokens.issue(fsettings.get_settings(), team,
                                  "admin" if admin else "team", description)
    if quiet:
        print(token)
        return
    console.print(f"token {record['token_id']} for team {team} (role {record['role']}):")
    print(token)
    console.print("[yellow]shown once; only its SHA-256 is stored[/yellow]")


@app.command("list")
def list_(
    team: Annotated[str | None, typer.Option(help="Only this team's tokens.")] = None,
) -> None:
    """Tokens (ids, teams, roles; never the tokens themselves)."""
    table = Table(box=None, header_style="bold")
    for col in ("ID", "TEAM", "ROLE", "CREATED", "BY", "REVOKED", "DESCRIPTION"):
        table.add_column(col)
    for r in ftokens.list_tokens(fsettings.get_settings()):
        if team and r.get("team") != team:
            continue
        table.add_row(str(r["token_id"]), str(r["team"]), str(r.get("role", "team")),
                      str(r.get("created_at", "")), str(r.get("created_by", "")),
                      str(r.get("revoked_at") or ""), str(r.get("description", "")))
    console.print(table)


@app.command("revoke")
def revoke_(token_id: Annotated[str, typer.Argument(help="Token id (from `token list`).")]
            ) -> None:
    """Revoke a token: every ingest replica refuses it within about a second."""
    rec = ftokens.revoke(fsettings.get_settings(), token_id)
    if rec is None:
        err.print(f"[red]error:[/red] no token {token_id}")
        raise typer.Exit(code=1)
    console.print(f"token {token_id} (team {rec['team']}) revoked")
