"""The agent loop end to end on a real git repository, the bubblewrap sandbox and the fake provider
over HTTP (anthropic SDK / litellm): edits committed on the attempt's branch, rollback, orphans,
limits, retries and fallback, subtasks and their budget."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

from fleetplane.core import events as ev
from fleetplane.core.catalog import catalog_for
from fleetplane.core.loop import Record
from fleetplane.core.settings import Settings
from fleetplane.core.teams import parse_teams
from fleetplane.executor.handlers import SeenDispatches, execute
from fleetplane.executor.runtime import Journal
from fleetplane.executor.sandbox import Sandbox
from fleetplane.executor.workspace import Workspaces, branch_name
from fleetplane.fakeprovider import FakeProvider
from fleetplane.tracing import propagation

from .agentkit import (
    CALC,
    assert_audit_chain,
    clients,
    dispatched,
    git,
    of,
    runtime,
    sample_repo,
    tool_turn,
)

CATALOG = catalog_for(Settings().catalog_file)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    with FakeProvider() as provider:
        yield provider


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox()


@pytest.fixture(autouse=True)
def _clean(fake: FakeProvider) -> None:
    fake.set_script(None)
    fake.reset()


def run(rt: object, fake: FakeProvider, event: ev.TaskDispatched, retries: int = 0,
        timeout_s: float = 10.0, openai_via_litellm: bool = False) -> list[ev.Event]:
    return list(execute(CATALOG, clients(fake, retries, timeout_s, openai_via_litellm),
                        "test-executor", SeenDispatches(), event,
                        runtime=rt))  # type: ignore[arg-type]


def test_agent_reads_edits_tests_and_commits_on_its_branch(
        tmp_path: Path, fake: FakeProvider, sandbox: Sandbox) -> None:
    repo = sample_repo(tmp_path)
    main_before = git(repo, "rev-parse", "main").strip()
    rt = runtime(tmp_path, {"sample": repo}, sandbox)
    fake.set_script({"replies": [
        tool_turn(("list_dir", {"path": "."})),
        tool_turn(("read_file", {"path": "calc.py"})),
        tool_turn(("run_command", {"command": "python3 -m unittest -q test_calc"})),
        tool_turn(("edit", {"path": "calc.py", "old": "return a - b", "new": "return a + b"})),
        tool_turn(("run_command", {"command": "python3 -m unittest -q test_calc"})),
        {"text": "add() subtracted; it adds now and the tests pass"},
    ]})
    out = run(rt, fake, dispatched("t-fix", "make the tests pass"))

    done = of(out, ev.TaskCompleted)
    assert done and done[0].output == "add() subtracted; it adds now and the tests pass"
    tools = of(out, ev.ToolCall)
    assert [t.tool for t in tools] == ["list_dir", "read_file", "run_command", "edit",
                                       "run_command"]
    assert "calc.py" in tools[0].result_summary and "return a - b" in tools[1].result_summary
    assert tools[2].outcome == "error" and "FAILED" in tools[2].result_summary  # red first
    assert tools[4].outcome == "ok" and "exit code 0" in tools[4].result_summary  # then green
    # the model saw the tool results (tool_result blocks went back through the SDK)
    assert "return a - b" in fake.calls[2].last_user_text

    change = of(out, ev.WorkspaceChange)[0]
    branch = branch_name("t-fix", 1)
    assert change.branch == branch and change.repository == "sample"
    assert [(f.path, f.added, f.removed) for f in change.files] == [("calc.py", 1, 1)]
    assert git(repo, "rev-parse", branch).strip() == change.commit
    assert "return a + b" in git(repo, "show", f"{branch}:calc.py")
    message = git(repo, "log", "-1", "--format=%B", branch)
    assert "Fleetplane-Task: t-fix" in message and "Fleetplane-Attempt: 1" in message
    # main untouched, worktree gone, only the main worktree left
    assert git(repo, "rev-parse", "main").strip() == main_before
    assert (repo / "calc.py").read_text() == CALC
    assert git(repo, "worktree", "list").count("\n") == 1
    assert not any((tmp_path / "worktrees" / "sample").iterdir())
    assert_audit_chain(out)
    # utilization: the slot spent time in model calls and in tools
    util = [u for u in rt.utilization_events() if u.attempts]
    assert util and util[0].model_s > 0 and util[0].tool_s > 0
    assert util[0].busy_s >= util[0].model_s + util[0].tool_s - 1e-6


def test_rollback_deletes_an_unmerged_branch_and_reverts_a_merged_commit(
        tmp_path: Path, fake: FakeProvider, sandbox: Sandbox) -> None:
    repo = sample_repo(tmp_path)
    rt = runtime(tmp_path, {"sample": repo}, sandbox)
    edit = tool_turn(("write_file", {"path": "notes/todo.txt", "content": "a\nb\n"}))
    fake.set_script({"replies": [edit, {"text": "ok"}, edit, {"text": "ok"}]})
    first = run(rt, fake, dispatched("t-rb", "write notes", attempt=1))
    second = run(rt, fake, dispatched("t-rb2", "write notes", attempt=1))
    commit1 = of(first, ev.WorkspaceChange)[0].commit
    commit2 = of(second, ev.WorkspaceChange)[0].commit

    # not merged: the branch goes
    rb = run(rt, fake, dispatched("t-rb", "write notes", attempt=1, action="rollback"))
    assert isinstance(rb[0], ev.TaskRolledBack) and rb[0].reverted_commit == commit1
    assert rb[0].files == ["notes/todo.txt"] and "deleted" in rb[0].reason
    assert git(repo, "branch", "--list", branch_name("t-rb", 1)) == ""

    # merged into main: reverted there, main keeps its history
    git(repo, "merge", "-q", "--ff-only", branch_name("t-rb2", 1))
    rb2 = run(rt, fake, dispatched("t-rb2", "write notes", attempt=1, action="rollback"))
    assert isinstance(rb2[0], ev.TaskRolledBack) and rb2[0].reverted_commit == commit2
    assert "reverted" in rb2[0].reason
    assert git(repo, "ls-tree", "-r", "--name-only", "main").split() == [
        "README.md", "calc.py", "test_calc.py"]
    assert commit2 in git(repo, "log", "--format=%H", "main")


def test_restart_cleans_orphaned_worktrees_and_a_redelivered_dispatch_is_not_rerun(
        tmp_path: Path, fake: FakeProvider, sandbox: Sandbox) -> None:
    repo = sample_repo(tmp_path)
    ws = Workspaces({"sample": repo}, tmp_path / "worktrees")
    wt = ws.create("sample", "t-orphan", 1, "main")
    (wt.path / "half.txt").write_text("half done")
    # a new executor process starts: everything under its worktree root is an orphan
    removed = Workspaces({"sample": repo}, tmp_path / "worktrees").clean_orphans()
    assert str(wt.path) in removed and not wt.path.exists()
    assert git(repo, "worktree", "list").count("\n") == 1
    assert git(repo, "branch", "--list", branch_name("t-orphan", 1)) == ""

    # the dispatch of the interrupted attempt comes back: reported lost, not run again
    journal = Journal(tmp_path / "journal")
    event = dispatched("t-orphan", "do it")
    journal.write("t-orphan", 1, {"dispatch": event.event_id, "state": "running",
                                  "head": "abc", "count": 3, "cost": 0.01})
    rt = runtime(tmp_path, {"sample": repo}, sandbox)
    rt.journal = journal
    out = run(rt, fake, event)
    assert len(fake.calls) == 0
    assert isinstance(out[0], ev.TaskFailed) and out[0].failure_class == "lost_executor"
    assert (out[0].audit_head, out[0].audit_count, out[0].cost_usd) == ("abc", 3, 0.01)
    # a finished attempt redelivered is answered with the same outcome (same event ids), and
    # its audit events again (a live copy may not have reached the log)
    fake.set_script({"replies": [{"text": "fine"}]})
    again = dispatched("t-done", "plain", repository=None)
    first = run(rt, fake, again)
    repeat = run(rt, fake, again)
    assert len(fake.calls) == 1
    assert [e.event_id for e in repeat] == [
        e.event_id for e in first if isinstance(e, ev.ModelCall | ev.TaskCompleted)]


def test_a_dispatch_read_again_by_the_same_process_is_answered_once(
        tmp_path: Path, fake: FakeProvider, sandbox: Sandbox) -> None:
    """The same dispatch record read again by the same process: a copy while its answer is
    pending commit or committed (the parallel loop re-reads finished records after a rebalance
    or a broker outage; answering them again published the outcome twice in the quiet chaos
    runs); answered from the journal only when the loop dropped its answer (a loop that
    rewinds after an aborted transaction; dropping it too left the dispatch without any
    answer: the 2,000-task chaos run's two stuck tasks)."""
    rt = runtime(tmp_path, {}, sandbox)
    rt.journal = Journal(tmp_path / "journal")
    fake.set_script({"replies": [{"text": "fine"}]})
    event = dispatched("t-again", "plain", repository=None)

    def at(offset: int) -> Record:
        return Record(topic="tasks.dispatch", partition=0, offset=offset, key=b"t-again",
                      value=b"")

    def handle(seen: SeenDispatches, e: ev.Event, offset: int) -> list[ev.Event]:
        return list(execute(CATALOG, clients(fake), "test-executor", seen, e, at(offset),
                            runtime=rt))

    seen = SeenDispatches()
    first = handle(seen, event, 7)
    assert of(first, ev.TaskCompleted)
    # the coordinator's re-published copy (another record): dropped, the first one answers
    assert handle(seen, event, 9) == []
    # the same record read again while its answer waits for the loop's commit: a copy
    assert handle(seen, event, 7) == []
    # the same attempt dispatched again under another event id while this process's answer
    # to the first waits for its commit: the first answers, the journal is not published twice
    redispatched = event.model_copy(update={"event_id": "another-dispatch-id"})
    assert handle(seen, redispatched, 8) == []
    # ... and after the commit
    seen.committed([at(7)])
    assert handle(seen, event, 7) == []
    assert handle(seen, redispatched.model_copy(update={"event_id": "a-third-id"}), 10) == []
    assert len(fake.calls) == 1
    # a loop that dropped the answer (rewound after an aborted transaction, nothing
    # committed): the record read again is answered from the journal, not run again
    rewound = SeenDispatches()
    rewound.first_time(event.event_id, ("tasks.dispatch", 0, 7))
    rewound._active.discard(event.event_id)  # its handling ended; the answer was dropped
    again = handle(rewound, event, 7)
    assert len(fake.calls) == 1
    assert of(again, ev.TaskCompleted) and [e.event_id for e in again] == [
        e.event_id for e in first if isinstance(e, ev.ModelCall | ev.TaskCompleted)]
    # the same attempt dispatched again under another event id (a coordinator that lost its
    # record of the first dispatch) in a new process: answered from the journal, not run again
    other = handle(SeenDispatches(), redispatched, 12)
    assert len(fake.calls) == 1
    assert [e.event_id for e in other] == [e.event_id for e in again]


def test_dollar_limit_stops_before_the_call_that_would_exceed_it(
        tmp_path: Path, fake: FakeProvider, sandbox: Sandbox) -> None:
    repo = sample_repo(tmp_path)
    rt = runtime(tmp_path, {"sample": repo}, sandbox)
    haiku = CATALOG.model("claude-haiku-4-5")
    # the first call reports 15k input tokens; what is left cannot pay for the next call's
    # worst case (its input estimate + 1024 output tokens)
    fake.set_script({"replies": [
        {**tool_turn(("list_dir", {})), "usage": {"input_tokens": 15_000}},
        {"text": "never reached"}]})
    limit = 15_000 * haiku.prices.input + 1024 * haiku.prices.output
    out = run(rt, fake, dispatched("t-budget", "look around", max_cost_usd=limit))
    calls = of(out, ev.ModelCall)
    failed = of(out, ev.TaskFailed)[0]
    assert len(fake.calls) == 1 and len(calls) == 1
    assert failed.failure_class == "budget_exceeded" and "could cost" in failed.reason
    assert failed.cost_usd == pytest.approx(calls[0].cost_usd) and failed.cost_usd <= limit
    assert_audit_chain(out)


def test_turn_and_wall_time_limits_fail_with_their_class(
        tmp_path: Path, fake: FakeProvider, sandbox: Sandbox) -> None:
    repo = sample_repo(tmp_path)
    rt = runtime(tmp_path, {"sample": repo}, sandbox)
    fake.set_script({"default": tool_turn(("list_dir", {})), "replies": []})
    out = run(rt, fake, dispatched("t-turns", "loop forever", max_turns=3))
    failed = of(out, ev.TaskFailed)[0]
    assert failed.failure_class == "limit_exceeded" and "max_turns" in failed.reason
    assert len(of(out, ev.ModelCall)) == 3

    fake.set_script({"replies": [{"text": "slow", "latency_ms": 5000}]})
    out = run(rt, fake, dispatched("t-slow", "take your time", timeout_s=1))
    failed = of(out, ev.TaskFailed)[0]
    assert failed.failure_class == "timeout"
    assert of(out, ev.ModelCall)[0].outcome == "timeout"


@pytest.mark.parametrize("status", [429, 529, 500])
def test_retriable_provider_errors_are_retried_inside_the_attempt(
        tmp_path: Path, fake: FakeProvider, sandbox: Sandbox, status: int) -> None:
    rt = runtime(tmp_path, {}, sandbox)
    fake.set_script({"replies": [{"error": {"status": status, "retry_after_s": 0}, "times": 2},
                                 {"text": "third time lucky"}]})
    out = run(rt, fake, dispatched(f"t-{status}", "hello", repository=None), retries=2)
    kinds = {429: "rate_limited", 529: "overloaded", 500: "server_error"}[status]
    assert [c.outcome for c in of(out, ev.ModelCall)] == [kinds, kinds, "ok"]
    assert of(out, ev.TaskCompleted)[0].output == "third time lucky"
    assert_audit_chain(out)


@pytest.mark.parametrize("via_litellm", [False, True], ids=["openai-sdk", "litellm"])
def test_openai_model_errors_keep_their_class_on_either_client(
        tmp_path: Path, fake: FakeProvider, sandbox: Sandbox, via_litellm: bool) -> None:
    """gpt-4o-mini through the openai SDK (the default) or litellm: the same outcome per status,
    retried or not as the class says."""
    rt = runtime(tmp_path, {}, sandbox)
    kinds = {429: "rate_limited", 529: "overloaded", 500: "server_error"}
    for status, kind in kinds.items():
        fake.set_script({"replies": [{"error": {"status": status, "retry_after_s": 0}},
                                     {"text": "second time lucky"}]})
        out = run(rt, fake, dispatched(f"t-oa-{status}", "hello", repository=None,
                                       model="gpt-4o-mini", provider="openai"),
                  retries=1, openai_via_litellm=via_litellm)
        assert [c.outcome for c in of(out, ev.ModelCall)] == [kind, "ok"], status
        assert of(out, ev.TaskCompleted)[0].output == "second time lucky"
    fake.set_script({"replies": [{"error": {"status": 400, "message": "bad field"}}]})
    out = run(rt, fake, dispatched("t-oa-400", "hello", repository=None, model="gpt-4o-mini",
                                   provider="openai"), retries=3, openai_via_litellm=via_litellm)
    assert [c.outcome for c in of(out, ev.ModelCall)] == ["bad_request"]
    assert [c.api for c in fake.calls].count("openai") == 7


def test_timeouts_retry_and_exhausted_retries_fail_over_to_the_fallback(
        tmp_path: Path, fake: FakeProvider, sandbox: Sandbox) -> None:
    rt = runtime(tmp_path, {}, sandbox)
    fake.set_script({"replies": [{"text": "late", "latency_ms": 3000},
                                 {"text": "in time"}]})
    out = run(rt, fake, dispatched("t-timeout", "hello", repository=None), retries=1,
              timeout_s=0.5)
    assert [c.outcome for c in of(out, ev.ModelCall)] == ["timeout", "ok"]
    assert of(out, ev.TaskCompleted)[0].output == "in time"

    # claude-sonnet-4-6 is overloaded on every try; the catalog lets it fall back to gpt-4o-mini
    sonnet = CATALOG.model("claude-sonnet-4-6")
    assert sonnet.fallback == "gpt-4o-mini"
    fake.set_script({"replies": [
        {"model": "claude-sonnet-4-6", "error": {"status": 529}, "times": None},
        {"model": "gpt-4o-mini", "text": "answered by the fallback"}]})
    fake.reset()
    out = run(rt, fake, dispatched("t-fallback", "hello", repository=None,
                                   model="claude-sonnet-4-6"), retries=1)
    calls = of(out, ev.ModelCall)
    assert [(c.model, c.outcome) for c in calls] == [
        ("claude-sonnet-4-6", "overloaded"), ("claude-sonnet-4-6", "overloaded"),
        ("gpt-4o-mini", "ok")]
    done = of(out, ev.TaskCompleted)[0]
    assert done.model == "gpt-4o-mini" and done.output == "answered by the fallback"
    assert [c.api for c in fake.calls] == ["anthropic", "anthropic", "openai"]

    # a bad request is not retried
    fake.set_script({"replies": [{"error": {"status": 400, "message": "bad field"}}]})
    out = run(rt, fake, dispatched("t-400", "hello", repository=None), retries=3)
    assert [c.outcome for c in of(out, ev.ModelCall)] == ["bad_request"]
    assert of(out, ev.TaskFailed)[0].failure_class == "model_error"


@pytest.mark.parametrize("via_litellm", [False, True], ids=["openai-sdk", "litellm"])
def test_openai_models_use_tools_in_openai_form(
        tmp_path: Path, fake: FakeProvider, sandbox: Sandbox, via_litellm: bool) -> None:
    repo = sample_repo(tmp_path)
    rt = runtime(tmp_path, {"sample": repo}, sandbox)
    fake.set_script({"replies": [
        tool_turn(("write_file", {"path": "hello.txt", "content": "hi\n"})),
        {"text": "wrote it"}]})
    out = run(rt, fake, dispatched("t-openai", "write hello", model="gpt-4o-mini",
                                   provider="openai"), openai_via_litellm=via_litellm)
    assert of(out, ev.TaskCompleted)[0].output == "wrote it"
    assert [c.api for c in fake.calls] == ["openai", "openai"]
    assert "write_file" in fake.calls[0].tool_names
    assert "wrote 3 chars" in fake.calls[1].last_user_text  # the tool message went back
    assert of(out, ev.WorkspaceChange)[0].files[0].path == "hello.txt"


def test_subtasks_are_capped_and_share_the_root_budget(
        tmp_path: Path, fake: FakeProvider, sandbox: Sandbox) -> None:
    teams = parse_teams({"defaults": {"max_subtasks": 2, "max_subtask_depth": 1}})
    rt = runtime(tmp_path, {}, sandbox, teams=teams)
    root_limit = 0.05
    fake.set_script({"replies": [
        tool_turn(("submit_subtask", {"name": "a", "prompt": "part a", "max_cost_usd": 0.02}),
                  ("submit_subtask", {"name": "b", "prompt": "part b", "max_cost_usd": 1.0}),
                  ("submit_subtask", {"name": "c", "prompt": "part c"})),
        {"text": "fanned out"}]})
    root = dispatched("t-root", "split the work", repository=None, max_cost_usd=root_limit,
                      allowed_tools=["submit_subtask"])
    out = run(rt, fake, root)
    tools = of(out, ev.ToolCall)
    # a: 0.02 reserved; b asked 1.0, gets what is left after the root keeps back twice its
    # latest call's worst case for its own next calls; c: the
    # team's max_subtasks (2) is reached
    assert [t.outcome for t in tools] == ["ok", "ok", "denied"]
    subs = of(out, ev.TaskSubmitted)
    assert [s.spec.name for s in subs] == ["a", "b"]
    assert all(s.spec.parent_task_id == "t-root" and s.spec.root_task_id == "t-root"
               and s.spec.depth == 1 for s in subs)
    root_spent = of(out, ev.TaskCompleted)
    # the root's second call had to fit too, so b got less than everything
    assert root_spent, of(out, ev.TaskFailed)
    reserved = sum(s.spec.max_cost_usd or 0 for s in subs)
    assert root_spent[0].cost_usd + reserved <= root_limit + 1e-12

    # each child keeps calling (long answers, a subtask it may not submit at depth 2) until its
    # share of the root's budget cannot pay for the next call
    total = root_spent[0].cost_usd
    for sub in subs:
        fake.set_script({"default": {"text": "x" * 3600, "tool_uses": [
            {"name": "submit_subtask", "input": {"name": "g", "prompt": "deeper"}}]}})
        child = ev.TaskDispatched(task_id=sub.task_id, team=sub.team, spec=sub.spec, attempt=1,
                                  model="claude-haiku-4-5", provider="anthropic", tier="small")
        child_out = run(rt, fake, child)
        denied = of(child_out, ev.ToolCall)[0]
        assert denied.outcome == "denied" and "max_subtask_depth" in denied.result_summary
        assert of(child_out, ev.TaskFailed)[0].failure_class == "budget_exceeded"
        spent = sum(c.cost_usd for c in of(child_out, ev.ModelCall))
        assert 0 < spent <= (sub.spec.max_cost_usd or 0)
        total += spent
    assert total <= root_limit + 1e-12


def test_a_task_without_repository_or_tools_gets_a_plain_answer(
        tmp_path: Path, fake: FakeProvider, sandbox: Sandbox) -> None:
    rt = runtime(tmp_path, {}, sandbox)
    fake.set_script({"replies": [{"text": "plain answer"}]})
    out = run(rt, fake, dispatched("t-plain", "summarize", repository=None,
                                   inputs={"dep-1": "OUTPUT-OF-DEP"}))
    assert [type(e).__name__ for e in out] == ["TaskStarted", "ModelCall", "TaskCompleted"]
    assert fake.calls[0].tool_names == []
    assert "OUTPUT-OF-DEP" in fake.calls[0].last_user_text  # dependency outputs in context
    assert_audit_chain(out)


def test_unregistered_repository_fails_the_attempt_clearly(
        tmp_path: Path, fake: FakeProvider, sandbox: Sandbox) -> None:
    rt = runtime(tmp_path, {}, sandbox)
    out = run(rt, fake, dispatched("t-norepo", "fix", repository="nope"))
    failed = of(out, ev.TaskFailed)[0]
    # a permanent failure class (issue 16): the coordinator fails the task, never retries it
    assert failed.failure_class == "configuration" and "'nope' is not registered" in failed.reason
    assert len(fake.calls) == 0
    with_repo = runtime(tmp_path, {"sample": sample_repo(tmp_path)}, sandbox)
    bad_ref = run(with_repo, fake, dispatched("t-noref", "fix", ref="no-such-branch"))
    failed = of(bad_ref, ev.TaskFailed)[0]
    assert failed.failure_class == "configuration" and "no-such-branch" in failed.reason


class JournalFirst:
    """A live channel that notes, for every audit event it is handed, whether the attempt's
    journal already holds it (a process killed right after the broker took the event must
    leave it in the journal, or no outcome will ever claim it)."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.seen: dict[str, bool] = {}

    def emit(self, event: ev.Event, keep: bool = False) -> None:
        if isinstance(event, ev.ModelCall | ev.ToolCall | ev.WorkspaceChange):
            state = self.journal.read(event.task_id, event.attempt) or {}
            held = {Journal.decode([a])[0].event_id for a in state.get("audit", [])}
            self.seen[event.event_id] = event.event_id in held

    def settle(self, ids: set[str], timeout_s: float = 15.0) -> list[ev.Event]:
        return []


def test_an_audit_event_is_in_the_journal_before_it_is_published(
        tmp_path: Path, fake: FakeProvider, sandbox: Sandbox) -> None:
    """The CI chaos run: the executor was SIGKILLed after its ModelCall reached the broker and
    while the journal's write was in flight; the redelivery answer, from the journal, claimed
    no audit events, and the ModelCall on the log had no outcome vouching for it."""
    repo = sample_repo(tmp_path)
    rt = runtime(tmp_path, {"sample": repo}, sandbox)
    rt.journal = Journal(tmp_path / "journal")
    live = JournalFirst(rt.journal)
    rt.live = live  # type: ignore[assignment]
    fake.set_script({"replies": [tool_turn(("read_file", {"path": "calc.py"})),
                                 {"text": "read it"}]})
    out = run(rt, fake, dispatched("t-journal-first", "read the calculator"))
    assert any(isinstance(e, ev.TaskCompleted) for e in out)
    assert len(live.seen) >= 3 and all(live.seen.values()), live.seen


@pytest.mark.parametrize("model", ["claude-haiku-4-5", "gpt-4o-mini"])
def test_a_model_call_made_in_a_traced_attempt_sends_its_trace_context(
        fake: FakeProvider, model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Either SDK's request carries the current span's traceparent to the provider (the
    anthropic SDK's `create`, the openai SDK's `post`), and the answer is read from its JSON."""
    monkeypatch.setattr(propagation, "enabled", True)
    tracer = TracerProvider().get_tracer("test")
    fake.set_script({"replies": [{"text": "traced"}]})
    with tracer.start_as_current_span("executor TaskDispatched") as span:
        expected = propagation.format_traceparent(span.get_span_context())
        turn = asyncio.run(clients(fake).achat(
            CATALOG.model(model), "be brief", [{"role": "user", "content": "hello"}], [],
            max_tokens=64, temperature=0.0, timeout_s=10.0))
    assert turn.text == "traced" and turn.model == model
    assert turn.usage.input_tokens > 0
    (call,) = fake.calls
    assert call.api == CATALOG.model(model).provider
    assert call.traceparent == expected
