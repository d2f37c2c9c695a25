"""The README's path: `fleetplane up`, `submit`, `demo`, `get tasks`, `cost`, `down`, run as a
user runs them (the real console script in a subprocess, its own broker and data directory)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from fleetplane.core.doorbell import bell_dir
from fleetplane.infra.broker import free_port, port_open

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    data = tmp_path_factory.mktemp("cli") / ".fleetplane"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETPLANE_")}
    env.update({
        "FLEETPLANE_DATA_DIR": str(data),
        "FLEETPLANE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "FLEETPLANE_INGEST_PORT": str(free_port()),
        "FLEETPLANE_ACCOUNTING_PORT": str(free_port()),
        "FLEETPLANE_FAKE_PROVIDER_PORT": str(free_port()),
        "COLUMNS": "200",
    })
    yield env
    subprocess.run([fleetplane(), "down"], env=env, capture_output=True, timeout=120)


def fleetplane() -> str:
    """The console script installed beside this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / "fleetplane"
    exe = str(beside) if beside.exists() else shutil.which("fleetplane")
    assert exe, "the fleetplane console script is installed"
    return exe


def run(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([fleetplane(), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL)


@pytest.mark.timeout(720)  # one stack for the whole README path, repositories and admin CLI
def test_up_submit_demo_get_cost_down(cli_env: dict[str, str]) -> None:
    up = run(cli_env, "up")
    assert up.returncode == 0, up.stdout + up.stderr
    for name in ("ingest", "router", "coordinator", "executor", "accounting"):
        assert name in up.stdout
    assert run(cli_env, "up").stdout.strip().startswith("fleetplane is already up")

    # `up` registers the repository the README's example names (issue 16)
    assert "repository payments-core" in up.stdout, up.stdout + up.stderr
    sub = run(cli_env, "submit", "-f", str(ROOT / "examples" / "task.yaml"))
    assert sub.returncode == 0, sub.stderr
    task_id = re.search(r"submitted: ([0-9a-f]{32})", sub.stdout)
    assert task_id, sub.stdout

    # The commands below are independent of each other: they run as several users would run
    # them, side by side (each CLI start costs seconds of imports on a loaded machine; one after
    # the other they made this test take 3-4 minutes). The admin group pauses a team and turns
    # the kill switch on, which would hold the demo's tasks: it runs after the demo.
    extra_repository(cli_env)
    together(lambda: demo_and_cost(cli_env), lambda: repositories(cli_env),
             lambda: team_token_is_refused_admin(cli_env), lambda: submit_refusals(cli_env))
    together(lambda: admin_commands(cli_env), lambda: listed_task(cli_env, task_id.group(1)))

    # the broker dies hard (SIGKILL, as the OOM killer would): the supervisor restarts it, the
    # services reconnect, and work flows again without anyone stepping in
    state_file = Path(cli_env["FLEETPLANE_DATA_DIR"]) / "stack.json"
    state = json.loads(state_file.read_text())
    os.killpg(state["broker"]["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and json.loads(state_file.read_text()).get(
            "broker", {}).get("restarts", 0) < 1:
        time.sleep(0.5)
    status = run(cli_env, "status")
    assert re.search(r"broker\W+\d+\W+1\W", status.stdout), status.stdout
    # the supervisor restarts the services after a broker crash (Stack.supervise_once): ingest
    # answers again once it is back (the CLI's 3 retries over 2.8 s lost that race at load 24)
    ingest = json.loads(state_file.read_text())["ingest_url"]
    deadline = time.monotonic() + 90
    while not answers(f"{ingest}/healthz"):
        assert time.monotonic() < deadline, "ingest did not come back after the broker restart"
        time.sleep(0.5)
    after = run(cli_env, "submit", "-f", str(ROOT / "examples" / "task.yaml"), timeout=120)
    assert after.returncode == 0, after.stdout + after.stderr

    # the supervisor itself dies: `down` still stops every process the stack recorded
    state = json.loads(state_file.read_text())
    os.kill(state["supervisor_pid"], signal.SIGKILL)
    recorded = [s["pid"] for s in state["services"].values()] + [state["broker"]["pid"]]
    assert bell_dir(cli_env["FLEETPLANE_KAFKA_BOOTSTRAP"]).is_dir()  # the services' doorbells
    down = run(cli_env, "down")
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout
    assert not [pid for pid in recorded if alive(pid)], down.stdout
    broker_port = int(cli_env["FLEETPLANE_KAFKA_BOOTSTRAP"].rsplit(":", 1)[1])
    assert not port_open("127.0.0.1", broker_port)
    assert not port_open("127.0.0.1", int(cli_env["FLEETPLANE_INGEST_PORT"]))
    assert not port_open("127.0.0.1", int(cli_env["FLEETPLANE_FAKE_PROVIDER_PORT"]))
    assert run(cli_env, "status").returncode == 1
    # ... and their doorbell folder (core.doorbell), which the killed supervisor left
    assert state["broker"]["bootstrap"] == cli_env["FLEETPLANE_KAFKA_BOOTSTRAP"]
    assert not bell_dir(cli_env["FLEETPLANE_KAFKA_BOOTSTRAP"]).exists()


def answers(url: str) -> bool:
    """Ingest's /healthz answers, with the tokens loaded (the admin token among them)."""
    try:
        resp = httpx.get(url, timeout=2.0)
        return resp.status_code == 200 and resp.json().get("tokens", 0) > 0
    except (httpx.HTTPError, ValueError):
        return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not running
        return f.read().split(") ", 1)[1][0] != "Z"


def together(*groups: Callable[[], None]) -> None:
    """Run each group of commands in a thread of its own; the first failure is raised."""
    with ThreadPoolExecutor(len(groups)) as pool:
        for future in [pool.submit(g) for g in groups]:
            future.result()


def demo_and_cost(env: dict[str, str]) -> None:
    demo = run(env, "demo", "--per-team", "2")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "submitted 6 tasks from 3 teams" in demo.stdout
    for team in ("payments", "search", "platform"):
        assert re.search(rf"{team}\s+.*\b(\d+)\s+.*0\.\d+", demo.stdout), demo.stdout
    assert demo.stdout.count("completed") >= 6
    # the demo's task on the registered sample repository committed its edit
    assert re.search(r"payments-core: task \w+ completed; src/iban/checksum.py committed",
                     demo.stdout), demo.stdout
    cost = run(env, "cost", "--by", "team")
    assert cost.returncode == 0 and "payments" in cost.stdout, cost.stdout + cost.stderr


def listed_task(env: dict[str, str], task_id: str) -> None:
    tasks = run(env, "get", "tasks", "-o", "json")
    assert tasks.returncode == 0, tasks.stderr
    assert task_id in tasks.stdout


def submit_refusals(env: dict[str, str]) -> None:
    bad = ROOT / "examples" / "task.yaml"
    broken = Path(env["FLEETPLANE_DATA_DIR"]).parent / "bad.yaml"
    broken.write_text(bad.read_text().replace("taskType: codegen", "taskType: codegen\n  oops: 1"))
    rejected = run(env, "submit", "-f", str(broken))
    assert rejected.returncode == 1 and "spec.oops" in rejected.stderr
    # several documents go as one batch: each answered, the valid ones submitted, exit 1
    several = broken.parent / "several.yaml"
    several.write_text("---\n".join([bad.read_text(), broken.read_text(), bad.read_text()]))
    batch = run(env, "submit", "-f", str(several))
    assert batch.returncode == 1, batch.stdout + batch.stderr
    assert len(re.findall(r"submitted: [0-9a-f]{32}", batch.stdout)) == 2, batch.stdout
    assert "2 of 3 submitted" in batch.stdout
    assert "document 2" in batch.stderr and "spec.oops" in batch.stderr


def repositories(env: dict[str, str]) -> None:
    """`fleetplane repo add|list|remove` on the running stack, with the local admin token."""
    extra = extra_repository(env)
    added = run(env, "repo", "add", "extra-repo", str(extra), "--description", "e2e")
    assert added.returncode == 0 and "repository/extra-repo registered" in added.stdout, \
        added.stdout + added.stderr
    listed = run(env, "repo", "list", "-o", "json")
    assert listed.returncode == 0 and '"extra-repo"' in listed.stdout
    assert '"payments-core"' in listed.stdout and str(extra) in listed.stdout
    task = Path(env["FLEETPLANE_DATA_DIR"]).parent / "on-extra.yaml"
    task.write_text((ROOT / "examples" / "task.yaml").read_text()
                    .replace("repository: payments-core", "repository: extra-repo"))
    assert run(env, "submit", "-f", str(task)).returncode == 0
    removed = run(env, "repo", "remove", "extra-repo")
    assert removed.returncode == 0 and "removed" in removed.stdout, removed.stderr
    assert '"extra-repo"' not in run(env, "repo", "list", "-o", "json").stdout
    again = run(env, "repo", "remove", "extra-repo")
    assert again.returncode == 1 and "404" in again.stderr, again.stderr
    refused = run(env, "submit", "-f", str(task))
    assert refused.returncode == 1 and "spec.workspace.repository" in refused.stderr, \
        refused.stderr


def extra_repository(env: dict[str, str]) -> Path:
    """A git repository beside the data directory (created once, before the threads)."""
    extra = Path(env["FLEETPLANE_DATA_DIR"]).parent / "extra-repo"
    if not extra.exists():
        subprocess.run(["git", "init", "-q", str(extra)], check=True)
    return extra


def admin_commands(env: dict[str, str]) -> None:
    """`fleetplane admin ...` with the local admin token."""
    for args, expect in ((("admin", "pause", "payments", "--reason", "e2e"),
                          "pause sent for team payments"),
                         (("admin", "resume", "payments"), "resume sent for team payments"),
                         (("admin", "kill-switch", "on", "--reason", "e2e"), "kill switch on"),
                         (("admin", "kill-switch", "off"), "kill switch off")):
        out = run(env, *args)
        assert out.returncode == 0 and expect in out.stdout, (args, out.stdout, out.stderr)
    tokens = run(env, "admin", "tokens", "-o", "json")
    assert tokens.returncode == 0 and '"operators"' in tokens.stdout, tokens.stderr
    assert "sha256" not in tokens.stdout
    assert run(env, "admin", "kill-switch", "maybe").returncode == 2


def team_token_is_refused_admin(env: dict[str, str]) -> None:
    """A team token gets 403 from the admin commands, as from the API."""
    created = run(env, "token", "create", "--team", "payments", "-q")
    assert created.returncode == 0, created.stderr
    team_env = {**env, "FLEETPLANE_TOKEN": created.stdout.strip()}
    extra = str(extra_repository(env))
    for args in (("admin", "kill-switch", "on"), ("repo", "add", "mine", extra),
                 ("repo", "remove", "payments-core")):
        out = run(team_env, *args)
        assert out.returncode == 1 and "403" in out.stderr and "admin token" in out.stderr, \
            (args, out.stdout, out.stderr)
    assert run(team_env, "repo", "list").returncode == 0


def test_up_names_a_stale_process_holding_its_port(tmp_path: Path) -> None:
    """The orphan of issue 19: a fake provider left behind by a crashed stack holds its port;
    `up` says which process it is and how to stop it, and starts nothing."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETPLANE_")}
    env.update({"FLEETPLANE_DATA_DIR": str(tmp_path / ".fleetplane"),
                "FLEETPLANE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
                "FLEETPLANE_INGEST_PORT": str(free_port()),
                "FLEETPLANE_ACCOUNTING_PORT": str(free_port()),
                "FLEETPLANE_FAKE_PROVIDER_PORT": str(port), "COLUMNS": "300"})
    orphan = subprocess.Popen([sys.executable, "-m", "fleetplane.fakeprovider.server",
                               "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not port_open("127.0.0.1", port):
            assert time.monotonic() < deadline and orphan.poll() is None, "orphan started"
            time.sleep(0.2)
        up = run(env, "up", "--timeout", "30")
        out = " ".join((up.stdout + up.stderr).split())
        assert up.returncode != 0, out
        assert f"port {port} (fake-provider) is held by pid {orphan.pid}" in out, out
        assert "stale fleetplane process" in out, out
        assert not (tmp_path / ".fleetplane" / "broker").exists(), "nothing was started"
    finally:
        os.killpg(orphan.pid, signal.SIGKILL)
        orphan.wait(10)
