"""An anchor measured side by side: the LiteLLM proxy forwarding the same calls to the same fake
provider (issue 15). fleetplane's overhead figures are ratios against calling the model
directly; this puts a widely used gateway, on this machine, in the same table.

    python -m bench.anchor [--calls 1000] [--concurrency 32] [--latency-ms 200]

Needs the bench extra (`pip install -e ".[bench]"`: litellm[proxy]); `make bench` installs it.
Starts the fake provider (unless --provider-url names one) and `litellm --config` on free local
ports, then makes the same anthropic-format calls (the anthropic SDK, /v1/messages) directly and
through the proxy: one at a time (added latency per call) and from `concurrency` threads
(calls/s). Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx
import yaml

from bench.measure import RESULTS, machine, percentile

MODEL = "claude-haiku-4-5"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} during start-up")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout_s:.0f}s")


def calls(base_url: str, n: int, concurrency: int, label: str,
          api_key: str = "bench") -> dict[str, Any]:
    """`n` messages.create calls from `concurrency` threads; latency per call and calls/s."""
    client = anthropic.Anthropic(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def one(i: int) -> None:
        start = time.perf_counter()
        try:
            client.messages.create(model=MODEL, max_tokens=256, messages=[
                {"role": "user", "content": f"[{label}:{i}] anchor bench task"}])
        except anthropic.APIError:
            with lock:
                errors[0] += 1
            return
        with lock:
            latencies.append((time.perf_counter() - start) * 1000)

    one(-1)  # connect and warm both sides once
    latencies.clear()
    started = time.perf_counter()
    if concurrency <= 1:
        for i in range(n):
            one(i)
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(n)))
    wall = time.perf_counter() - started
    return {"calls": n, "concurrency": concurrency, "errors": errors[0],
            "wall_s": round(wall, 3), "calls_per_s": round(n / wall, 1),
            "call_ms": {"p50": round(percentile(latencies, 50), 1),
                        "p99": round(percentile(latencies, 99), 1)}}


class LiteLLMProxy:
    """`litellm --config` forwarding MODEL to the fake provider's anthropic API."""

    def __init__(self, provider_url: str, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "litellm.yaml"
        # authentication on, as fleetplane's intake has it (one master key, no database)
        self.key = f"sk-bench-{uuid.uuid4().hex}"
        self.config.write_text(yaml.safe_dump({
            "model_list": [{"model_name": MODEL, "litellm_params": {
                "model": f"anthropic/{MODEL}", "api_base": provider_url, "api_key": "bench"}}],
            "litellm_settings": {"drop_params": True, "telemetry": False},
            "general_settings": {"disable_spend_logs": True, "master_key": self.key}}))
        self.log = workdir / "litellm.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("litellm", path=str(Path(sys.executable).parent)) or "litellm"
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [exe, "--config", str(self.config), "--host", "127.0.0.1",
                 "--port", str(self.port), "--num_workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_http(f"{self.url}/health/liveliness", 180, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def measure(provider_url: str, n: int, concurrency: int, one_by_one: int = 100
            ) -> dict[str, Any]:
    """Direct and proxied calls to the same provider: one at a time, then `concurrency`."""
    with tempfile.TemporaryDirectory(prefix="fleetplane-anchor-") as tmp:
        proxy = LiteLLMProxy(provider_url, Path(tmp))
        proxy.start()
        try:
            out: dict[str, Any] = {
                "direct_one_by_one": calls(provider_url, one_by_one, 1, "d1"),
                "proxy_one_by_one": calls(proxy.url, one_by_one, 1, "p1", proxy.key),
                "direct_burst": calls(provider_url, n, concurrency, "db"),
                "proxy_burst": calls(proxy.url, n, concurrency, "pb", proxy.key),
            }
        finally:
            proxy.stop()
    d1, p1 = out["direct_one_by_one"]["call_ms"], out["proxy_one_by_one"]["call_ms"]
    out["proxy_added_ms"] = {"p50": round(p1["p50"] - d1["p50"], 1),
                             "p99": round(p1["p99"] - d1["p99"], 1)}
    out["proxy_over_direct_p50"] = round(p1["p50"] / d1["p50"], 3) if d1["p50"] else None
    db, pb = out["direct_burst"]["wall_s"], out["proxy_burst"]["wall_s"]
    out["proxy_burst_wall_ratio"] = round(pb / db, 2) if db else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--one-by-one", type=int, default=100)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--provider-url", default=None)
    args = parser.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    provider: subprocess.Popen[bytes] | None = None
    url = args.provider_url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        provider = subprocess.Popen(
            [sys.executable, "-m", "fleetplane.fakeprovider.server", "--port", str(port),
             "--latency-ms", str(args.latency_ms)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_http(f"{url}/_fake/script", 60, provider)
    try:
        result = {"machine": machine(), "latency_ms": args.latency_ms,
                  **measure(url, args.calls, args.concurrency, args.one_by_one)}
    finally:
        if provider is not None:
            os.killpg(provider.pid, signal.SIGTERM)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"anchor-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
