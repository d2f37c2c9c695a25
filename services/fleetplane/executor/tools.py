"""The agent's tools, confined to its worktree, and the policy that decides which it may use.

Paths: relative, no `..`, no `.git`, and the resolved path (symlinks followed) must stay inside the
worktree. Commands: a bare program name from the allowed list, run by the sandbox. Anything else
is answered as denied (ToolDenied) and audited with outcome "denied".
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from fleetplane.executor.sandbox import Sandbox, SandboxUnavailable

WORKSPACE_TOOLS = ("read_file", "write_file", "edit", "list_dir", "grep", "run_command")
ALL_TOOLS = (*WORKSPACE_TOOLS, "submit_subtask")
READ_CAP = 64_000
RESULT_CAP = 16_000
GREP_MAX = 200


class ToolDenied(Exception):
    """The call breaks the workspace confinement or the task's policy."""


class ToolError(Exception):
    """The call was allowed but failed (missing file, no match, ...)."""


@dataclass(frozen=True)
class ToolPolicy:
    tools: frozenset[str]
    commands: frozenset[str]

    @classmethod
    def of(cls, spec_tools: list[str], team_tools: list[str], spec_commands: list[str],
           team_commands: list[str]) -> ToolPolicy:
        """The task may use what its manifest names plus what its team allows."""
        return cls(frozenset(spec_tools) | frozenset(team_tools),
                   frozenset(spec_commands) | frozenset(team_commands))


@dataclass(frozen=True)
class ToolOutcome:
    outcome: str  # ok | error | denied | timeout | unavailable
    text: str

    @property
    def is_error(self) -> bool:
        return self.outcome != "ok"


def _schema(props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required}


_S = {"type": "string"}
_I = {"type": "integer"}
SPECS: dict[str, dict[str, Any]] = {
    "read_file": {"description": "Read a text file of the workspace (relative path).",
                  "input_schema": _schema({"path": _S, "offset": _I, "limit": _I}, ["path"])},
    "write_file": {"description": "Create or overwrite a file of the workspace.",
                   "input_schema": _schema({"path": _S, "content": _S}, ["path", "content"])},
    "edit": {"description": "Replace an exact string in a file; `old` must occur exactly once "
                            "unless replace_all is true.",
             "input_schema": _schema({"path": _S, "old": _S, "new": _S,
                                      "replace_all": {"type": "boolean"}},
                                     ["path", "old", "new"])},
    "list_dir": {"description": "List a directory of the workspace ('.' is the root).",
                 "input_schema": _schema({"path": _S}, [])},
    "grep": {"description": "Search files for a regular expression; returns path:line: text.",
             "input_schema": _schema({"pattern": _S, "path": _S, "glob": _S}, ["pattern"])},
    "run_command": {"description": "Run an allowed program (no shell) in the workspace, in a "
                                   "sandbox without network. `command` is split like a shell "
                                   "would, but no shell features apply.",
                    "input_schema": _schema({"command": _S, "timeout_s": _I}, ["command"])},
    "submit_subtask": {"description": "Submit a subtask (runs separately; its cost comes out "
                                      "of this task's budget).",
                       "input_schema": _schema({"name": _S, "prompt": _S, "task_type": _S,
                                                "max_cost_usd": {"type": "number"},
                                                "max_subtasks": _I}, ["name", "prompt"])},
}


def anthropic_tools(names: list[str]) -> list[dict[str, Any]]:
    return [{"name": n, **SPECS[n]} for n in names]


def openai_tools(names: list[str]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": n, "description": SPECS[n]["description"],
                                              "parameters": SPECS[n]["input_schema"]}}
            for n in names]


def _cap(text: str, cap: int = RESULT_CAP) -> str:
    return text if len(text) <= cap else f"{text[:cap]}\n[... {len(text) - cap} chars elided]"


@dataclass
class ToolBox:
    """The tools of one attempt. `root` is the worktree (None: no workspace tools)."""

    root: Path | None
    policy: ToolPolicy
    sandbox: Sandbox
    cancelled: Callable[[], bool] = lambda: False
    deadline_s: Callable[[], float] = lambda: 1e9
    subtask: Callable[[dict[str, Any]], str] | None = None
    offered: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.root is not None:
            self.root = self.root.resolve()

    # -- confinement ---------------------------------------------------------------------------
    def resolve(self, rel: Any) -> Path:
        if self.root is None:
            raise ToolDenied("this task has no workspace")
        if not isinstance(rel, str) or not rel or "\x00" in rel:
            raise ToolDenied("path must be a non-empty relative path")
        p = PurePosixPath(rel)
        if p.is_absolute() or rel.startswith("~"):
            raise ToolDenied(f"absolute path {rel!r} is not allowed: use a path relative to "
                             "the workspace")
        if ".." in p.parts:
            raise ToolDenied(f"path {rel!r} uses '..': paths must stay inside the workspace")
        if ".git" in p.parts:
            raise ToolDenied(".git is not accessible to the agent")
        real = (self.root / p).resolve()
        if real != self.root and self.root not in real.parents:
            raise ToolDenied(f"path {rel!r} resolves outside the workspace (symlink escape)")
        return real

    # -- dispatch ------------------------------------------------------------------------------
    def call(self, name: str, args: dict[str, Any]) -> ToolOutcome:
        try:
            if name not in ALL_TOOLS:
                raise ToolDenied(f"unknown tool {name!r}")
            if name not in self.policy.tools or name not in self.offered:
                raise ToolDenied(f"tool {name!r} is not allowed by this task's policy")
            if not isinstance(args, dict):
                raise ToolError("arguments must be an object")
            return getattr(self, f"_{name}")(args)  # type: ignore[no-any-return]
        except ToolDenied as exc:
            return ToolOutcome("denied", f"denied: {exc}")
        except SandboxUnavailable as exc:
            return ToolOutcome("unavailable", f"refused: the sandbox is unavailable ({exc}); "
                                              "the command was not run")
        except (ToolError, OSError, UnicodeDecodeError, re.error, ValueError, KeyError) as exc:
            return ToolOutcome("error", f"error: {type(exc).__name__}: {exc}")

    def _read_file(self, a: dict[str, Any]) -> ToolOutcome:
        path = self.resolve(a["path"])
        if not path.is_file():
            raise ToolError(f"{a['path']} is not a file")
        text = path.read_bytes()[: 4 * READ_CAP].decode("utf-8")
        lines = text.splitlines(keepends=True)
        offset = max(0, int(a.get("offset") or 0))
        limit = int(a.get("limit") or len(lines))
        return ToolOutcome("ok", _cap("".join(lines[offset:offset + limit]), READ_CAP))

    def _write_file(self, a: dict[str, Any]) -> ToolOutcome:
        path = self.resolve(a["path"])
        content = a["content"]
        if not isinstance(content, str):
            raise ToolError("content must be a string")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.resolve(a["path"])  # a parent created above may not be a symlink out
        path.write_text(content)
        return ToolOutcome("ok", f"wrote {len(content)} chars to {a['path']}")

    def _edit(self, a: dict[str, Any]) -> ToolOutcome:
        path = self.resolve(a["path"])
        old, new = a["old"], a["new"]
        if not isinstance(old, str) or not isinstance(new, str) or not old:
            raise ToolError("old (non-empty) and new must be strings")
        text = path.read_text()
        n = text.count(old)
        if n == 0:
            raise ToolError(f"`old` not found in {a['path']}")
        if n > 1 and not a.get("replace_all"):
            raise ToolError(f"`old` occurs {n} times in {a['path']}; make it unique or set "
                            "replace_all")
        path.write_text(text.replace(old, new))
        return ToolOutcome("ok", f"replaced {n if a.get('replace_all') else 1} occurrence(s)")

    def _list_dir(self, a: dict[str, Any]) -> ToolOutcome:
        path = self.resolve(a.get("path") or ".")
        if not path.is_dir():
            raise ToolError(f"{a.get('path')} is not a directory")
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir()
                       if p.name != ".git")
        return ToolOutcome("ok", _cap("\n".join(names)))

    def _grep(self, a: dict[str, Any]) -> ToolOutcome:
        assert self.root is not None
        regex = re.compile(str(a["pattern"]))
        base = self.resolve(a.get("path") or ".")
        glob = str(a.get("glob") or "*")
        candidates = [base] if base.is_file() else sorted(base.rglob(glob))
        hits: list[str] = []
        for f in candidates:
            if len(hits) >= GREP_MAX:
                break
            rel = f.relative_to(self.root)
            if ".git" in rel.parts or f.is_symlink() or not f.is_file():
                continue
            try:
                lines = f.read_text().splitlines()
            except (UnicodeDecodeError, OSError):
                continue
            for i, line in enumerate(lines, 1):
                if regex.search(line):
                    hits.append(f"{rel}:{i}: {line[:300]}")
                    if len(hits) >= GREP_MAX:
                        break
        return ToolOutcome("ok", _cap("\n".join(hits) or "no matches"))

    def _run_command(self, a: dict[str, Any]) -> ToolOutcome:
        assert self.root is not None
        raw = a["command"]
        argv = [str(x) for x in raw] if isinstance(raw, list) else shlex.split(str(raw))
        if not argv:
            raise ToolError("empty command")
        program = argv[0]
        if "/" in program:
            raise ToolDenied(f"{program!r}: give a bare program name, not a path")
        if program not in self.policy.commands:
            allowed = ", ".join(sorted(self.policy.commands)) or "none"
            raise ToolDenied(f"command {program!r} is not allowed (allowed: {allowed})")
        timeout = min(float(a.get("timeout_s") or self.sandbox.limits.timeout_s),
                      max(1.0, self.deadline_s()))
        result = self.sandbox.run(argv, self.root, timeout, self.cancelled)
        outcome = ("timeout" if result.timed_out else "error" if result.cancelled
                   else "ok" if result.exit_code == 0 else "error")
        return ToolOutcome(outcome, _cap(result.summary()))

    def _submit_subtask(self, a: dict[str, Any]) -> ToolOutcome:
        if self.subtask is None:
            raise ToolDenied("subtasks are not available to this task")
        return ToolOutcome("ok", self.subtask(a))


def summarize_args(args: Any) -> str:
    """The arguments as audited (JSON, long strings cut)."""
    def cut(v: Any) -> Any:
        if isinstance(v, str) and len(v) > 2000:
            return v[:2000] + f"...[{len(v) - 2000} chars]"
        if isinstance(v, dict):
            return {k: cut(x) for k, x in v.items()}
        if isinstance(v, list):
            return [cut(x) for x in v]
        return v
    return json.dumps(cut(args), ensure_ascii=False, sort_keys=True)[:8000]
