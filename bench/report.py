"""The one table `make bench` prints, built from the result it writes as JSON."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from bench.measure import RESULTS

PROCESS_ORDER = ("ingest", "router", "coordinator", "coordinator-b", "executor", "accounting",
                 "fake-provider", "broker")


def write_result(name: str, result: dict[str, Any]) -> Path:
    """A bench's result as JSON, bench/results/<name>-<local time>.json; returns the path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


def _ms(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    return f"{d['p50']:,.0f} / {d['p99']:,.0f} ms"


def _x(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    return f"{d['p50']:.2f}x / {d['p99']:.2f}x"


def _busiest(r: dict[str, Any], k: int = 3) -> str:
    top = sorted(r["cpu_share"].items(), key=lambda kv: -kv[1])[:k]
    ours = sum(r["cpu_share"].values())
    return (", ".join(f"{name} {share:.2f}" for name, share in top)
            + f"; stack {ours:.2f}, machine {r.get('machine_busy', float('nan')):.0%} busy")


def _stages(r: dict[str, Any]) -> str:
    return " → ".join(f"{stage} {st['p50_ms']:,.0f}" for stage, st in r["stages"].items())


def _finished(r: dict[str, Any]) -> str:
    text = f"{r['finished']:,} / {r['accepted']:,}"
    kinds = {k: v for k, v in r["outcomes"].items() if k != "TaskCompleted"}
    if kinds:
        text += " (" + ", ".join(f"{k} {v}" for k, v in kinds.items()) + ")"
    if r.get("pending_before"):
        text += f"; {r['pending_before']:,} earlier tasks still queued at start"
    if r.get("rejected"):
        text += "; refused " + ", ".join(f"{k}: {v}" for k, v in r["rejected"].items())
    return text


def render(result: dict[str, Any]) -> Table:
    m = result["machine"]
    table = Table(title=f"fleetplane benchmarks — {m['cores']} cores ({m['cpu_model']}), "
                        f"{m['memory_gib']} GiB, Python {m['python']}, load "
                        f"{m['load_avg'][0]:.1f} at start",
                  caption=f"lifted for the bench: {'; '.join(result['lifted'])} "
                          f"(see JSON 'lifted'); took {result.get('duration_s', 0):,.0f} s",
                  show_lines=False)
    table.add_column("scenario", style="bold")
    table.add_column("figure")
    table.add_column("value", justify="right")
    stack = result.get("stack", {})
    for r in result.get("throughput", []):
        name = f"throughput {r['tasks']:,}"
        table.add_row(name, f"tasks/s, all five services (submit: {r['submit']}, provider 0 ms)",
                      f"{r['tasks_per_s']:,.1f}")
        table.add_row("", "finished / accepted; elapsed",
                      f"{_finished(r)}; {r['elapsed_s']:,.1f} s")
        table.add_row("", "submit→completed p50 / p99",
                      _ms(r["latency_ms"]["submit_to_completed"]))
        table.add_row("", "stage p50 (ms since previous)", _stages(r))
        table.add_row("", "busiest (CPU-s/s); all cores busy", _busiest(r),
                      end_section=True)
    s = result.get("steady")
    if s:
        table.add_row("steady", f"target / achieved rate ({s['submit']}, open loop, "
                                f"{s['seconds']:g} s)",
                      f"{s['rate_target']:g} / {s['achieved_rate'] or 0:,.1f} tasks/s")
        table.add_row("", "submit sent late vs due p50 / p99", _ms(s.get("submit_late_ms")))
        table.add_row("", "submit→dispatched p50 / p99",
                      _ms(s["latency_ms"]["submit_to_dispatched"]))
        table.add_row("", "submit→completed p50 / p99",
                      _ms(s["latency_ms"]["submit_to_completed"]))
        table.add_row("", "finished / accepted; throughput",
                      f"{_finished(s)}; {s['tasks_per_s']:,.1f} tasks/s")
        table.add_row("", "stage p50 (ms since previous)", _stages(s))
        table.add_row("", "busiest (CPU-s/s); all cores busy", _busiest(s),
                      end_section=True)
    o = result.get("overhead")
    if o:
        u, b, d = o["unloaded"], o["burst"], o["direct"]
        lat = o["provider_latency_ms"]
        table.add_row("overhead", f"one task at a time ({u['tasks']} at {u['rate']:g}/s, "
                                  f"provider {lat:g} ms): submit→completed / model time p50 / p99",
                      _x(u["e2e_over_model"]))
        table.add_row("", "  same, model time and submit→completed p50",
                      f"{u['model_ms_per_task']['p50']:,.0f} ms, "
                      f"{u['submit_to_completed_ms']['p50']:,.0f} ms")
        table.add_row("", f"burst of {b['tasks']:,}: pipeline wall / direct SDK wall "
                          f"({d['calls']:,} calls, {d['concurrency']} threads)",
                      f"{b['wall_s']:,.1f} s / {d['wall_s']:,.1f} s = {o['wall_ratio']}x")
        table.add_row("", "burst: submit→completed / model time p50 / p99 (incl. slot wait)",
                      _x(b["e2e_over_model"]))
        table.add_row("", "burst: dispatched→completed / model time p50 / p99",
                      _x(b["dispatched_to_completed_over_model"]))
        a = o.get("anchor_litellm_proxy") or {}
        if "proxy_added_ms" in a:
            table.add_row("", "anchor, LiteLLM proxy one call at a time: proxied / direct p50; "
                              "added p50 / p99",
                          f"{a['proxy_over_direct_p50']}x; {a['proxy_added_ms']['p50']:,.0f} / "
                          f"{a['proxy_added_ms']['p99']:,.0f} ms")
            pb, db = a["proxy_burst"], a["direct_burst"]
            table.add_row("", f"anchor, LiteLLM proxy burst ({pb['calls']:,} calls, "
                              f"{pb['concurrency']} threads): proxied / direct wall",
                          f"{pb['wall_s']:,.1f} s / {db['wall_s']:,.1f} s = "
                          f"{a['proxy_burst_wall_ratio']}x ({pb['calls_per_s']:,.1f} calls/s)")
        elif a:
            table.add_row("", "anchor, LiteLLM proxy", f"not measured: {a.get('error')}")
        table.add_row("", "", "", end_section=True)
    peak = result.get("peak_rss_mib")
    if peak:
        names = [n for n in PROCESS_ORDER if n in peak] + [n for n in peak
                                                           if n not in PROCESS_ORDER]
        for i, name in enumerate(names):
            table.add_row("peak memory" if i == 0 else "", f"{name} (RSS high-water, whole run)",
                          f"{peak[name]:,.0f} MiB" if peak[name] is not None else "-",
                          end_section=i == len(names) - 1)
    a = result.get("accounting")
    if a:
        sk = a.get("sink")
        if sk:
            table.add_row("clickhouse", f"sink rows/s ({sk['rows']:,} rows, {sk['events']:,} "
                                        "events; end to end / insert only / statements)",
                          f"{sk['rows_per_s']:,.0f} / {sk['insert_rows_per_s']:,.0f} / "
                          f"{sk.get('statement_rows_per_s', 0):,.0f}")
        kf = a.get("sink_kafka")
        if kf:
            table.add_row("", f"sink rows/s through Kafka ({kf['rows']:,} rows; end to end / "
                              "insert only / statements)",
                          f"{kf['rows_per_s']:,.0f} / {kf['insert_rows_per_s']:,.0f} / "
                          f"{kf.get('statement_rows_per_s', 0):,.0f}")
        for sc in a.get("scale", []):
            # the rollups' total (sc['model_calls']); above the bench's raw limit only the
            # last 6 h are raw rows: say so, not the raw count alone
            n = f"{sc.get('model_calls', sc['model_call_rows']):,} calls"
            if not sc.get("raw", True):
                n += f" ({sc['model_call_rows']:,} raw)"
            for key, label in (("cost_by_team", "cost by team"),
                               ("cost_daily_by_team", "cost per day by team"),
                               ("cost_to_value_by_task_type", "cost-to-value by task type"),
                               ("whatif_frontier_to_small", "what-if frontier→small"),
                               ("whatif_task_type_to_model", "what-if task type→model"),
                               ("dashboard", "dashboard data endpoint")):
                t = sc.get(key)
                if t is None:
                    continue
                runs = 5 if key == "dashboard" else 3
                cpu = (f" ({t['cpu_median_s'] * 1000:,.0f} CPU, load {t['load_avg']:.0f})"
                       if "cpu_median_s" in t else "")
                table.add_row("", f"{n}: {label} (first / median of {runs})",
                              f"{t['first_s'] * 1000:,.0f} / {t['median_s'] * 1000:,.0f} ms{cpu}")
    if stack:
        teams = stack.get("team_max_running")
        table.add_row("settings", "executor slots; coordinator max running; team quotas",
                      f"{stack['executor_slots']}; {stack['coordinator_max_running']}; "
                      f"{'as shipped' if teams is None else f'{teams} each (lifted)'}")
    return table


def main() -> None:
    """Print the table of a saved result: python -m bench.report bench/results/bench-<time>.json"""
    import argparse
    import json

    from rich.console import Console

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("path", help="a bench-<time>.json written by make bench")
    args = parser.parse_args()
    with open(args.path) as f:
        result = json.load(f)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 150))
    console.print(render(result))


if __name__ == "__main__":
    main()
