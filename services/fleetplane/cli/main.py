"""`fleetplane`: the command line (typer + rich)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from fleetplane.cli import admin as _admin
from fleetplane.cli import analytics as _analytics
from fleetplane.cli import audit as _audit
from fleetplane.cli import control
from fleetplane.cli import tasks as tasks_cli
from fleetplane.cli import tokens as tokens_cli
from fleetplane.cli.common import api_get, console, err, fail
from fleetplane.cli.lazy import lazy
from fleetplane.cli.route import route_app

if TYPE_CHECKING:
    from fleetplane import client as fclient
    from fleetplane.core import localstack
    from fleetplane.core import settings as fsettings
    from fleetplane.core.settings import Settings
    from fleetplane.infra import broker as fbroker
    from fleetplane.infra import ports as fports
else:
    fclient = lazy("fleetplane.client")
    localstack = lazy("fleetplane.core.localstack")
    fsettings = lazy("fleetplane.core.settings")
    fbroker = lazy("fleetplane.infra.broker")
    fports = lazy("fleetplane.infra.ports")

app = typer.Typer(help="fleetplane: the control plane for a fleet of AI agents.",
                  no_args_is_help=True, add_completion=False)
get_app = typer.Typer(help="List resources.", no_args_is_help=True)
app.add_typer(get_app, name="get")
app.add_typer(route_app, name="route")


# -- stack -------------------------------------------------------------------------------------
@app.command()
def up(
    fake_provider: Annotated[bool, typer.Option(
        help="Start the loopback fake model provider and point the SDKs at it.")] = True,
    external_bootstrap: Annotated[str | None, typer.Option(
        help="Use this Kafka bootstrap instead of starting the embedded broker.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for readiness.")] = 180.0,
) -> None:
    """Start the embedded stack: broker, topics, the five services (supervised), logs under
    .fleetplane/."""
    settings = fsettings.get_settings()
    data_dir = settings.resolved_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    state = localstack.read_state(settings)
    if state and localstack.process_alive(state.get("supervisor_pid")) \
            and state.get("state") == "ready":
        console.print(f"fleetplane is already up (supervisor pid {state['supervisor_pid']})")
        return
    broker_port = int(settings.kafka_bootstrap.rsplit(":", 1)[1])
    wanted = {"ingest": settings.ingest_port, "accounting": settings.accounting_port}
    if not external_bootstrap:
        wanted["broker"] = broker_port
    if fake_provider:
        wanted["fake-provider"] = settings.fake_provider_port
    stale = fports.port_holders(wanted)
    if stale:
        raise fail("cannot start: " + "; ".join(h.describe() for h in stale))
    argv = [sys.executable, "-m", "fleetplane.cli.supervisor", "--data-dir", str(data_dir),
            "--broker-port", str(broker_port), "--ingest-port", str(settings.ingest_port),
            "--accounting-port", str(settings.accounting_port),
            "--provider-port", str(settings.fake_provider_port),
            "--metrics-port", str(settings.supervisor_metrics_port),
            "--metrics-ports", json.dumps({
                "router": settings.router_metrics_port,
                "coordinator": settings.coordinator_metrics_port,
                "executor": settings.executor_metrics_port,
                "reconciler": settings.reconciler_metrics_port})]
    if external_bootstrap:
        argv += ["--external-bootstrap", external_bootstrap]
    if not fake_provider:
        argv.append("--no-fake-provider")
    (data_dir / "logs").mkdir(exist_ok=True)
    localstack.state_file(settings).unlink(missing_ok=True)
    with open(data_dir / "logs" / "supervisor.log", "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    with console.status("starting broker, topics and services..."):
        while time.monotonic() < deadline:
            state = localstack.read_state(settings)
            if state and state.get("state") == "ready":
                break
            if state and state.get("state") == "failed":
                raise fail(f"stack failed: {state.get('error')}; logs in {data_dir / 'logs'}")
            if proc.poll() is not None:
                raise fail(f"supervisor exited ({proc.returncode}); see {data_dir / 'logs'}")
            time.sleep(0.3)
        else:
            raise fail(f"not ready within {timeout}s; logs in {data_dir / 'logs'}")
    _print_status(state)
    _print_metrics(state)
    _register_sample(settings, data_dir)


def _register_sample(settings: Settings, data_dir: Path) -> None:
    """The repository examples/task.yaml names (payments-core): a bare sample repository under
    the data directory, registered unless that name is registered already."""
    from fleetplane.cli.demo import SAMPLE_REPOSITORY, ensure_sample_repository
    from fleetplane.client import ApiError, Client

    try:
        with Client(localstack.ingest_url(settings), fclient.resolve_token(settings),
                    source="cli") as client:
            location = ensure_sample_repository(client, data_dir)
    except (ApiError, OSError, subprocess.SubprocessError) as exc:
        err.print(f"[yellow]warning:[/yellow] sample repository not registered: {exc}")
        return
    console.print(f"repository {SAMPLE_REPOSITORY}: {location} (fleetplane repo list)")


def _print_metrics(state: dict[str, Any]) -> None:
    """Every Prometheus endpoint of the stack (docs/operations.md, "Metrics")."""
    urls = dict(state.get("metrics") or {})
    if state.get("supervisor_metrics_url"):
        urls["supervisor"] = state["supervisor_metrics_url"]
    console.print("metrics (Prometheus, docs/operations.md \"Metrics\"):")
    for name, url in urls.items():
        console.print(f"  {name:<14} {url}")


def _print_status(state: dict[str, Any]) -> None:
    table = Table(title="fleetplane (embedded)")
    table.add_column("component")
    table.add_column("pid", justify="right")
    table.add_column("restarts", justify="right")
    table.add_column("log")
    broker = state.get("broker")
    if isinstance(broker, dict):
        table.add_row("broker", str(broker["pid"]), str(broker["restarts"]), broker["log"])
    for name, info in state.get("services", {}).items():
        table.add_row(name, str(info["pid"]), str(info["restarts"]), info["log"])
    console.print(table)
    console.print(f"kafka: {state.get('bootstrap')}   ingest: {state.get('ingest_url')}   "
                  f"accounting: {state.get('accounting_url')}")


@app.command()
def down(timeout: Annotated[float, typer.Option()] = 60.0) -> None:
    """Stop the embedded stack."""
    settings = fsettings.get_settings()
    state = localstack.read_state(settings)
    pid = state.get("supervisor_pid") if state else None
    if not pid or not localstack.process_alive(pid):
        orphans = _recorded_pids(state or {})
        # the supervisor died and left its children running: the services together, then
        # the broker (the services checkpoint on SIGTERM through it)
        broker = _recorded_broker(state or {})
        fbroker.stop_groups([p for p in orphans if p != broker], timeout_s=10)
        if broker in orphans:
            fbroker.stop_broker(broker, timeout_s=10)
        _remove_bells(state or {})
        console.print(f"fleetplane is not running (stopped {len(orphans)} orphaned processes)"
                      if orphans else "fleetplane is not running")
        localstack.state_file(settings).unlink(missing_ok=True)
        return
    with console.status("stopping services and broker..."):
        fbroker.stop_group(int(pid), timeout_s=timeout)
        # whatever the supervisor could not stop (it was killed, or hung on a dead broker):
        # every process the stack recorded, each in its own process group
        left = _recorded_pids(state or {})
        broker = _recorded_broker(state or {})
        fbroker.stop_groups([p for p in left if p != broker], timeout_s=5)
        if broker in left:
            fbroker.stop_broker(broker, timeout_s=10)
    _remove_bells(state or {})
    localstack.state_file(settings).unlink(missing_ok=True)
    console.print("fleetplane stopped")


def _remove_bells(state: dict[str, Any]) -> None:
    """The stopped stack's doorbell folder (core.doorbell), which its supervisor removes when
    it stops the stack itself; left behind when the supervisor was killed."""
    import shutil

    from fleetplane.core.doorbell import bell_dir

    broker = state.get("broker")
    if isinstance(broker, dict) and broker.get("bootstrap"):
        shutil.rmtree(bell_dir(str(broker["bootstrap"])), ignore_errors=True)


def _recorded_broker(state: dict[str, Any]) -> int | None:
    broker = state.get("broker")
    return int(broker["pid"]) if isinstance(broker, dict) and broker.get("pid") else None


def _recorded_pids(state: dict[str, Any]) -> list[int]:
    """The stack's processes from stack.json (services, fake provider, broker) still alive."""
    pids = [int(s["pid"]) for s in (state.get("services") or {}).values()
            if isinstance(s, dict) and s.get("pid")]
    broker = state.get("broker")
    if isinstance(broker, dict) and broker.get("pid"):
        pids.append(int(broker["pid"]))
    return [p for p in pids if localstack.process_alive(p)]


@app.command()
def status() -> None:
    """Show the embedded stack's processes."""
    state = localstack.read_state(fsettings.get_settings())
    if not state or not localstack.process_alive(state.get("supervisor_pid")):
        console.print("fleetplane is not running")
        raise typer.Exit(code=1)
    _print_status(state)
    _print_metrics(state)


# -- tasks and tokens (cli/tasks.py, cli/tokens.py) ------------------------------------------
tasks_cli.register(app, get_app)
app.add_typer(tokens_cli.app, name="token")


@app.command()
def cost(by: Annotated[str, typer.Option(help="team, task_type, model or tier")] = "team") -> None:
    """Spend from ClickHouse, grouped by team, task type, model or tier."""
    rows = api_get(f"{localstack.accounting_url(fsettings.get_settings())}/v1/cost", {"by": by})
    table = Table(title=f"cost by {by}")
    table.add_column(by.upper())
    for col in ("CALLS", "INPUT TOK", "OUTPUT TOK", "COST $"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r[by]), str(r.get("calls", "")), str(r.get("input_tokens", "")),
                      str(r.get("output_tokens", "")), f"{float(r['cost_usd']):.6f}")
    console.print(table)


@app.command()
def demo(
    per_team: Annotated[int, typer.Option(help="Tasks per team.")] = 4,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for outcomes.")] = 120.0,
) -> None:
    """Submit sample tasks from three teams, show progress, print outcomes and cost per team."""
    from fleetplane.cli.demo import run_demo

    settings = fsettings.get_settings()
    state = localstack.read_state(settings) or {}
    code = run_demo(localstack.ingest_url(settings), localstack.accounting_url(settings),
                    per_team, timeout, console,
                    token=fclient.resolve_token(settings), data_dir=settings.resolved_data_dir(),
                    provider_url=state.get("provider_url"))
    raise typer.Exit(code=code)


_analytics.register(app)
_audit.register(app)
control.register(app, get_app)
_admin.register(app)

if __name__ == "__main__":
    app()
