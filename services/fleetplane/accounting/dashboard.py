# ruff: noqa: E501  (the page's HTML and script are kept as written, not wrapped)
"""The fleet dashboard: two static pages served by the accounting API, filled by a small script
that polls JSON (`/v1/dashboard`, `/v1/tasks/{id}/timeline`) every REFRESH_MS: live without a
build step or a front-end framework. Every number on the page comes from ClickHouse."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from fleetplane.accounting import analytics, live, queries
from fleetplane.accounting.api_analytics import budgets
from fleetplane.accounting.store import Store
from fleetplane.core.settings import Settings

REFRESH_MS = 2000
#: the cost sections cover this many whole UTC days before today, and today
COST_DAYS = 30
#: pooled ClickHouse clients one refresh's sections run on
READERS = 4

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f6f8;color:#1d2733}
header{background:#1d2733;color:#fff;padding:10px 20px;display:flex;gap:20px;align-items:baseline}
header h1{font-size:18px;margin:0} header span{color:#9fb0c3;font-size:12px}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(430px,1fr));gap:14px;padding:14px}
section{background:#fff;border-radius:6px;padding:10px 14px;box-shadow:0 1px 2px #0002}
h2{font-size:14px;margin:0 0 8px;color:#44546a;text-transform:uppercase;letter-spacing:.04em}
table{border-collapse:collapse;width:100%} td,th{padding:3px 6px;text-align:left;
border-bottom:1px solid #e6e9ee;font-variant-numeric:tabular-nums} th{color:#66768a;font-weight:600}
td.n,th.n{text-align:right} .kpis{display:flex;gap:12px} .kpi{flex:1;background:#eef2f7;
border-radius:6px;padding:8px;text-align:center} .kpi b{display:block;font-size:26px}
.bar{height:8px;background:#dde3ea;border-radius:4px;overflow:hidden}
.bar i{display:block;height:100%;background:#3b82f6} .bar i.low{background:#f59e0b}
.bar i.exhausted{background:#dc2626} .sev-critical{color:#dc2626;font-weight:600}
.sev-warning{color:#b45309} a{color:#2563eb;text-decoration:none} svg{width:100%;height:140px}
@media (max-width:900px){section{grid-column:auto!important}}
.ok{color:#15803d;font-weight:600} .bad{color:#dc2626;font-weight:600} code{font-size:12px}
"""

_OVERVIEW_HTML = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>fleetplane dashboard</title><style>%(style)s</style></head><body>
<header><h1>fleetplane</h1><span id="updated">loading...</span></header>
<main>
<section style="grid-column:1/-1"><h2>Fleet</h2><div class="kpis">
 <div class="kpi">queued<b id="total-queued">-</b></div>
 <div class="kpi">running<b id="total-running">-</b></div>
 <div class="kpi">held<b id="total-held">-</b></div>
 <div class="kpi">completed<b id="total-completed">-</b></div>
 <div class="kpi">failed<b id="total-failed">-</b></div>
 <div class="kpi">spend $ (%(cost_days)sd)<b id="total-spend">-</b></div>
 <div class="kpi">cache saved $<b id="cache-saved">-</b></div></div></section>
<section style="grid-column:span 2"><h2>Teams: queue, quota, spend</h2><table id="teams"><thead><tr><th>team</th>
<th class="n">queued</th><th class="n">running / max</th><th class="n">held</th>
<th class="n">done</th><th class="n">spent $</th><th class="n">budget $</th><th>budget</th>
</tr></thead><tbody></tbody></table></section>
<section><h2>Held tasks (why)</h2><table id="held"><thead><tr><th>task</th><th>team</th>
<th>kind</th><th>reason</th></tr></thead><tbody></tbody></table>
<table id="held-time"><thead><tr><th>kind</th><th class="n">holds</th><th class="n">total s</th>
<th class="n">p50 s</th><th class="n">still held</th></tr></thead><tbody></tbody></table></section>
<section><h2>Executor utilization</h2><svg id="util-chart" viewBox="0 0 400 140"
preserveAspectRatio="none"></svg><div id="util-summary"></div>
<table id="executors"><thead><tr><th>executor</th><th class="n">slots</th><th class="n">busy</th>
<th class="n">models</th><th class="n">tools</th><th class="n">attempts</th></tr></thead>
<tbody></tbody></table></section>
<section><h2>Cost by task type</h2><table id="cost-task-type"><thead><tr><th>task type</th>
<th class="n">calls</th><th class="n">cost $</th><th class="n">$ / success</th></tr></thead>
<tbody></tbody></table></section>
<section><h2>Cost by model</h2><table id="cost-model"><thead><tr><th>model</th>
<th class="n">calls</th><th class="n">tokens in / out</th><th class="n">cost $</th></tr>
</thead><tbody></tbody></table></section>
<section><h2>Alerts</h2><table id="alerts"><thead><tr><th>when</th><th>severity</th>
<th>kind</th><th>message</th></tr></thead><tbody></tbody></table></section>
<section style="grid-column:1/-1"><h2>Recent tasks</h2><table id="tasks"><thead><tr>
<th>task</th><th>team</th><th>type</th><th>state</th><th>model</th><th class="n">cost $</th>
</tr></thead><tbody></tbody></table></section>
</main>
<script>
const esc = s => String(s ?? '').replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
const usd = v => (v == null ? '-' : Number(v).toFixed(6));
function rows(id, items, cells) {
  document.querySelector('#' + id + ' tbody').innerHTML = items.map(cells).join('');
}
function chart(series) {
  const svg = document.getElementById('util-chart');
  if (!series.length) { svg.innerHTML = '<text x="10" y="70">no utilization reports yet</text>'; return; }
  const w = 400 / series.length;
  svg.innerHTML = series.map((p, i) => {
    const tot = p.busy_s + p.idle_s || 1, h = 130;
    const m = h * p.model_s / tot, t = h * p.tool_s / tot, o = h * p.other_s / tot;
    const x = (i * w).toFixed(1), bw = Math.max(1, w - 1).toFixed(1);
    return `<rect x="${x}" y="${(140 - m).toFixed(1)}" width="${bw}" height="${m.toFixed(1)}" fill="#3b82f6"><title>model</title></rect>` +
      `<rect x="${x}" y="${(140 - m - t).toFixed(1)}" width="${bw}" height="${t.toFixed(1)}" fill="#10b981"><title>tools</title></rect>` +
      `<rect x="${x}" y="${(140 - m - t - o).toFixed(1)}" width="${bw}" height="${o.toFixed(1)}" fill="#a78bfa"><title>other busy</title></rect>`;
  }).join('');
}
async function refresh() {
  try {
    const d = await (await fetch('/v1/dashboard')).json();
    for (const k of ['queued', 'running', 'held', 'completed', 'failed'])
      document.getElementById('total-' + k).textContent = d.overview.total[k];
    document.getElementById('total-spend').textContent = usd(d.spend_usd);
    document.getElementById('cache-saved').textContent = usd(d.cache.saved_usd);
    const budgets = Object.fromEntries(d.budgets.map(b => [b.team, b]));
    const teams = Object.fromEntries(d.overview.teams.map(t => [t.team, t]));
    const names = [...new Set([...Object.keys(teams), ...Object.keys(budgets)])].sort();
    rows('teams', names, n => {
      const t = teams[n] || {queued: 0, running: 0, held: 0, completed: 0, held_by_kind: {}};
      const b = budgets[n] || {spent_usd: 0, budget_usd: 0, state: 'ok', max_running: ''};
      const pct = b.budget_usd ? Math.min(100, 100 * b.spent_usd / b.budget_usd) : 0;
      const kinds = Object.entries(t.held_by_kind || {}).map(([k, v]) => `${k}: ${v}`).join(', ');
      return `<tr data-team="${esc(n)}"><td>${esc(n)}</td><td class="n queued">${t.queued}</td>` +
        `<td class="n running">${t.running} / ${b.max_running}</td>` +
        `<td class="n held" title="${esc(kinds)}">${t.held}${kinds ? ' (' + esc(kinds) + ')' : ''}</td>` +
        `<td class="n done">${t.completed}</td><td class="n spent">${usd(b.spent_usd)}</td>` +
        `<td class="n budget">${Number(b.budget_usd).toFixed(2)}</td><td><div class="bar"><i class="${esc(b.state)}" style="width:${pct}%%"></i></div></td></tr>`;
    });
    rows('held', d.overview.held, h => `<tr><td><a href="/tasks/${esc(h.task_id)}">${esc(h.task_id.slice(0, 12))}</a></td>` +
      `<td>${esc(h.team)}</td><td class="kind">${esc(h.kind)}</td><td>${esc(h.reason)}</td></tr>`);
    rows('held-time', d.held_time, h => `<tr data-kind="${esc(h.kind)}"><td>${esc(h.kind)}</td><td class="n">${h.holds}</td>` +
      `<td class="n">${Number(h.total_s).toFixed(1)}</td><td class="n">${Number(h.p50_s).toFixed(1)}</td><td class="n">${h.still_held}</td></tr>`);
    const u = d.utilization.total;
    chart(d.utilization.series);
    document.getElementById('util-summary').innerHTML =
      `busy <b id="util-busy">${(100 * u.busy_share).toFixed(0)}%%</b> of slot time; of busy time: ` +
      `models <b>${(100 * u.model_share_of_busy).toFixed(0)}%%</b>, tools <b>${(100 * u.tool_share_of_busy).toFixed(0)}%%</b>, ` +
      `other <b>${(100 * u.other_share_of_busy).toFixed(0)}%%</b>; queue wait p50 <b id="wait-p50">${d.queue_wait ? Number(d.queue_wait.p50_s).toFixed(2) : '-'}</b> s, ` +
      `p90 <b>${d.queue_wait ? Number(d.queue_wait.p90_s).toFixed(2) : '-'}</b> s`;
    const pctOf = x => `${(100 * x).toFixed(0)}%%`;
    rows('executors', d.utilization.executors || [], x => `<tr data-executor="${esc(x.executor_id)}"><td>${esc(x.executor_id)}</td>` +
      `<td class="n">${x.slots}</td><td class="n busy">${pctOf(x.busy_share)}</td><td class="n">${pctOf(x.model_share_of_busy)}</td>` +
      `<td class="n">${pctOf(x.tool_share_of_busy)}</td><td class="n">${x.attempts}</td></tr>`);
    const value = Object.fromEntries(d.value.map(v => [v.task_type, v]));
    rows('cost-task-type', d.cost_by_task_type, c => `<tr data-task-type="${esc(c.task_type)}"><td>${esc(c.task_type || '(unknown)')}</td>` +
      `<td class="n">${c.calls}</td><td class="n cost">${usd(c.cost_usd)}</td><td class="n">${usd((value[c.task_type] || {}).cost_per_success_usd)}</td></tr>`);
    rows('cost-model', d.cost_by_model, c => `<tr data-model="${esc(c.model)}"><td>${esc(c.model)}</td><td class="n">${c.calls}</td>` +
      `<td class="n">${c.input_tokens} / ${c.output_tokens}</td><td class="n cost">${usd(c.cost_usd)}</td></tr>`);
    rows('alerts', d.alerts, a => `<tr><td>${esc(a.occurred_at.slice(11, 19))}</td><td class="sev-${esc(a.severity)}">${esc(a.severity)}</td>` +
      `<td>${esc(a.kind)}</td><td>${esc(a.message)}</td></tr>`);
    rows('tasks', d.tasks, t => `<tr><td><a href="/tasks/${esc(t.task_id)}">${esc(t.task_id.slice(0, 12))}</a></td><td>${esc(t.team)}</td>` +
      `<td>${esc(t.task_type)}</td><td>${esc(t.state)}</td><td>${esc(t.model)}</td><td class="n">${usd(t.cost_usd)}</td></tr>`);
    document.getElementById('updated').textContent = 'updated ' + d.generated_at.slice(11, 19) + ' UTC, refreshes every %(refresh_s)ss';
  } catch (e) {
    document.getElementById('updated').textContent = 'accounting unreachable: ' + e;
  }
}
refresh(); setInterval(refresh, %(refresh)d);
</script></body></html>"""

_TASK_HTML = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>task %(task_id)s</title><style>%(style)s</style></head><body>
<header><h1><a href="/" style="color:#fff">fleetplane</a> / task <code id="task-id">%(task_id)s</code></h1>
<span id="updated">loading...</span></header><main>
<section style="grid-column:1/-1"><h2>Audit chain</h2><div id="verdict">-</div></section>
<section style="grid-column:1/-1"><h2>Timeline</h2><table id="timeline"><thead><tr>
<th>time (UTC)</th><th>event</th><th class="n">attempt</th><th>detail</th></tr></thead>
<tbody></tbody></table></section></main>
<script>
const esc = s => String(s ?? '').replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
const id = document.getElementById('task-id').textContent;
async function refresh() {
  const r = await fetch('/v1/tasks/' + encodeURIComponent(id) + '/timeline');
  if (r.status === 404) { document.getElementById('updated').textContent = 'no events for this task yet'; return; }
  const items = await r.json();
  document.querySelector('#timeline tbody').innerHTML = items.map(e =>
    `<tr data-event="${esc(e.event_type)}"><td>${esc(e.occurred_at.slice(11, 23))}</td><td>${esc(e.event_type)}</td>` +
    `<td class="n">${e.attempt ?? ''}</td><td>${esc(e.detail)}</td></tr>`).join('');
  const v = await (await fetch('/v1/tasks/' + encodeURIComponent(id) + '/verify')).json();
  document.getElementById('verdict').innerHTML = v.ok
    ? `<span class="ok">verified</span>: ${v.attempts.map(a => 'attempt ' + a.attempt + ': ' + a.events + ' audit events').join('; ')}`
    : `<span class="bad">NOT verified</span>: ${esc(v.attempts.flatMap(a => a.problems).join(' | '))}`;
  document.getElementById('updated').textContent = items.length + ' events, refreshes every %(refresh_s)ss';
}
refresh(); setInterval(refresh, %(refresh)d);
</script></body></html>"""


def cost_since(now: datetime) -> datetime:
    """Where the dashboard's cost sections start: midnight UTC COST_DAYS days ago (whole days:
    the daily rollups alone answer, so a refresh reads the same at any length of history)."""
    midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight - timedelta(days=COST_DAYS)


def dashboard_data(store: Store, settings: Settings) -> dict[str, Any]:
    """One refresh of the overview page. Costs (the last COST_DAYS whole days and today), value,
    cache savings and budgets come from the rollups; live sections (tasks, holds, waits,
    utilization) from the recent window (live.py). Nothing here reads the raw history, so a
    refresh costs the same at any history. The sections run at once on the store's read pool
    (Store.parallel), so a refresh takes about as long as its slowest section."""
    now = datetime.now(UTC)
    since = cost_since(now)
    sections: dict[str, Callable[[Store], Any]] = {
        "costs": lambda s: queries.cost_breakdown(s, ("team", "task_type", "model"),
                                                  tasks=False, since=since),
        # value and cache savings share these two reads
        "figures": lambda s: analytics.type_model_figures(s, since=since),
        "overview": lambda s: live.overview(s, now),
        "budgets": lambda s: budgets(s, settings),
        "utilization": lambda s: analytics.utilization(s, bucket_s=60,
                                                       since=live.window_start(now),
                                                       recent=True),
        "queue_wait": lambda s: live.queue_wait(s, now),
        "held_time": lambda s: live.held_time(s, now),
        "alerts": lambda s: analytics.recent_alerts(s, limit=20),
        "tasks": lambda s: live.recent_tasks(s, now, limit=25),
    }
    parts = store.parallel(sections, readers=READERS)
    costs, figures = parts["costs"], parts["figures"]
    return {
        "generated_at": now.isoformat(),
        "live_window_s": live.LIVE_WINDOW.total_seconds(),
        "cost_since": since.isoformat(),
        "overview": parts["overview"],
        "budgets": parts["budgets"],
        "spend_usd": sum(float(r["cost_usd"]) for r in costs["team"]),
        "cost_by_team": costs["team"],
        "cost_by_task_type": costs["task_type"],
        "cost_by_model": costs["model"],
        "value": analytics.value_by_task_type(figures),
        "cache": analytics.cache_savings(store, figures=figures),
        "utilization": parts["utilization"],
        "queue_wait": parts["queue_wait"],
        "held_time": parts["held_time"],
        "alerts": parts["alerts"],
        "tasks": parts["tasks"],
    }


def make_router(store: Store, settings: Settings) -> APIRouter:
    r = APIRouter()
    params = {"style": _STYLE, "refresh": REFRESH_MS, "refresh_s": REFRESH_MS // 1000,
              "cost_days": COST_DAYS}

    @r.get("/", response_class=HTMLResponse, include_in_schema=False)
    def overview_page() -> str:
        return _OVERVIEW_HTML % params

    @r.get("/tasks/{task_id}", response_class=HTMLResponse, include_in_schema=False)
    def task_page(task_id: str) -> str:
        from html import escape

        return _TASK_HTML % {**params, "task_id": escape(task_id[:200])}

    @r.get("/v1/dashboard")
    def data() -> dict[str, Any]:
        return dashboard_data(store, settings)

    return r
