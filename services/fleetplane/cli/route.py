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
    exploration_share: Annotated[float, typer.Option(
        help="Share of decisions judged by Thompson samples.")] = 1.0,
    json_out: Annotated[bool, typer.Option("--json", help="Figures as JSON.")] = False,
    q: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Quality share: success >= q x the best model's.")] = 0.95,
    curve: Annotated[bool, typer.Option(help="Print the cost-success curve over q.")] = True,
    prompt_signal: Annotated[bool, typer.Option(
        help="Learn P(success | prompt, model) from the file's prompts.")] = True,
    embedding: Annotated[str, typer.Option(help="wordllama or hashing.")] = "wordllama",
    semantic: Annotated[bool, typer.Option(
        help="Measure the semantic cache's false-hit rate on near-miss pairs.")] = True,
    semantic_threshold: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.97,
    semantic_max_edits: Annotated[int, typer.Option(min=0)] = 0,
    quality_scope: Annotated[str, typer.Option(
        help="type: q x best per task type; pooled: over all task types; price: over all task "
        "types, held by one price of a success.")] = "price",
) -> None:
    """Replay FILE through the router and compare cost and success with baselines."""
    from fleetplane.router.evaluate import run

    raise typer.Exit(code=run(file, seed=seed, exploration_share=exploration_share,
                              as_json=json_out, q=q, with_curve=curve,
                              prompt_signal=prompt_signal, embedding=embedding,
                              with_semantic=semantic, semantic_threshold=semantic_threshold,
                              semantic_max_edits=semantic_max_edits,
                              quality_scope=quality_scope))
