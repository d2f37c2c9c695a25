"""Orchestration overhead: the pipeline against calling the model directly.

With the fake provider answering every call after a fixed latency (200 ms by default):
1. unloaded: tasks submitted one at a time at a low rate, so none waits for a slot; per task,
   submit->completed divided by the sum of its model calls' latencies (the SDK call's wall
   time measured by the executor, read from audit.model_calls): what fleetplane adds around the
   model.
2. loaded: a burst of N tasks through the pipeline (wall time first submit -> last terminal), and
   the same number of model calls made directly with the anthropic SDK to the same fake provider
   from as many threads as the executor has slots (the pipeline's concurrency for model calls):
   pipeline wall time / direct wall time. Per task in the burst, submit->completed / model time
   includes the wait for one of the slots.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anthropic

from bench import anchor
from bench.measure import percentile
from bench.pipeline import run_batch
from bench.recorder import StageRecorder, ratios
from fleetplane.cli.stack import Stack


def direct_calls(base_url: str, calls: int, concurrency: int,
                 model: str = "claude-haiku-4-5") -> dict[str, Any]:
    """`calls` messages.create calls from `concurrency` threads with the anthropic SDK."""
    client = anthropic.Anthropic(base_url=base_url, api_key="bench", max_retries=0, timeout=60)
    latencies: list[float] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        start = time.perf_counter()
        client.messages.create(model=model, max_tokens=1024,
                               messages=[{"role": "user", "content": f"[direct:{i}] bench task"}])
        with lock:
            latencies.append((time.perf_counter() - start) * 1000)

    one(-1)  # connect and load the SDK's code once, as the executor has by then
    latencies.clear()
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(calls)))
    wall = time.perf_counter() - started
    return {"calls": calls, "concurrency": concurrency, "wall_s": round(wall, 3),
            "call_ms": {"p50": round(percentile(latencies, 50), 1),
                        "p99": round(percentile(latencies, 99), 1)}}


def measure(stack: Stack, recorder: StageRecorder, unloaded_tasks: int, unloaded_rate: float,
            burst_tasks: int, concurrency: int, submit: str = "kafka") -> dict[str, Any]:
    """Both phases on a stack whose provider already answers after the fixed latency."""
    unloaded = run_batch(stack, recorder, unloaded_tasks, submit, unloaded_rate, label="ovu")
    burst = run_batch(stack, recorder, burst_tasks, submit, 0.0, label="ovb")
    burst_ratios = ratios(recorder, burst)
    direct = direct_calls(stack.provider_url, burst_ratios["model_calls"] or burst_tasks,
                          concurrency)
    pipeline_wall = burst["elapsed_s"]
    try:  # the LiteLLM proxy on the same provider, the same number of calls and threads
        proxy: dict[str, Any] = anchor.measure(stack.provider_url, direct["calls"], concurrency,
                                               one_by_one=unloaded_tasks)
    except (OSError, RuntimeError, TimeoutError) as exc:  # not installed, did not start
        proxy = {"error": str(exc)}
    return {
        "unloaded": {"tasks": unloaded_tasks, "rate": unloaded_rate,
                     "finished": unloaded["finished"], "outcomes": unloaded["outcomes"],
                     **ratios(recorder, unloaded),
                     "submit_to_completed_ms": unloaded["latency_ms"]["submit_to_completed"]},
        "burst": {"tasks": burst_tasks, "finished": burst["finished"],
                  "outcomes": burst["outcomes"], "wall_s": pipeline_wall,
                  "tasks_per_s": burst["tasks_per_s"], **burst_ratios,
                  "cpu_share": burst["cpu_share"]},
        "direct": direct,
        "anchor_litellm_proxy": proxy,
        "wall_ratio": round(pipeline_wall / direct["wall_s"], 2) if direct["wall_s"] else None,
    }
