"""Pure pieces of the executor: message conversion for litellm, error classes, tool policy,
path confinement rules, numstat parsing, slot accounting."""

from __future__ import annotations

import time
from pathlib import Path

import anthropic
import httpx
import pytest

from fleetplane.executor.models import classify, retry_after, to_openai
from fleetplane.executor.runtime import Slot
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
