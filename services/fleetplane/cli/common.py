"""What the CLI's command modules share: the consoles, how a command fails, and reading the
accounting API. (The local stack itself is found by fleetplane.core.localstack.)"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from fleetplane.cli.lazy import lazy

if TYPE_CHECKING:
    import httpx
else:
    httpx = lazy("httpx")

console = Console()
err = Console(stderr=True)


def fail(message: str) -> typer.Exit:
    """Print the error and return the exit to raise (status 1)."""
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=1)


def api_get(url: str, params: dict[str, Any] | None = None) -> Any:
    try:
        resp = httpx.get(url, params=params, timeout=10)
    except httpx.HTTPError as exc:
        raise fail(f"cannot reach {url} ({exc}); is the stack up? (fleetplane up)") from exc
    if resp.status_code >= 400:
        raise fail(f"{url}: HTTP {resp.status_code}: {resp.text[:500]}")
    return resp.json()
