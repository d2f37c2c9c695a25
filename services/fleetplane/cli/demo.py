"""`fleetplane demo`: sample work from three teams through the whole pipeline."""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from fleetplane.core.states import TERMINAL_STATES

SAMPLES: dict[str, list[tuple[str, str, str | None]]] = {
    "payments": [
        ("summarize", "Summarize the incident report for the failed card settlement batch.", None),
        ("codegen", "Write a function that validates IBAN checksums.", None),
        ("review", "Review the retry logic in the refund worker for double charges.", None),
        ("architecture", "Propose a ledger design that survives region failover.", "frontier"),
    ],
    "search": [
        ("classify", "Classify these 20 queries by intent: navigational or informational.", None),
        ("refactor", "Split the ranking module into feature extraction and scoring.", None),
        ("translate", "Translate the search help page into French.", None),
        ("debug", "Find why the autocomplete index misses accented terms.", None),
    ],
    "platform": [
        ("test", "Add tests for the config loader's environment overrides.", None),
        ("format", "Normalise the YAML style of the deployment manifests.", None),
        ("research", "Compare three approaches to multi-tenant rate limiting.", None),
        ("codegen", "Generate a CLI flag parser for the node drain tool.", "small"),
    ],
}


SAMPLE_REPOSITORY = "payments-core"  # the repository examples/task.yaml names
EDIT_MARKER = "IBAN checksum module"
EDIT_FILE = "src/iban/checksum.py"
EDIT_CONTENT = (
    '"""IBAN checksum (ISO 13616 mod 97)."""\n\n\n'
    "def valid(iban: str) -> bool:\n"
    '    s = iban.replace(" ", "").upper()\n'
    '    digits = "".join(str(int(c, 36)) for c in s[4:] + s[:4])\n'
    "    return len(s) > 4 and int(digits) % 97 == 1\n"
)


def edit_manifest() -> dict[str, Any]:
    """A task that edits the sample repository under a write scope (the loopback fake provider
    is scripted to call write_file for it: see script_edit)."""
    return {"apiVersion": "fleetplane/v1", "kind": "AgentTask",
            "metadata": {"name": "iban-checksum", "team": "payments"},
            "spec": {"taskType": "codegen",
                     "prompt": f"Add the {EDIT_MARKER} as {EDIT_FILE}.",
                     "workspace": {"repository": SAMPLE_REPOSITORY, "ref": "main"},
                     "writeScope": ["src/iban/**"], "tools": ["read_file", "write_file"]}}


def _git(*args: str, cwd: Path | None = None) -> None:
    subprocess.run(["git", "-c", "user.name=fleetplane demo", "-c",
                    "user.email=demo@fleetplane.local", "-c", "commit.gpgsign=false",
                    "-c", "core.hooksPath=/dev/null", *args],
                   cwd=cwd, check=True, capture_output=True, timeout=60)


def sample_repository(data_dir: Path) -> Path:
    """<data dir>/repositories/payments-core.git: a bare git repository with a small Python
    project on branch main (created once)."""
    bare = data_dir / "repositories" / f"{SAMPLE_REPOSITORY}.git"
    if (bare / "HEAD").exists():
        return bare
    bare.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src-repo"
        (src / "src" / "iban").mkdir(parents=True)
        (src / "tests").mkdir()
        (src / "README.md").write_text("# payments-core\n\nSample repository of the "
                                       "fleetplane demo.\n")
        (src / "src" / "iban" / "__init__.py").write_text('"""IBAN helpers."""\n')
        (src / "tests" / "test_iban.py").write_text("def test_placeholder() -> None:\n"
                                                    "    assert True\n")
        _git("init", "-q", "-b", "main", str(src))
        _git("add", "-A", cwd=src)
        _git("commit", "-q", "-m", "payments-core: initial import", cwd=src)
        _git("clone", "-q", "--bare", str(src), str(bare))
    return bare


def ensure_sample_repository(client: Any, data_dir: Path) -> str:
    """Register the sample repository (`client`: a fleetplane.Client with an admin token)
    unless a repository of that name is registered already. Returns its location."""
    for r in client.repositories():
        if r.get("name") == SAMPLE_REPOSITORY:
            return str(r.get("location"))
    location = str(sample_repository(data_dir))
    client.add_repository(SAMPLE_REPOSITORY, location, "fleetplane demo sample (bare)")
    return location


def script_edit(http: httpx.Client, provider_url: str) -> bool:
    """Teach the loopback fake provider the edit task's reply: a write_file call (a real model
    decides that itself). False if there is no fake provider."""
    try:
        script = http.get(f"{provider_url}/_fake/script").json()
    except (httpx.HTTPError, ValueError):
        return False
    replies = [r for r in script.get("replies", []) if r.get("match") != EDIT_MARKER]
    replies.append({"match": EDIT_MARKER, "times": None, "tool_uses": [
        {"name": "write_file", "input": {"path": EDIT_FILE, "content": EDIT_CONTENT}}]})
    resp = http.post(f"{provider_url}/_fake/script", json={**script, "replies": replies})
    return resp.status_code == 200


def manifests(per_team: int) -> list[dict[str, Any]]:
    out = []
    for team, samples in SAMPLES.items():
        for i in range(per_team):
            task_type, prompt, tier = samples[i % len(samples)]
            spec: dict[str, Any] = {"taskType": task_type, "prompt": prompt}
            if tier:
                spec["model"] = {"preference": "tier", "tier": tier}
            out.append({"apiVersion": "fleetplane/v1", "kind": "AgentTask",
                        "metadata": {"name": f"{task_type}-{i}", "team": team}, "spec": spec})
    return out


def repeats(per_team: int) -> list[dict[str, Any]]:
    """A second wave: the same prompts again (the response cache answers these)."""
    return [{**m, "metadata": {**m["metadata"], "name": m["metadata"]["name"] + "-again"}}
            for m in manifests(min(per_team, 2))]


def run_demo(ingest: str, accounting: str, per_team: int, timeout_s: float,
             console: Console, token: str = "", data_dir: Path | None = None,
             provider_url: str | None = None) -> int:
    """Submits with `token` (the local stack's admin token, which may submit for every team:
    `fleetplane up` keeps it in <data dir>/admin.token). With `data_dir`, the sample repository
    is registered and one more task edits it (scripted on the fake provider at
    `provider_url`)."""
    ids: dict[str, str] = {}
    prompt_of: dict[str, tuple[str, str]] = {}
    deadline = time.monotonic() + timeout_s
    auth = {"Authorization": f"Bearer {token}", "X-Fleetplane-Source": "cli"}
    edit_id: str | None = None
    repo_path: str | None = None
    with httpx.Client(timeout=30) as http:
        if data_dir is not None:
            edit_id, repo_path = _submit_edit(http, ingest, token, data_dir, provider_url,
                                              console)
            if edit_id:
                ids[edit_id] = "payments"
                prompt_of[edit_id] = ("payments", edit_manifest()["spec"]["prompt"])
        first: set[str] = set()
        for wave, docs in enumerate((manifests(per_team), repeats(per_team))):
            for m in docs:
                resp = http.post(f"{ingest}/v1/tasks", json=m, headers=auth)
                if resp.status_code in (401, 403):
                    console.print(f"[red]ingest refused the demo's token ({resp.status_code}): "
                                  f"{resp.text[:200]}; is FLEETPLANE_TOKEN an admin token?")
                    return 1
                resp.raise_for_status()
                ids[resp.json()["task_id"]] = m["metadata"]["team"]
                prompt_of[resp.json()["task_id"]] = (m["metadata"]["team"], m["spec"]["prompt"])
            console.print(f"wave {wave + 1}: submitted {len(docs)} tasks from {len(SAMPLES)} "
                          f"teams" + (" (repeated prompts)" if wave else ""))
            if wave == 0:  # the repeats go in once the first answers are known
                first = set(ids)
                rows = _wait(http, accounting, first, deadline, console)
        rows = _wait(http, accounting, set(ids), deadline, console)
        _outcomes(http, accounting, ids, rows, console)
        _cache_summary(ids, first, prompt_of, rows, console)
        if edit_id and repo_path:
            _edit_summary(edit_id, rows.get(edit_id, {}), Path(repo_path), console)
    finished = sum(1 for r in rows.values() if r.get("state") in TERMINAL_STATES)
    if finished < len(ids):
        console.print(f"[yellow]{len(ids) - finished} tasks still running after {timeout_s}s")
        return 1
    return 0


def _submit_edit(http: httpx.Client, ingest: str, token: str, data_dir: Path,
                 provider_url: str | None, console: Console) -> tuple[str | None, str | None]:
    """Register the sample repository and submit the task that edits it."""
    from fleetplane.client import ApiError, Client

    try:
        with Client(ingest, token, source="cli") as client:
            location = ensure_sample_repository(client, data_dir)
            if provider_url:
                script_edit(http, provider_url)
            task_id = client.submit(edit_manifest()).task_id
    except (ApiError, OSError, subprocess.SubprocessError) as exc:
        console.print(f"[yellow]sample repository task skipped: {exc}")
        return None, None
    console.print(f"repository {SAMPLE_REPOSITORY} registered ({location}); submitted 1 task "
                  f"that edits {EDIT_FILE} under write scope src/iban/**")
    return task_id, location


def _edit_summary(task_id: str, row: dict[str, Any], repo: Path, console: Console) -> None:
    """The edit task's commit on its attempt branch of the sample repository."""
    proc = subprocess.run(["git", f"--git-dir={repo}", "log", "--all", "--format=%h %D",
                           "--", EDIT_FILE], capture_output=True, text=True, timeout=30)
    commits = [line for line in proc.stdout.splitlines() if line.strip()]
    state = row.get("state", "pending")
    if commits:
        console.print(f"{SAMPLE_REPOSITORY}: task {task_id[:12]} {state}; {EDIT_FILE} "
                      f"committed ({commits[0].strip()})")
    else:
        console.print(f"{SAMPLE_REPOSITORY}: task {task_id[:12]} {state}; no commit")


def _cache_summary(ids: dict[str, str], first: set[str], prompt_of: dict[str, tuple[str, str]],
                   rows: dict[str, dict[str, Any]], console: Console) -> None:
    """Cache hit rate and the model cost it saved (what the first run of each prompt cost)."""
    cost_of = {prompt_of[t]: float(rows.get(t, {}).get("cost_usd") or 0) for t in first}
    hits = [t for t in ids if rows.get(t, {}).get("model") == "cache"]
    saved = sum(cost_of.get(prompt_of[t], 0.0) for t in hits)
    console.print(f"response cache: {len(hits)} of {len(ids)} tasks answered from the cache "
                  f"({len(hits) / max(1, len(ids)):.0%}), saving ${saved:.6f} of model cost")


def _wait(http: httpx.Client, accounting: str, ids: set[str], deadline: float,
          console: Console) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), console=console) as progress:
        bar = progress.add_task("tasks finished", total=len(ids))
        while time.monotonic() < deadline:
            listed = http.get(f"{accounting}/v1/tasks", params={"limit": 10_000}).json()
            rows = {r["task_id"]: r for r in listed if r["task_id"] in ids}
            done = sum(1 for r in rows.values() if r["state"] in TERMINAL_STATES)
            progress.update(bar, completed=done)
            if done == len(ids):
                break
            time.sleep(0.5)
    return rows


def _outcomes(http: httpx.Client, accounting: str, ids: dict[str, str],
              rows: dict[str, dict[str, Any]], console: Console) -> None:
    table = Table(title="outcomes")
    for col in ("TASK", "TEAM", "TYPE", "MODEL", "STATE", "COST $"):
        table.add_column(col)
    for task_id, team in ids.items():
        r = rows.get(task_id, {})
        table.add_row(task_id[:12], team, r.get("task_type", ""), r.get("model") or "",
                      r.get("state", "pending"), f"{float(r.get('cost_usd') or 0):.6f}")
    console.print(table)
    costs = http.get(f"{accounting}/v1/cost", params={"by": "team"}).json()
    ctable = Table(title="cost per team")
    ctable.add_column("TEAM")
    ctable.add_column("CALLS", justify="right")
    ctable.add_column("COST $", justify="right")
    for c in costs:
        ctable.add_row(c["team"], str(c.get("calls", "")), f"{float(c['cost_usd']):.6f}")
    console.print(ctable)
