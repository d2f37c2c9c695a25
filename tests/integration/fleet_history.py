"""A small, fully known fleet history (events as the services would publish them), for the
analytics, audit and dashboard tests. Audit events are hash-chained with core.auditchain.Chain
the way the executor does it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from fleetplane.core import events as ev
from fleetplane.core.auditchain import Chain

PROVIDER = {"claude-haiku-4-5": "anthropic", "claude-sonnet-4-6": "anthropic",
            "claude-opus-4-7": "anthropic"}
TIER = {"claude-haiku-4-5": "small", "claude-sonnet-4-6": "standard",
        "claude-opus-4-7": "frontier"}


def base_time() -> datetime:
    """A recent time inside today's UTC day (budgets count today's spend)."""
    now = datetime.now(UTC).replace(microsecond=0)
    midnight = now.replace(hour=0, minute=0, second=0)
    return max(now - timedelta(minutes=5), midnight + timedelta(seconds=1))


@dataclass
class Call:
    input_tokens: int
    output_tokens: int
    cost_usd: float
    cache_write: int = 0
    cache_read: int = 0


@dataclass
class TaskStory:
    task_id: str
    team: str
    task_type: str
    model: str
    outcome: str = "completed"          # completed | failed | held | running
    calls: list[Call] = field(default_factory=list)
    tools: int = 0
    workspace: bool = False
    cached: bool = False
    held: tuple[str, float] | None = None    # (kind, seconds held before dispatch)
    dispatch_after_s: float = 1.0
    t0: datetime = field(default_factory=base_time)

    def events(self) -> list[ev.Event]:
        """The task's events in the order they happened (audit events chained)."""
        spec = ev.TaskSpec(name=self.task_id, task_type=self.task_type, prompt="p",
                           repository="repo-a", write_scope=["src/"])
        tier = TIER[self.model]
        ids = {"task_id": self.task_id, "team": self.team}
        t = self.t0
        out: list[ev.Event] = [
            ev.TaskSubmitted(**ids, spec=spec, occurred_at=t, source="http"),
            ev.TaskAccepted(**ids, spec=spec, occurred_at=t + timedelta(milliseconds=100)),
            ev.TaskRouted(**ids, spec=spec, attempt=1, model=self.model,
                          provider=PROVIDER[self.model], tier=tier, reason="task type rule",
                          occurred_at=t + timedelta(milliseconds=200)),
        ]
        if self.cached:
            out.append(ev.TaskCompleted(**ids, attempt=1, model=self.model, output="cached",
                                        cost_usd=0.0, duration_ms=1, cached=True,
                                        occurred_at=t + timedelta(milliseconds=300)))
            return out
        start = t + timedelta(seconds=self.dispatch_after_s)
        if self.held:
            kind, seconds = self.held
            out.append(ev.TaskHeld(**ids, reason=f"{kind} hold", kind=kind, attempt=1,
                                   held_by="other-task" if kind == "conflict" else None,
                                   occurred_at=t + timedelta(milliseconds=500)))
            if self.outcome == "held":
                return out
            start = t + timedelta(milliseconds=500) + timedelta(seconds=seconds)
        out.append(ev.TaskDispatched(**ids, spec=spec, attempt=1, model=self.model,
                                     provider=PROVIDER[self.model], tier=tier,
                                     occurred_at=start))
        out.append(ev.TaskStarted(**ids, attempt=1, executor_id="exec-1",
                                  occurred_at=start + timedelta(milliseconds=50)))
        chain = Chain()
        clock = start + timedelta(milliseconds=100)
        for i, c in enumerate(self.calls):
            clock += timedelta(milliseconds=400)
            out.append(chain.link(ev.ModelCall(
                **ids, attempt=1, call_index=i, model=self.model, provider=PROVIDER[self.model],
                tier=tier, input_tokens=c.input_tokens, output_tokens=c.output_tokens,
                cache_creation_input_tokens=c.cache_write, cache_read_input_tokens=c.cache_read,
                cost_usd=c.cost_usd, latency_ms=400.0, outcome="ok", stop_reason="tool_use",
                occurred_at=clock)))
            if i < self.tools:
                clock += timedelta(milliseconds=20)
                out.append(chain.link(ev.ToolCall(
                    **ids, attempt=1, call_index=i, tool="read_file",
                    arguments='{"path": "src/a.py"}', outcome="ok", duration_ms=20.0,
                    occurred_at=clock)))
        if self.workspace:
            clock += timedelta(milliseconds=30)
            out.append(chain.link(ev.WorkspaceChange(
                **ids, attempt=1, repository="repo-a", branch=f"fleet/{self.task_id}",
                commit="abc123", files=[ev.FileChange(path="src/a.py", added=3, removed=1)],
                occurred_at=clock)))
        if self.outcome == "running":
            return out
        end = clock + timedelta(milliseconds=100)
        cost = round(sum(c.cost_usd for c in self.calls), 9)
        duration = int((end - start).total_seconds() * 1000)
        if self.outcome == "completed":
            out.append(ev.TaskCompleted(**ids, attempt=1, model=self.model, output="done",
                                        cost_usd=cost, duration_ms=duration,
                                        audit_head=chain.head, audit_count=chain.count,
                                        occurred_at=end))
        else:
            out.append(ev.TaskFailed(**ids, attempt=1, failure_class="model_error",
                                     reason="bad answer", final=True, cost_usd=cost,
                                     audit_head=chain.head, audit_count=chain.count,
                                     occurred_at=end))
        return out


def utilization_events(t0: datetime) -> list[ev.Event]:
    """Two 10-second windows of one executor slot: busy 6 s (model 4, tools 1), then 2 s
    (model 1, tools 0.5)."""
    windows = [(0, 6.0, 4.0, 1.0), (10, 2.0, 1.0, 0.5)]
    return [ev.ExecutorUtilization(task_id="", team="", executor_id="exec-1", slot=0,
                                   window_start=t0 + timedelta(seconds=start), window_s=10.0,
                                   busy_s=busy, idle_s=10.0 - busy, model_s=model, tool_s=tool,
                                   attempts=1, occurred_at=t0 + timedelta(seconds=start + 10))
            for start, busy, model, tool in windows]


def stories(prefix: str) -> list[TaskStory]:
    """Two teams, four task types, every outcome the analytics distinguish."""
    a, b = f"{prefix}-alpha", f"{prefix}-beta"
    return [
        TaskStory(f"{prefix}-t1", a, "summarize", "claude-haiku-4-5",
                  calls=[Call(1000, 200, 0.01)], tools=1),
        TaskStory(f"{prefix}-t2", a, "summarize", "claude-haiku-4-5", outcome="failed",
                  calls=[Call(1000, 200, 0.01)]),
        TaskStory(f"{prefix}-t3", a, "codegen", "claude-sonnet-4-6",
                  calls=[Call(3000, 500, 0.05, cache_read=2000), Call(3500, 400, 0.05)],
                  tools=2, workspace=True),
        TaskStory(f"{prefix}-t4", a, "summarize", "claude-haiku-4-5", cached=True),
        TaskStory(f"{prefix}-t5", b, "debug", "claude-opus-4-7",
                  calls=[Call(10_000, 2000, 0.5)], tools=1, held=("conflict", 3.0)),
        TaskStory(f"{prefix}-t6", b, "debug", "claude-opus-4-7", outcome="failed",
                  calls=[Call(10_000, 2000, 0.5)], dispatch_after_s=2.0),
        TaskStory(f"{prefix}-t7", b, "debug", "claude-haiku-4-5",
                  calls=[Call(10_000, 2000, 0.002)]),
        TaskStory(f"{prefix}-t8", b, "review", "claude-sonnet-4-6", outcome="held",
                  held=("quota", 0.0)),
    ]
