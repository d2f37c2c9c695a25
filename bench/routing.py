"""Routing decision latency in process: the router's handler on TaskAccepted events.

    python -m bench.routing [--decisions 20000] [--seed 1] [--embed both|batched|inline]
                            [--vocabulary 20000] [--semantic]

Builds the router as fleetplane-router does (catalog, teams, state, prompt features with the
bundled WordLlama embedding and the online P(success | prompt, model)), warms its statistics
with the outcomes of 2000 routed tasks (so the objective, not the cold-start rule, decides),
fills the response cache with a few answers, then times `Router.handle(TaskAccepted)` (prompt
features, per-prompt predictions, Thompson draws, the objective's linear program, budget check,
cache lookup, output event) for a mix of task types, tools and repeated prompts.

--embed inline: each decision embeds its own prompt (the decision latency *including features*,
the issue's figure). --embed batched: the prompts' embeddings are computed first in batches of
256 (timed and reported on their own, as a feature step ahead of the decision would), and the
decision reads them from the per-task cache. --embed both (default): one run of each.
--semantic: every task type opts into the semantic cache, so its lookups are timed as well.
Prints p50/p99/max, the decision thread's CPU time per decision (p50/p99: the latency on an idle
core, which a loaded shared machine cannot show on the wall clock) and decisions per second;
figures, not assertions.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from itertools import accumulate

from rich.console import Console
from rich.table import Table

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from fleetplane.core import events as ev
from fleetplane.core.logging import configure_logging
from fleetplane.core.settings import Settings
from fleetplane.router.main import build_router

WORDS = ("refactor", "the", "parser", "module", "so", "that", "errors", "carry", "line",
         "numbers", "and", "add", "tests", "for", "empty", "input", "summarize", "this",
         "incident", "report", "translate", "release", "notes", "into", "French", "review",
         "pull", "request", "race", "conditions", "in", "scheduler")


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--decisions", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--embed", choices=("batched", "inline", "both"), default="both")
    p.add_argument("--vocabulary", type=int, default=20_000,
                   help="distinct words the prompts draw from (Zipf-distributed; the word "
                        "cache of the features must not see only a few words)")
    p.add_argument("--semantic", action="store_true",
                   help="opt every task type into the semantic cache (its lookups timed too)")
    args = p.parse_args()
    modes = ("inline", "batched") if args.embed == "both" else (args.embed,)
    for mode in modes:
        run(args, mode)


def run(args: argparse.Namespace, mode: str) -> None:
    rng = random.Random(args.seed)
    configure_logging("router", "WARNING", True)  # time the decision, not the log sink
    settings = Settings(router_shared_state=False)
    if args.semantic:
        settings = settings.model_copy(update={
            "router_semantic_cache_types": ",".join(sorted(build_router(settings).catalog
                                                           .task_types))})
    router = build_router(settings)
    types = sorted(router.catalog.task_types)
    models = sorted(router.catalog.models)
    syllables = ("ka", "ro", "ti", "ment", "al", "ex", "pre", "con", "ing", "de", "un", "str",
                 "qu", "ph", "er", "os", "ly", "tion", "ar", "ze")
    vocab = list(WORDS) + ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
                           + rng.choice(("", "", "s", "ed", ".", ",", "()", "_id"))
                           for _ in range(max(0, args.vocabulary - len(WORDS)))]
    cum = list(accumulate(1.0 / (rank + 1) ** 1.1 for rank in range(len(vocab))))
    # warm the statistics: 2000 pinned tasks with outcomes (their prompts from the same
    # words, so the features' word cache is as warm as a running router's)
    for i in range(2000):
        model = rng.choice(models)
        words = " ".join(rng.choices(vocab, cum_weights=cum, k=rng.randint(10, 700)))
        spec = ev.TaskSpec(name="w", task_type=rng.choice(types), prompt=f"warm {i} {words}",
                           model_preference="pinned", model=model)
        router.handle(ev.TaskAccepted(task_id=f"w{i}", team="payments", spec=spec))
        if rng.random() < 0.8:
            router.handle(ev.TaskCompleted(task_id=f"w{i}", team="payments", attempt=1,
                                           model=model, output="ok", cost_usd=0.002,
                                           duration_ms=1))
        else:
            router.handle(ev.TaskFailed(task_id=f"w{i}", team="payments", attempt=1,
                                        failure_class="model_error", reason="x", cost_usd=0.002))
    repeated = [f"Summarize report {k}" for k in range(20)]
    events = []
    for i in range(args.decisions):
        tools = ["read_file", "grep"] if rng.random() < 0.3 else []
        prompt = rng.choice(repeated) if rng.random() < 0.2 else f"task {i} " + " ".join(
            rng.choices(vocab, cum_weights=cum, k=rng.randint(10, 700)))
        spec = ev.TaskSpec(name="b", task_type=rng.choice(types), prompt=prompt,
                           allowed_tools=tools)
        events.append(ev.TaskAccepted(task_id=f"b{i}", team="payments", spec=spec))
    embed_note = "inline (in the decision)"
    features = router.state.features
    if mode == "batched" and features is not None:
        t0 = time.perf_counter()
        items = [(e.task_id, e.spec.prompt) for e in events]
        for i in range(0, len(items), 256):
            features.vectors(items[i:i + 256])
        per = (time.perf_counter() - t0) * 1e6 / len(items)
        embed_note = f"batched ahead: {per:.0f} µs per prompt ({features.embedder.name})"
    elif features is None:
        embed_note = "no prompt features"
    lat: list[float] = []
    on_core: list[float] = []  # this thread's CPU time per decision: its wall time on a core
    outcomes: dict[str, int] = {}
    cpu0 = time.process_time()
    for e in events:
        c0 = time.thread_time_ns()
        t0 = time.perf_counter()
        (out,) = router.handle(e)
        lat.append((time.perf_counter() - t0) * 1e6)
        on_core.append((time.thread_time_ns() - c0) / 1e3)
        kind = "cache hit" if isinstance(out, ev.TaskCompleted) else type(out).__name__
        outcomes[kind] = outcomes.get(kind, 0) + 1
        if isinstance(out, ev.TaskRouted) and out.spec.prompt in repeated:
            router.handle(ev.TaskCompleted(task_id=out.task_id, team="payments", attempt=1,
                                           model=out.model, output="cached answer",
                                           cost_usd=0.001, duration_ms=1))
    cpu_us = (time.process_time() - cpu0) * 1e6 / len(events)
    table = Table(title=f"routing decision latency in process, embedding {mode} "
                        f"({args.decisions} decisions, "
                        f"{platform.machine()}, {os.cpu_count()} cores, "
                        f"python {platform.python_version()})")
    for col in ("p50 µs", "p99 µs", "max µs", "mean µs", "CPU µs/decision", "CPU p50 µs",
                "CPU p99 µs", "decisions/s", "outcomes"):
        table.add_column(col, justify="right")
    table.add_row(f"{pct(lat, 0.5):.0f}", f"{pct(lat, 0.99):.0f}", f"{max(lat):.0f}",
                  f"{statistics.fmean(lat):.0f}", f"{cpu_us:.0f}", f"{pct(on_core, 0.5):.0f}",
                  f"{pct(on_core, 0.99):.0f}", f"{1e6 / statistics.fmean(lat):.0f}",
                  ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    Console(width=160).print(table)
    print(f"prompt embedding: {embed_note}")
    print("CPU p50/p99: the decision thread's CPU time per decision (time.thread_time), i.e. "
          "its latency on a core it does not wait for; wall p99 under load includes the wait")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (the machine is shared)")


if __name__ == "__main__":
    main()
