"""`fleetplane analytics ...`, `fleetplane whatif` and `fleetplane sql`: the accounting API's
analytics as tables (or JSON with -o json)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from fleetplane.cli import common
from fleetplane.cli.lazy import lazy

if TYPE_CHECKING:
    import httpx

    from fleetplane.core import localstack
    from fleetplane.core import settings as fsettings
else:
    httpx = lazy("httpx")
    localstack = lazy("fleetplane.core.localstack")
    fsettings = lazy("fleetplane.core.settings")

analytics_app = typer.Typer(help="Cost, value, utilization, budgets and alerts from ClickHouse.",
                            no_args_is_help=True)
Output = Annotated[str, typer.Option("-o", "--output", help="table or json")]


def _url() -> str:
    return str(localstack.accounting_url(fsettings.get_settings()))


def _get(path: str, params: dict[str, Any] | None = None) -> Any:
    """GET from the accounting API; errors end the command with the API's message (analytics
    over a large history may take a while: 120 s timeout)."""
    url = f"{_url()}{path}"
    try:
        resp = httpx.get(url, params={k: v for k, v in (params or {}).items() if v is not None},
                         timeout=120)
    except httpx.HTTPError as exc:
        raise common.fail(f"cannot reach {url} ({exc!r}); is the stack up? (fleetplane up)"
                        ) from exc
    if resp.status_code >= 400:
        raise common.fail(f"HTTP {resp.status_code}: {_detail(resp)}")
    return resp.json()


def _detail(resp: httpx.Response) -> str:
    """The API's error in a readable form (FastAPI's 422 names the field at fault)."""
    try:
        detail = resp.json().get("detail", resp.text)
    except ValueError:
        return resp.text[:500]
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(str(x) for x in d.get('loc', [])[1:])}: {d.get('msg')}"
                         for d in detail)
    return str(detail)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.6f}" if abs(value) < 1000 else f"{value:,.2f}"
    return str(value)


def show(rows: list[dict[str, Any]], columns: list[str], title: str, output: str) -> None:
    if output == "json":
        common.console.print_json(json.dumps(rows, default=str))
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(c.upper().replace("_", " "),
                         justify="left" if c in columns[:1] else "right")
    for r in rows:
        table.add_row(*[_fmt(r.get(c)) for c in columns])
    common.console.print(table)


@analytics_app.command("cost-daily")
def cost_daily(by: Annotated[str, typer.Option(help="team, task_type, model or tier")] = "team",
               team: Annotated[str | None, typer.Option()] = None, output: Output = "table"
               ) -> None:
    """Spend per UTC day."""
    rows = _get("/v1/cost/daily", {"by": by, "team": team})
    show(rows, ["day", by, "calls", "cost_usd"], f"cost per day by {by}", output)


@analytics_app.command("value")
def value(by: Annotated[str, typer.Option(help="task_type or team")] = "task_type",
          output: Output = "table") -> None:
    """Cost-to-value: successes per dollar, cost per success (costliest per success first)."""
    rows = _get("/v1/value", {"by": by})
    show(rows, [by, "tasks", "successes", "success_rate", "cost_usd", "cost_per_success_usd",
                "successes_per_usd"], f"cost to value by {by}", output)


@analytics_app.command("cache")
def cache(output: Output = "table") -> None:
    """What the response cache saved (valued at the routed model's observed cost)."""
    body = _get("/v1/cache-savings")
    if output == "json":
        common.console.print_json(json.dumps(body))
        return
    show(body["by_task_type"], ["task_type", "cached_tasks", "saved_usd", "unpriced_tasks"],
         f"cache savings: {body['cached_tasks']} tasks, ${body['saved_usd']:.6f}", output)


@analytics_app.command("utilization")
def utilization(bucket: Annotated[int, typer.Option(help="seconds per row")] = 60,
                output: Output = "table") -> None:
    """Executor slots busy vs idle over time, per executor and for the fleet; busy time split
    into models, tools, other."""
    body = _get("/v1/utilization", {"bucket_s": bucket})
    if output == "json":
        common.console.print_json(json.dumps(body, default=str))
        return
    show(body["series"], ["t", "slots", "busy_share", "model_share_of_busy",
                          "tool_share_of_busy", "other_share_of_busy"], "utilization", output)
    show(body.get("executors", []), ["executor_id", "slots", "busy_share",
                                     "model_share_of_busy", "tool_share_of_busy", "attempts",
                                     "last_report"], "per executor", output)
    t = body["total"]
    common.console.print(f"fleet: {t.get('slots', 0)} slots, busy {t['busy_share']:.0%}, "
                      f"of busy: models {t['model_share_of_busy']:.0%}, "
                      f"tools {t['tool_share_of_busy']:.0%}, "
                      f"other {t['other_share_of_busy']:.0%}")


@analytics_app.command("queue-wait")
def queue_wait(by: Annotated[str | None, typer.Option(help="team or task_type")] = None,
               output: Output = "table") -> None:
    """Seconds from submission to first dispatch: percentiles."""
    rows = _get("/v1/queue-wait", {"by": by})
    show(rows, ["group", "tasks", "p50_s", "p90_s", "p99_s", "max_s"], "queue wait", output)


@analytics_app.command("held")
def held(output: Output = "table") -> None:
    """Held time by reason (TaskHeld.kind)."""
    show(_get("/v1/held"), ["kind", "holds", "tasks", "total_s", "p50_s", "max_s",
                            "still_held"], "held time by kind", output)


@analytics_app.command("budgets")
def budgets(output: Output = "table") -> None:
    """Spend vs budget per team for the current period."""
    show(_get("/v1/budgets"), ["team", "period", "budget_usd", "spent_usd", "remaining_usd",
                               "state"], "budgets", output)


@analytics_app.command("alerts")
def alerts(limit: Annotated[int, typer.Option()] = 20, output: Output = "table") -> None:
    """Recent alerts (anomalies against per-task-type baselines)."""
    show(_get("/v1/alerts", {"limit": limit}), ["occurred_at", "severity", "kind", "team",
                                                "message"], "alerts", output)


def whatif(
    shift: Annotated[str, typer.Option(help="Share of the selected work to move, e.g. 20%.")],
    from_tier: Annotated[str | None, typer.Option("--from", help="Move work of this tier.")
                         ] = None,
    from_model: Annotated[str | None, typer.Option(help="Move work of this model.")] = None,
    task_type: Annotated[str | None, typer.Option(help="Move work of this task type.")] = None,
    to: Annotated[str | None, typer.Option(help="Target tier (its default model).")] = None,
    to_model: Annotated[str | None, typer.Option(help="Target model.")] = None,
    output: Output = "table",
) -> None:
    """What if X% of some work moved to another model: cost change and successes lost."""
    body = _get("/v1/whatif", {"shift": shift, "from": from_tier, "from_model": from_model,
                               "task_type": task_type, "to": to, "to_model": to_model})
    if output == "json":
        common.console.print_json(json.dumps(body))
        return
    show(body["by_task_type"], ["task_type", "tasks", "cost_usd", "repriced_usd",
                                "cost_change_usd", "current_success_rate", "b_success_rate",
                                "b_trials", "expected_successes_lost"],
         body["scenario"], output)
    lo, hi = body["successes_lost_interval"]
    lost = body["expected_successes_lost"]
    common.console.print(
        f"cost change: {body['cost_change_usd']:+.6f} USD ({body['cost_change_pct']:+.1%} of "
        f"the selected ${body['selected_cost_usd']:.6f}) for {body['moved_tasks']:.1f} tasks\n"
        f"expected successes lost: {lost:+.2f} (95% interval {lo:+.2f} .. {hi:+.2f})")
    if body["task_types_without_success_data"]:
        common.console.print(f"[yellow]no observed success of {body['target_model']} on: "
                          f"{', '.join(body['task_types_without_success_data'])} "
                          "(interval only)")


def sql(query: Annotated[str, typer.Argument(help="One read-only SELECT.")],
        output: Output = "table") -> None:
    """Run a read-only SQL query on the accounting tables (time and row limits apply)."""
    url = f"{_url()}/v1/sql"
    try:
        resp = httpx.post(url, json={"query": query}, timeout=60)
    except httpx.HTTPError as exc:
        raise common.fail(f"cannot reach {url} ({exc}); is the stack up?") from exc
    if resp.status_code >= 400:
        raise common.fail(_detail(resp))
    body = resp.json()
    if output == "json":
        common.console.print_json(json.dumps(body, default=str))
        return
    table = Table()
    for c in body["columns"]:
        table.add_column(c)
    for row in body["rows"]:
        table.add_row(*[_fmt(v) for v in row])
    common.console.print(table)
    common.console.print(f"{len(body['rows'])} rows")


def register(app: typer.Typer) -> None:
    app.add_typer(analytics_app, name="analytics")
    app.command("whatif")(whatif)
    app.command("sql")(sql)
