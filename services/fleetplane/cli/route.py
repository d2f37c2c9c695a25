"""`fleetplane route ...`: the router's offline tools."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

route_app = typer.Typer(help="Routing: offline evaluation of the router.", no_args_is_help=True)


@route_app.command("eval")
def eval_(
    file: Annotated[Path, typer.Argument(help="JSONL: one task per line with each candidate "
                                              "model's observed success and cost")],
    seed: Annotated[int, typer.Option(help="Seed of the random baseline.")] = 0,
    exploration_share: Annotated[float, typer.Option(help="Router's exploration share.")] = 0.1,
    json_out: Annotated[bool, typer.Option("--json", help="Figures as JSON.")] = False,
) -> None:
    """Replay FILE through the router and compare cost and success with baselines."""
    from fleetplane.router.evaluate import run

    raise typer.Exit(code=run(file, seed=seed, exploration_share=exploration_share,
                              as_json=json_out))
