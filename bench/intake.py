"""Intake benchmark: HTTP submit latency and throughput of the ingest service with token auth,
idempotency keys and per-team rate limiting on.

    python -m bench.intake [--requests 2000] [--workers 8]

Starts a broker and the ingest service only (a stack of one service) in a temporary directory,
issues a team token, and submits over HTTP from `workers` threads (one connection each):
1. new tasks with a fresh idempotency key each (auth + rate-limit check + broker ack),
2. the same requests again once ingest has marked them (idempotent replays: answered from the
   marks, nothing published),
3. new tasks without a key,
4. new tasks with keys through the batch endpoint (`--batch-size` per request).
The team's token bucket is configured high enough not to bind (it is still checked on every call).
Prints p50/p99/max latency and requests/s per phase; writes bench/results/intake-<time>.json.
Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml
from rich.console import Console
from rich.table import Table

from bench.measure import bench_dir, group_cpu_seconds
from bench.pipeline import RESULTS, machine, percentile
from fleetplane.cli.stack import Stack


def teams_file(data_dir: Path) -> Path:
    path = data_dir / "teams.yaml"
    path.write_text(yaml.safe_dump({"teams": {"bench": {"rate_limit": {
        "per_second": 1e6, "burst": 1_000_000}}}}))
    return path


def manifest(i: int, run: str, key: bool) -> dict[str, Any]:
    m: dict[str, Any] = {"apiVersion": "fleetplane/v1", "kind": "AgentTask",
                         "metadata": {"name": f"bench-{i}"},
                         "spec": {"taskType": "summarize", "prompt": f"[{run}:{i}] intake bench",
                                  "writeScope": ["docs/**"]}}
    if key:
        m["idempotencyKey"] = f"{run}-{i}"
    return m


def phase(url: str, token: str, docs: list[dict[str, Any]], workers: int,
          pid: int | None = None) -> dict[str, Any]:
    local = threading.local()
    latencies: list[float] = []
    codes: dict[int, int] = {}
    lock = threading.Lock()

    def one(doc: dict[str, Any]) -> None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(
                base_url=url, timeout=30, headers={"Authorization": f"Bearer {token}"})
        t0 = time.perf_counter()
        resp = client.post("/v1/tasks", json=doc)
        dt = (time.perf_counter() - t0) * 1000
        with lock:
            latencies.append(dt)
            codes[resp.status_code] = codes.get(resp.status_code, 0) + 1

    cpu0 = group_cpu_seconds(pid) or 0.0  # every worker of ingest's group
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, docs))
    elapsed = time.perf_counter() - start
    cpu_ms = ((group_cpu_seconds(pid) or 0.0) - cpu0) * 1000 / len(docs)
    return {"requests": len(docs), "codes": codes, "elapsed_s": round(elapsed, 3),
            "requests_per_s": round(len(docs) / elapsed, 1),
            "p50_ms": round(percentile(latencies, 50), 2),
            "p99_ms": round(percentile(latencies, 99), 2),
            "max_ms": round(max(latencies), 2),
            "ingest_cpu_ms_per_request": round(cpu_ms, 2)}


def batch_phase(url: str, token: str, docs: list[dict[str, Any]], workers: int, size: int,
                pid: int | None = None) -> dict[str, Any]:
    """The same manifests through POST /v1/tasks:batch, `size` per request."""
    local = threading.local()
    latencies: list[float] = []
    codes: dict[int, int] = {}
    lock = threading.Lock()

    def one(chunk: list[dict[str, Any]]) -> None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(
                base_url=url, timeout=120, headers={"Authorization": f"Bearer {token}"})
        t0 = time.perf_counter()
        resp = client.post("/v1/tasks:batch", json={"tasks": chunk})
        dt = (time.perf_counter() - t0) * 1000
        with lock:
            latencies.append(dt)
            if resp.status_code != 200:
                codes[resp.status_code] = codes.get(resp.status_code, 0) + len(chunk)
                return
            for item in resp.json()["results"]:
                codes[item["status"]] = codes.get(item["status"], 0) + 1

    chunks = [docs[i:i + size] for i in range(0, len(docs), size)]
    cpu0 = group_cpu_seconds(pid) or 0.0  # every worker of ingest's group
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, chunks))
    elapsed = time.perf_counter() - start
    cpu_ms = ((group_cpu_seconds(pid) or 0.0) - cpu0) * 1000 / len(docs)
    return {"requests": len(docs), "codes": codes, "elapsed_s": round(elapsed, 3),
            "requests_per_s": round(len(docs) / elapsed, 1),
            "p50_ms": round(percentile(latencies, 50), 2),
            "p99_ms": round(percentile(latencies, 99), 2),
            "max_ms": round(max(latencies), 2),
            "ingest_cpu_ms_per_request": round(cpu_ms, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=500,
                        help="manifests per POST /v1/tasks:batch in the batch phase")
    parser.add_argument("--ingest-workers", type=int, default=1,
                        help="ingest processes on the port (FLEETPLANE_INGEST_WORKERS)")
    args = parser.parse_args()
    console = Console()
    data_dir = bench_dir("fleetplane-intake-bench-")
    stack = Stack(data_dir=data_dir, services=("ingest",), fake_provider=False,
                  extra_env={"FLEETPLANE_LOG_LEVEL": "WARNING",
                             "FLEETPLANE_INGEST_WORKERS": str(args.ingest_workers),
                             "FLEETPLANE_TEAMS_FILE": str(teams_file(data_dir))})
    console.print(f"starting broker + ingest in {data_dir} ...")
    stack.start(timeout_s=180)
    try:
        token = stack.issue_token("bench")
        stack.wait_token(token)
        run = uuid.uuid4().hex[:6]
        phase(stack.ingest_url, token, [manifest(i, f"warm{run}", False) for i in range(100)],
              args.workers)
        n = args.requests
        pid = stack.children["ingest"].pid
        keyed = [manifest(i, run, True) for i in range(n)]
        results = {"keyed": phase(stack.ingest_url, token, keyed, args.workers, pid)}
        marks = 0
        deadline = time.monotonic() + 120
        while marks < n and time.monotonic() < deadline:  # ingest marks what it accepted
            marks = httpx.get(f"{stack.ingest_url}/healthz").json()["idempotency_marks"]
            time.sleep(0.2)
        results["replay"] = phase(stack.ingest_url, token, keyed, args.workers, pid)
        results["unkeyed"] = phase(stack.ingest_url, token,
                                   [manifest(i, f"u{run}", False) for i in range(n)],
                                   args.workers, pid)
        results["batch"] = batch_phase(stack.ingest_url, token,
                                       [manifest(i, f"b{run}", True) for i in range(n)],
                                       max(1, min(args.workers, 4)), args.batch_size, pid)
        load = os.getloadavg()
    finally:
        stack.stop()
    out: dict[str, Any] = {"machine": machine(), "workers": args.workers, "phases": results,
                           "load_average": [round(x, 1) for x in load],
                           "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    table = Table(title=f"ingest HTTP submit ({args.workers} client threads; "
                        f"{out['machine']['cores']} cores, load average {load[0]:.1f})")
    for col in ("phase", "requests", "HTTP codes", "req/s", "p50 ms", "p99 ms", "max ms",
                "ingest CPU ms/req"):
        table.add_column(col, justify="left" if col in ("phase", "HTTP codes") else "right")
    labels = {"keyed": "new task, idempotency key", "replay": "same key again (replay)",
              "unkeyed": "new task, no key",
              "batch": f"batch endpoint, {args.batch_size} per request (figures per task; "
                       "latency per request)"}
    for name, r in results.items():
        table.add_row(labels[name], str(r["requests"]),
                      ", ".join(f"{k}: {v}" for k, v in sorted(r["codes"].items())),
                      str(r["requests_per_s"]), str(r["p50_ms"]), str(r["p99_ms"]),
                      str(r["max_ms"]), str(r["ingest_cpu_ms_per_request"]))
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"intake-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    console.print(f"written to {path}")


if __name__ == "__main__":
    main()
