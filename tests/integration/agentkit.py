"""Helpers for the agent tests: a sample git repository, dispatches, a runtime, audit checks."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from fleetplane.core import events as ev
from fleetplane.core.auditchain import verify
from fleetplane.core.settings import Settings
from fleetplane.core.teams import TeamsConfig
from fleetplane.executor.models import ModelClients
from fleetplane.executor.runtime import Runtime
from fleetplane.executor.sandbox import Sandbox
from fleetplane.fakeprovider import FakeProvider

CALC = "def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n"
TEST_CALC = (
    "import unittest\n\nfrom calc import add, mul\n\n\n"
    "class CalcTest(unittest.TestCase):\n"
    "    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n\n"
    "    def test_mul(self):\n        self.assertEqual(mul(2, 3), 6)\n\n\n"
    "if __name__ == '__main__':\n    unittest.main()\n"
)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                          check=True, capture_output=True, text=True).stdout


def sample_repo(root: Path, extra: dict[str, str] | None = None,
                symlinks: dict[str, str] | None = None) -> Path:
    """A small repository with a failing test (add subtracts), committed on main."""
    repo = root / "sample"
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    (repo / "calc.py").write_text(CALC)
    (repo / "test_calc.py").write_text(TEST_CALC)
    (repo / "README.md").write_text("# sample\n")
    for name, text in (extra or {}).items():
        (repo / name).write_text(text)
    for name, target in (symlinks or {}).items():
        (repo / name).symlink_to(target)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "initial")
    return repo


def dispatched(task_id: str, prompt: str, *, repository: str | None = "sample",
               model: str = "claude-haiku-4-5", provider: str = "anthropic",
               team: str = "payments", attempt: int = 1, action: str = "run",
               inputs: dict[str, str] | None = None, **spec: Any) -> ev.TaskDispatched:
    s = ev.TaskSpec(name=f"fix {task_id}", task_type="codegen", prompt=prompt,
                    repository=repository, **spec)
    return ev.TaskDispatched(task_id=task_id, team=team, spec=s, attempt=attempt, model=model,
                             provider=provider, tier="small", action=action,
                             inputs=inputs or {})


def clients(fake: FakeProvider, retries: int = 0, timeout_s: float = 10.0,
            openai_via_litellm: bool = False) -> ModelClients:
    return ModelClients(Settings(anthropic_base_url=fake.base_url,
                                 openai_base_url=fake.openai_base_url,
                                 model_max_retries=retries, model_timeout_s=timeout_s,
                                 executor_retry_backoff_s=0.01,
                                 openai_via_litellm=openai_via_litellm))


def runtime(tmp: Path, repos: dict[str, Path], sandbox: Sandbox,
            teams: TeamsConfig | None = None, **settings: Any) -> Runtime:
    s = Settings(executor_repositories={k: str(v) for k, v in repos.items()},
                 executor_workspaces_dir=tmp / "worktrees", executor_slots=4, **settings)
    return Runtime(s, "test-executor", teams=teams, sandbox=sandbox)


def tool_turn(*uses: tuple[str, dict[str, Any]], text: str | None = None) -> dict[str, Any]:
    return {"text": text, "tool_uses": [{"name": n, "input": i} for n, i in uses]}


def of(events: list[ev.Event], cls: type[Any]) -> list[Any]:
    return [e for e in events if isinstance(e, cls)]


def assert_audit_chain(events: list[ev.Event]) -> None:
    """The attempt's audit events verify against the head/count on its outcome."""
    audit = [e for e in events if isinstance(e, ev.ModelCall | ev.ToolCall | ev.WorkspaceChange)]
    outcome = next(e for e in events if isinstance(e, ev.TaskCompleted | ev.TaskFailed))
    verdict = verify(audit, outcome.audit_head, outcome.audit_count)
    assert verdict.ok, verdict.problems
    assert outcome.audit_count == len(audit) > 0
