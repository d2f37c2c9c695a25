"""The task manifest (apiVersion fleetplane/v1, kind AgentTask): the public intake contract.

Unknown fields are errors (extra="forbid"), never silently dropped. The same checks run for HTTP,
CLI, SDK and raw Kafka submissions (`check_spec` is applied to the Avro TaskSpec of every path).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fleetplane.core.events import TaskSpec
from fleetplane.core.failures import CONFLICT_POLICIES, FAILURE_CLASSES, FAILURE_POLICIES

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
TYPE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
MAX_PROMPT = 200_000
MAX_GLOBS = 200
PRIORITIES = ("low", "normal", "high", "critical")
POLICIES = ("retry", "escalate", "abandon", "rollback", "hold")
TIERS = ("small", "standard", "frontier")
COMMAND_RE = re.compile(r"^[A-Za-z0-9._+-]{1,64}$")
MAX_PATH = 500
MAX_IDEMPOTENCY_KEY = 200
MAX_SHORT = 200        # names, refs, tool names, task ids, label keys
MAX_LABEL_VALUE = 1000
# the executor's tools (executor/tools.py SPECS; a unit test keeps the two equal)
TOOL_NAMES: tuple[str, ...] = ("read_file", "write_file", "edit", "list_dir", "grep",
                               "run_command", "submit_subtask")
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
Short = Annotated[str, Field(min_length=1, max_length=MAX_SHORT)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Metadata(Strict):
    name: str = Field(pattern=NAME_RE.pattern, description="DNS-like task name")
    team: str | None = Field(default=None, pattern=NAME_RE.pattern,
                             description="Owning team; defaults to the caller's token's team")
    labels: dict[Short, Annotated[str, Field(max_length=MAX_LABEL_VALUE)]] = Field(
        default_factory=dict, max_length=64)


class Workspace(Strict):
    repository: str | None = Field(default=None, max_length=200,
                                   description="a registered repository (`fleetplane repo list`)")
    ref: str = Field(default="main", min_length=1, max_length=MAX_SHORT)

    @field_validator("ref")
    @classmethod
    def _ref(cls, ref: str) -> str:
        problem = ref_problem(ref)
        if problem:
            raise ValueError(f"ref {ref!r}: {problem}")
        return ref


class ModelPreference(Strict):
    preference: Literal["auto", "tier", "pinned"] = "auto"
    tier: Literal["small", "standard", "frontier"] | None = None
    name: str | None = Field(default=None, max_length=200)


class Limits(Strict):
    max_cost_usd: float | None = Field(default=None, gt=0, alias="maxCostUsd",
                                       allow_inf_nan=False)
    max_turns: int = Field(default=20, ge=1, le=1000, alias="maxTurns")
    timeout_seconds: int = Field(default=600, ge=1, le=86_400, alias="timeoutSeconds")
    max_attempts: int = Field(default=3, ge=1, le=20, alias="maxAttempts")


class Spec(Strict):
    task_type: str = Field(alias="taskType", pattern=TYPE_RE.pattern)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT)
    system_prompt: str | None = Field(default=None, alias="systemPrompt", max_length=MAX_PROMPT)
    workspace: Workspace = Field(default_factory=Workspace)
    write_scope: list[str] = Field(default_factory=list, alias="writeScope", max_length=MAX_GLOBS)
    depends_on: list[Short] = Field(default_factory=list, alias="dependsOn", max_length=100)
    priority: Literal["low", "normal", "high", "critical"] = "normal"
    model: ModelPreference = Field(default_factory=ModelPreference)
    tools: list[Short] = Field(default_factory=list, max_length=50)
    limits: Limits = Field(default_factory=Limits)
    failure_policy: Literal["retry", "escalate", "abandon", "rollback", "hold"] = Field(
        default="retry", alias="failurePolicy")
    failure_policies: dict[str, Literal["retry", "escalate", "abandon", "rollback", "hold"]] = (
        Field(default_factory=dict, alias="failurePolicies",
              description="failure class -> policy, overriding failurePolicy for that class"))
    conflict_policy: Literal["rollback", "hold"] = Field(default="rollback",
                                                         alias="conflictPolicy")
    commands: list[str] = Field(default_factory=list, max_length=50,
                                description="commands run_command may start (argv[0])")
    context_files: list[str] = Field(default_factory=list, alias="contextFiles", max_length=50)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, allow_inf_nan=False)

    @field_validator("failure_policies")
    @classmethod
    def _classes(cls, policies: dict[str, str]) -> dict[str, str]:
        for name in policies:
            if name not in FAILURE_CLASSES:
                raise ValueError(f"unknown failure class {name!r}; one of {FAILURE_CLASSES}")
        return policies

    @field_validator("tools")
    @classmethod
    def _tools(cls, tools: list[str]) -> list[str]:
        problem = tools_problem(tools)
        if problem:
            raise ValueError(problem)
        return tools

    @field_validator("commands")
    @classmethod
    def _commands(cls, commands: list[str]) -> list[str]:
        for c in commands:
            if not COMMAND_RE.match(c):
                raise ValueError(f"command {c!r}: a bare command name, no paths or spaces")
        return commands

    @field_validator("context_files")
    @classmethod
    def _files(cls, paths: list[str]) -> list[str]:
        return _relative_paths("context file", paths)

    @field_validator("write_scope")
    @classmethod
    def _globs(cls, globs: list[str]) -> list[str]:
        return _relative_paths("write scope", globs)


def _relative_paths(what: str, paths: list[str]) -> list[str]:
    """`paths` unchanged if each is a relative path or glob (glob_problem), else ValueError."""
    for path in paths:
        problem = glob_problem(path)
        if problem:
            raise ValueError(f"{what} {path!r}: {problem}")
    return paths


class TaskManifest(Strict):
    api_version: Literal["fleetplane/v1"] = Field(alias="apiVersion")
    kind: Literal["AgentTask"]
    metadata: Metadata
    spec: Spec
    idempotency_key: str | None = Field(default=None, alias="idempotencyKey", min_length=1,
                                        max_length=MAX_IDEMPOTENCY_KEY)

    def to_spec(self) -> TaskSpec:
        s = self.spec
        pref = s.model.preference
        return TaskSpec(
            name=self.metadata.name,
            task_type=s.task_type,
            prompt=s.prompt,
            system_prompt=s.system_prompt,
            repository=s.workspace.repository,
            ref=s.workspace.ref,
            write_scope=list(s.write_scope),
            depends_on=list(s.depends_on),
            priority=s.priority,
            model_preference=pref,
            tier=s.model.tier,
            model=s.model.name,
            allowed_tools=list(s.tools),
            max_cost_usd=s.limits.max_cost_usd,
            max_turns=s.limits.max_turns,
            timeout_s=s.limits.timeout_seconds,
            max_attempts=s.limits.max_attempts,
            failure_policy=s.failure_policy,
            temperature=s.temperature,
            labels=dict(self.metadata.labels),
            failure_policies=dict(s.failure_policies),
            conflict_policy=s.conflict_policy,
            allowed_commands=list(s.commands),
            context_files=list(s.context_files),
        )


def ref_problem(ref: str) -> str | None:
    """Why `ref` is not a valid git ref name (`git check-ref-format --allow-onelevel` rules, and
    no leading '-', which git would read as an option); None if it is."""
    if not ref or len(ref) > MAX_SHORT:
        return f"must be 1-{MAX_SHORT} characters"
    if ref.startswith("-"):
        return "may not begin with '-'"
    if _REF_FORBIDDEN.search(ref):
        return "may not contain spaces, control characters or any of ~ ^ : ? * [ \\"
    if ".." in ref:
        return "may not contain '..'"
    if "@{" in ref or ref == "@":
        return "may not contain '@{' or be '@'"
    if ref.startswith("/") or ref.endswith("/") or "//" in ref:
        return "may not begin or end with '/' or contain '//'"
    if ref.endswith("."):
        return "may not end with '.'"
    for part in ref.split("/"):
        if part.startswith(".") or part.endswith(".lock"):
            return "no component may begin with '.' or end with '.lock'"
    return None


def tools_problem(tools: list[str]) -> str | None:
    unknown = [t for t in tools if t not in TOOL_NAMES]
    if unknown:
        return f"unknown tool {unknown[0]!r}; tools are {', '.join(TOOL_NAMES)}"
    return None


def glob_problem(glob: str) -> str | None:
    if not glob or len(glob) > MAX_PATH:
        return f"must be 1-{MAX_PATH} characters"
    if glob.startswith("/") or "\\" in glob:
        return "must be relative, with forward slashes"
    if any(part == ".." for part in glob.split("/")):
        return "may not contain '..'"
    if "\x00" in glob:
        return "may not contain NUL"
    return None


def reference_problem(spec: TaskSpec, task_id: str | None,
                      known_repository: Callable[[str], bool] | None
                      ) -> tuple[str, str] | None:
    """What a manifest names that must exist or make sense, on every intake path: a registered
    repository, and a dependency that is not the task itself (by name or id). (field, reason),
    fields named as in the Avro TaskSpec."""
    if spec.repository is not None and known_repository is not None \
            and not known_repository(spec.repository):
        return ("spec.repository", f"repository {spec.repository!r} is not registered "
                                   "(fleetplane repo list; fleetplane repo add NAME PATH|URL)")
    for dep in spec.depends_on:
        if dep == spec.name or (task_id is not None and dep == task_id):
            return "spec.depends_on", f"{dep!r} names the task itself"
    return None


def check_spec(team: str, spec: TaskSpec, task_id: str | None = None,
               known_repository: Callable[[str], bool] | None = None
               ) -> tuple[str, str] | None:
    """Validate a TaskSpec from any path; returns (field, reason) for the first problem.
    `known_repository` (None: not checked) says whether a repository name is registered."""
    checks: list[tuple[bool, str, str]] = [
        (bool(NAME_RE.match(team)), "team", "must match " + NAME_RE.pattern),
        (bool(NAME_RE.match(spec.name)), "spec.name", "must match " + NAME_RE.pattern),
        (bool(TYPE_RE.match(spec.task_type)), "spec.task_type", "must match " + TYPE_RE.pattern),
        (0 < len(spec.prompt) <= MAX_PROMPT, "spec.prompt", f"must be 1-{MAX_PROMPT} characters"),
        (spec.priority in PRIORITIES, "spec.priority", f"must be one of {PRIORITIES}"),
        (spec.failure_policy in POLICIES, "spec.failure_policy", f"must be one of {POLICIES}"),
        (spec.tier is None or spec.tier in TIERS, "spec.tier", f"must be one of {TIERS}"),
        (spec.model_preference in ("auto", "tier", "pinned"), "spec.model_preference",
         "must be auto, tier or pinned"),
        (spec.model_preference != "pinned" or bool(spec.model), "spec.model",
         "a pinned model preference needs a model"),
        (1 <= spec.max_turns <= 1000, "spec.max_turns", "must be 1-1000"),
        (1 <= spec.timeout_s <= 86_400, "spec.timeout_s", "must be 1-86400"),
        (1 <= spec.max_attempts <= 20, "spec.max_attempts", "must be 1-20"),
        (spec.max_cost_usd is None or (math.isfinite(spec.max_cost_usd)
                                       and spec.max_cost_usd > 0), "spec.max_cost_usd",
         "must be a positive number"),
        (0.0 <= spec.temperature <= 2.0, "spec.temperature", "must be 0-2"),
        (spec.system_prompt is None or len(spec.system_prompt) <= MAX_PROMPT,
         "spec.system_prompt", f"at most {MAX_PROMPT} characters"),
        (spec.repository is None or len(spec.repository) <= MAX_SHORT, "spec.repository",
         f"at most {MAX_SHORT} characters"),
        (ref_problem(spec.ref) is None, "spec.ref",
         f"not a valid git ref name: {ref_problem(spec.ref)}"),
        (spec.model is None or len(spec.model) <= MAX_SHORT, "spec.model",
         f"at most {MAX_SHORT} characters"),
        (len(spec.allowed_tools) <= 50
         and all(0 < len(t) <= MAX_SHORT for t in spec.allowed_tools), "spec.allowed_tools",
         f"at most 50 names of 1-{MAX_SHORT} characters"),
        (tools_problem(spec.allowed_tools) is None, "spec.allowed_tools",
         str(tools_problem(spec.allowed_tools))),
        (len(spec.depends_on) <= 100
         and all(0 < len(t) <= MAX_SHORT for t in spec.depends_on), "spec.depends_on",
         f"at most 100 task ids of 1-{MAX_SHORT} characters"),
        (len(spec.labels) <= 64
         and all(0 < len(k) <= MAX_SHORT and len(v) <= MAX_LABEL_VALUE
                 for k, v in spec.labels.items()), "spec.labels",
         f"at most 64 labels, keys 1-{MAX_SHORT}, values up to {MAX_LABEL_VALUE} characters"),
        (len(spec.write_scope) <= MAX_GLOBS, "spec.write_scope", f"at most {MAX_GLOBS} globs"),
        (all(k in FAILURE_CLASSES and v in FAILURE_POLICIES
             for k, v in spec.failure_policies.items()), "spec.failure_policies",
         f"keys must be failure classes {FAILURE_CLASSES}, values policies {FAILURE_POLICIES}"),
        (spec.conflict_policy in CONFLICT_POLICIES, "spec.conflict_policy",
         f"must be one of {CONFLICT_POLICIES}"),
        (len(spec.allowed_commands) <= 50
         and all(COMMAND_RE.match(c) for c in spec.allowed_commands), "spec.allowed_commands",
         "at most 50 bare command names"),
        (len(spec.context_files) <= 50
         and all(glob_problem(p) is None for p in spec.context_files), "spec.context_files",
         "at most 50 relative paths without '..'"),
        (0 <= spec.depth <= 10, "spec.depth", "must be 0-10"),
        ((spec.parent_task_id is None) == (spec.depth == 0), "spec.parent_task_id",
         "a subtask (depth > 0) names its parent, a root task (depth 0) has none"),
    ]
    for ok, fld, reason in checks:
        if not ok:
            return fld, reason
    for g in spec.write_scope:
        problem = glob_problem(g)
        if problem:
            return "spec.write_scope", f"{g!r}: {problem}"
    return reference_problem(spec, task_id, known_repository)
