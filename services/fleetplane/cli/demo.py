"""`fleetplane demo`: sample work from three teams through the whole pipeline."""

from __future__ import annotations

import time
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
             console: Console, token: str = "") -> int:
    """Submits with `token` (the local stack's admin token, which may submit for every team:
    `fleetplane up` keeps it in <data dir>/admin.token)."""
    ids: dict[str, str] = {}
    prompt_of: dict[str, tuple[str, str]] = {}
    deadline = time.monotonic() + timeout_s
    auth = {"Authorization": f"Bearer {token}", "X-Fleetplane-Source": "cli"}
    with httpx.Client(timeout=30) as http:
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
    finished = sum(1 for r in rows.values() if r.get("state") in TERMINAL_STATES)
    if finished < len(ids):
        console.print(f"[yellow]{len(ids) - finished} tasks still running after {timeout_s}s")
        return 1
    return 0


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
