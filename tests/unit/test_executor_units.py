"""Pure pieces of the executor: message conversion for litellm, error classes, tool policy,
path confinement rules, numstat parsing, slot accounting."""

from __future__ import annotations

import time
from pathlib import Path

import anthropic
import httpx
import pytest

from fleetplane.executor.models import classify, retry_after, to_openai
from fleetplane.executor.runtime import Collect, Journal, Slot
from fleetplane.executor.sandbox import Sandbox
from fleetplane.executor.tools import ToolBox, ToolDenied, ToolPolicy
from fleetplane.executor.workspace import _numstat, branch_name


def test_anthropic_conversation_converts_to_openai_tool_messages() -> None:
    messages = [
        {"role": "user", "content": "fix it"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "looking"},
            {"type": "tool_use", "id": "c1", "name": "read_file", "input": {"path": "a.py"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "c1", "content": "print(1)",
             "is_error": False}]},
    ]
    out = to_openai("sys", messages)
    assert out[0] == {"role": "system", "content": "sys"}
    assert out[1] == {"role": "user", "content": "fix it"}
    assert out[2]["tool_calls"][0]["function"] == {"name": "read_file",
                                                   "arguments": '{"path": "a.py"}'}
    assert out[2]["content"] == "looking"
    assert out[3] == {"role": "tool", "tool_call_id": "c1", "content": "print(1)"}


def _status_error(status: int, body: str = "x",
                  headers: dict[str, str] | None = None) -> anthropic.APIStatusError:
    req = httpx.Request("POST", "http://127.0.0.1/v1/messages")
    resp = httpx.Response(status, request=req, headers=headers or {})
    cls = {429: anthropic.RateLimitError, 400: anthropic.BadRequestError,
           500: anthropic.InternalServerError}.get(status, anthropic.APIStatusError)
    return cls(body, response=resp, body=None)


@pytest.mark.parametrize(("status", "body", "kind", "retriable"), [
    (429, "slow down", "rate_limited", True),
    (529, "overloaded", "overloaded", True),
    (500, "boom", "server_error", True),
    (400, "bad field", "bad_request", False),
    (400, "prompt is too long: context window exceeded", "context_too_long", False),
])
def test_provider_errors_are_classified(status: int, body: str, kind: str,
                                        retriable: bool) -> None:
    assert classify(_status_error(status, body)) == (kind, retriable)


def test_retry_after_header_is_read() -> None:
    assert retry_after(_status_error(429, headers={"retry-after": "2"})) == 2.0
    assert retry_after(ValueError()) is None


def test_policy_is_the_union_of_manifest_and_team() -> None:
    p = ToolPolicy.of(["grep"], ["read_file"], ["make"], ["ls"])
    assert p.tools == {"grep", "read_file"} and p.commands == {"make", "ls"}


def test_confinement_rules(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_text("x")
    (tmp_path / "out").symlink_to("/etc")
    box = ToolBox(tmp_path, ToolPolicy(frozenset(), frozenset()), Sandbox())
    assert box.resolve("ok.txt") == (tmp_path / "ok.txt").resolve()
    assert box.resolve("new/dir/file.txt").parent.name == "dir"
    for bad, why in [("/etc/passwd", "absolute"), ("a/../../x", "'..'"), ("~/x", "absolute"),
                     ("out/passwd", "symlink"), (".git/config", ".git"), ("", "non-empty")]:
        with pytest.raises(ToolDenied, match=why):
            box.resolve(bad)
    denied = box.call("read_file", {"path": "ok.txt"})
    assert denied.outcome == "denied" and "not allowed by this task's policy" in denied.text


def test_numstat_and_branch_names() -> None:
    files = _numstat("3\t1\ta.py\n-\t-\tlogo.png\n")
    assert [(f.path, f.added, f.removed) for f in files] == [("a.py", 3, 1), ("logo.png", 0, 0)]
    assert branch_name("team/x y", 2) == "fleetplane/team-x-y/attempt-2"


def test_slot_windows_add_up() -> None:
    slot = Slot(0)
    slot.begin()
    slot.add("model", 0.01)
    time.sleep(0.02)
    slot.end()
    figures = slot.roll()
    assert figures["attempts"] == 1 and figures["model_s"] == pytest.approx(0.01)
    assert figures["busy_s"] + figures["idle_s"] == pytest.approx(figures["window_s"])
    assert slot.roll()["attempts"] == 0


def test_the_journal_appends_each_audit_event_and_reads_the_attempt_back(tmp_path: Path) -> None:
    """The journal is appended, not rewritten: the state a redelivery reads is the fold of its
    lines (keys replaced, audit events accumulated); a line torn by a crash is skipped, and the
    file holds one line per write (no rewrite of earlier events)."""
    j = Journal(tmp_path)
    j.write("t/1", 2, {"dispatch": "d1", "state": "running"})
    for i in range(3):
        j.append_audit("t/1", 2, {"type": "ModelCall", "json": f"{{\"i\": {i}}}"},
                       head=f"h{i}", count=i + 1, cost=0.1 * (i + 1))
    path = next(tmp_path.iterdir())
    assert len([x for x in path.read_text().splitlines() if x]) == 4
    with path.open("a") as f:
        f.write('\n{"state": "do')  # the machine crashed in the middle of a write
    state = j.read("t/1", 2)
    assert state is not None
    assert state["dispatch"] == "d1" and state["state"] == "running"
    assert state["head"] == "h2" and state["count"] == 3
    assert [a["json"] for a in state["audit"]] == ['{"i": 0}', '{"i": 1}', '{"i": 2}']
    j.write("t/1", 2, {"state": "done", "outcome": []})
    state = j.read("t/1", 2)
    assert state is not None and state["state"] == "done" and len(state["audit"]) == 3
    assert j.read("t/1", 3) is None


class _Sweep:
    """The runtime's stop event for one heartbeat sweep: every wait returns at once and is
    recorded with how many events had been emitted by then; the wait after the sweep stops."""

    def __init__(self, live: Collect, total: int) -> None:
        self.live, self.total = live, total
        self.waits: list[tuple[float, int]] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append((round(timeout or 0.0, 3), len(self.live.events)))
        return len(self.live.events) >= self.total

    def set(self) -> None:
        pass


def test_heartbeats_of_many_attempts_go_out_in_slices_spread_over_half_the_interval(
        tmp_path: Path) -> None:
    """120 running attempts: one heartbeat each per sweep, published EMIT_SLICE at a time with a
    pause between slices (before: all in one go, a burst that held the GIL while a cancel
    waited to be read: docs/executor.md, stop 20)."""
    from fleetplane.core.events import TaskHeartbeat
    from fleetplane.core.settings import Settings
    from fleetplane.executor.runtime import EMIT_SLICE, Runtime

    live = Collect()  # a live channel that keeps what was emitted
    settings = Settings(executor_slots=120, executor_heartbeat_s=0.6,
                        executor_workspaces_dir=tmp_path / "wt", data_dir=tmp_path)
    rt = Runtime(settings, "ex-1", live=live, sandbox=Sandbox())  # type: ignore[arg-type]
    try:
        for i in range(120):
            rt.begin(f"task-{i}", "platform", 1)
        sweep = _Sweep(live, 120)
        rt._stop = sweep  # type: ignore[assignment]
        rt._heartbeats()
        beats = [e for e in live.events if isinstance(e, TaskHeartbeat)]
        assert sorted(e.task_id for e in beats) == sorted(f"task-{i}" for i in range(120))
        assert EMIT_SLICE == 50
        # the interval's wait, then one pause after each of the first two slices of 50
        # (0.3 s, half the interval, over three slices), then the next interval's wait
        assert [n for _, n in sweep.waits] == [0, 50, 100, 120]
        assert [t for t, _ in sweep.waits[1:3]] == [0.1, 0.1]
    finally:
        rt.calls.close()
