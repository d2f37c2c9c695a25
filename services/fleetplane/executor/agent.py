"""The agent loop of one attempt: context, model turns with tools, limits, retries, audit.

Every ModelCall / ToolCall / WorkspaceChange is linked into the attempt's audit hash chain and
emitted as it happens; the outcome (returned) carries the chain's head and count."""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetplane.core import failures
from fleetplane.core.auditchain import A, Chain
from fleetplane.core.catalog import Catalog, Model
from fleetplane.core.events import (
    Event,
    ModelCall,
    TaskCompleted,
    TaskDispatched,
    TaskFailed,
    TaskSpec,
    TaskSubmitted,
    ToolCall,
    WorkspaceChange,
    derived_id,
)
from fleetplane.core.logging import get_logger
from fleetplane.executor.models import ModelCallError, ModelClients, ModelTurn
from fleetplane.executor.runtime import Emitter, Journal, Running, Runtime
from fleetplane.executor.tools import (
    ALL_TOOLS,
    WORKSPACE_TOOLS,
    ToolBox,
    ToolDenied,
    ToolPolicy,
    anthropic_tools,
    summarize_args,
)
from fleetplane.executor.workspace import WorkspaceConfigError, WorkspaceError, Worktree

log = get_logger(__name__)
SUBTASK_ALLOWANCE = "fleetplane.subtask_allowance"
CONTEXT_SHARE = 0.5  # of the window, for the first message's context (files, inputs)
KEEP_RECENT = 4  # messages at the end never elided
BACKOFF_CAP_S = 10.0
SYSTEM_TOOLS = ("You are an agent working in a git worktree of the repository {repo}. Use the "
                "tools to read, change and test the code; paths are relative to the worktree. "
                "Commands run without network in a sandbox. When done, answer with a short "
                "summary of what you changed and no tool call.")


class AttemptFailed(Exception):
    def __init__(self, failure_class: str, reason: str) -> None:
        super().__init__(reason)
        self.failure_class = failure_class


def chars_to_tokens(chars: int) -> int:
    return max(1, math.ceil(chars / 4))


@dataclass
class Budget:
    limit: float | None
    spent: float = 0.0
    reserved: float = 0.0

    def remaining(self) -> float | None:
        return None if self.limit is None else self.limit - self.spent - self.reserved


class Agent:
    def __init__(self, rt: Runtime, catalog: Catalog, clients: ModelClients, executor_id: str,
                 event: TaskDispatched, emit: Emitter, run: Running,
                 journal_base: dict[str, Any] | None = None) -> None:
        self.rt, self.catalog, self.clients = rt, catalog, clients
        self.executor_id, self.event, self.emitter, self.run_ = executor_id, event, emit, run
        self.spec: TaskSpec = event.spec
        self.team = rt.teams.policy(event.team)
        self.model = catalog.model(event.model)
        self.chain = Chain()
        self.budget = Budget(self.spec.max_cost_usd)
        self.started = time.monotonic()
        self.deadline = self.started + self.spec.timeout_s
        self.model_calls = 0
        self.tool_calls = 0
        self.tokens = 0
        self.subtasks: list[TaskSubmitted] = []
        self.subtask_units = 0
        self.last_estimate = 0.0  # worst-case cost of the latest call: kept back from subtasks
        self.final_model = self.model.name
        self.journal_base = journal_base
        self.audited: list[dict[str, str]] = []  # the audit events, as the journal keeps them
        settings = clients.settings
        self.retries = settings.model_max_retries
        self.max_tokens = settings.executor_max_output_tokens
        self.token_limit = settings.executor_max_tokens_per_task
        self.backoff = settings.executor_retry_backoff_s

    # -- audit ---------------------------------------------------------------------------------
    def _audit(self, event: A) -> A:
        linked = self.chain.link(event)
        if self.rt.journal is not None and self.journal_base is not None:
            # the events themselves too: a live one the broker never got (the process was
            # killed before its acknowledgement) is re-published with the interrupted outcome.
            # Journal first, then the live channel: killed in between, the journal holds an
            # event the log does not (the redelivery answer publishes it); the other order left
            # a ModelCall on the log that no outcome claimed (the CI chaos run: killed while
            # the journal's write was in flight, the answer claimed 0 audit events)
            entry = Journal.encode([linked])[0]
            self.audited.append(entry)
            self.rt.journal.append_audit(self.event.task_id, self.event.attempt, entry,
                                         head=self.chain.head, count=self.chain.count,
                                         cost=self.budget.spent)
        self.emitter.emit(linked, keep=True)
        return linked

    def _id(self, tag: str) -> str:
        return derived_id(self.event.event_id, tag)

    # -- the attempt ---------------------------------------------------------------------------
    def run(self) -> list[Event]:
        ev, spec = self.event, self.spec
        wt: Worktree | None = None
        keep_branch = False
        try:
            if self.run_.cancel.is_set():
                raise AttemptFailed(failures.CANCELLED, "cancelled before it started")
            if spec.repository:
                try:
                    wt = self.rt.workspaces.create(spec.repository, ev.task_id, ev.attempt,
                                                   spec.ref)
                except WorkspaceConfigError as exc:  # permanent: never retried
                    raise AttemptFailed(failures.CONFIGURATION, f"workspace: {exc}") from exc
                except WorkspaceError as exc:
                    raise AttemptFailed(failures.TOOL_ERROR, f"workspace: {exc}") from exc
            box = self._toolbox(wt)
            system = spec.system_prompt
            if box.offered and wt is not None:
                system = (system + "\n\n" if system else "") + SYSTEM_TOOLS.format(
                    repo=spec.repository)
            messages: list[dict[str, Any]] = [
                {"role": "user", "content": self._context(box, wt)}]
            answer = self._loop(system, messages, box)
            if wt is not None:
                keep_branch = self._commit(wt)
            out: list[Event] = [ev.derive(
                TaskCompleted, event_id=self._id("completed"), attempt=ev.attempt,
                model=self.final_model, output=answer, cost_usd=self.budget.spent,
                duration_ms=int((time.monotonic() - self.started) * 1000),
                audit_head=self.chain.head, audit_count=self.chain.count)]
            return out + list(self.subtasks)
        except AttemptFailed as exc:
            log.warning("attempt failed", failure_class=exc.failure_class, reason=str(exc),
                        attempt=ev.attempt)
            return [self._failed(exc.failure_class, str(exc))]
        except Exception as exc:  # a bug must still end the attempt with an outcome
            log.exception("attempt crashed", attempt=ev.attempt)
            return [self._failed(failures.TOOL_ERROR,
                                 f"executor error: {type(exc).__name__}: {exc}")]
        finally:
            if wt is not None:
                try:
                    self.rt.workspaces.remove(wt, delete_branch=not keep_branch)
                except WorkspaceError:
                    log.exception("worktree removal failed", path=str(wt.path))

    def _failed(self, failure_class: str, reason: str) -> TaskFailed:
        ev = self.event
        return ev.derive(TaskFailed, event_id=self._id("failed"), attempt=ev.attempt,
                         failure_class=failure_class, reason=reason[:2000], final=False,
                         cost_usd=self.budget.spent, audit_head=self.chain.head,
                         audit_count=self.chain.count)

    def _toolbox(self, wt: Worktree | None) -> ToolBox:
        spec = self.spec
        policy = ToolPolicy.of(spec.allowed_tools, self.team.tools, spec.allowed_commands,
                           self.team.commands)
        offered: list[str] = []
        if self.model.tool_use and wt is not None:
            offered = [t for t in ALL_TOOLS if t in policy.tools]
        elif self.model.tool_use and "submit_subtask" in spec.allowed_tools:
            offered = ["submit_subtask"]
        return ToolBox(wt.path if wt else None, policy, self.rt.sandbox,
                       cancelled=self.run_.cancel.is_set,
                       deadline_s=lambda: self.deadline - time.monotonic(),
                       subtask=self._submit_subtask, offered=offered)

    # -- context -------------------------------------------------------------------------------
    def _context(self, box: ToolBox, wt: Worktree | None) -> str:
        """The task prompt, then dependency outputs, then the named files, within a share of
        the context window (sections cut in that order of priority; the prompt never)."""
        spec = self.spec
        allowance = int(self.model.context_window * CONTEXT_SHARE * 4) - len(spec.prompt)
        parts = [spec.prompt]
        sections: list[tuple[str, str]] = [
            (f"Output of dependency task {tid}", out) for tid, out in
            sorted(self.event.inputs.items())]
        if wt is not None:
            for pattern in spec.context_files:
                for path in self._context_paths(box, wt.path, pattern):
                    try:
                        text = path.read_text()
                    except (OSError, UnicodeDecodeError):
                        continue
                    sections.append((f"File {path.relative_to(wt.path)}", text))
        for title, text in sections:
            if allowance <= 200:
                parts.append(f"[{title}: omitted, the context window is full]")
                continue
            if len(text) > allowance:
                text = text[:allowance] + f"\n[... cut: {len(text) - allowance} chars]"
            allowance -= len(text) + len(title) + 8
            parts.append(f"--- {title} ---\n{text}")
        return "\n\n".join(parts)

    @staticmethod
    def _context_paths(box: ToolBox, root: Path, pattern: str) -> list[Path]:
        try:
            if any(c in pattern for c in "*?["):
                found = [p for p in sorted(root.glob(pattern)) if p.is_file()][:50]
                return [box.resolve(str(p.relative_to(root))) for p in found]
            p = box.resolve(pattern)
            return [p] if p.is_file() else []
        except (ToolDenied, ValueError):
            return []

    # -- the loop ------------------------------------------------------------------------------
    def _loop(self, system: str | None, messages: list[dict[str, Any]], box: ToolBox) -> str:
        tools = box.offered
        for _turn in range(self.spec.max_turns):
            turn = self._call(system, messages, tools)
            messages.append({"role": "assistant",
                             "content": turn.blocks or [{"type": "text", "text": turn.text}]})
            if not turn.tool_uses:
                return turn.text
            results = []
            for use in turn.tool_uses:
                self._check_running()
                start = time.perf_counter()
                result = box.call(use.name, use.input)
                took = time.perf_counter() - start
                self.run_.slot.add("tool", took)
                index = self.tool_calls
                self.tool_calls += 1
                self._audit(self.event.derive(
                    ToolCall, event_id=self._id(f"tool-call-{index}"),
                    attempt=self.event.attempt, call_index=index, tool=use.name,
                    arguments=summarize_args(use.input), outcome=result.outcome,
                    result_summary=result.text[:500], duration_ms=took * 1000))
                results.append({"type": "tool_result", "tool_use_id": use.id,
                                "content": result.text, "is_error": result.is_error})
            messages.append({"role": "user", "content": results})
        raise AttemptFailed(failures.LIMIT_EXCEEDED,
                            f"max_turns ({self.spec.max_turns}) reached without a final answer")

    def _check_running(self) -> None:
        if self.run_.cancel.is_set():
            raise AttemptFailed(failures.CANCELLED, "cancelled by request")
        if time.monotonic() >= self.deadline:
            raise AttemptFailed(failures.TIMEOUT,
                                f"wall time limit of {self.spec.timeout_s}s reached")

    def _request_chars(self, system: str | None, messages: list[dict[str, Any]],
                       tools: list[str]) -> int:
        return (len(system or "") + len(json.dumps(messages, ensure_ascii=False))
                + (len(json.dumps(anthropic_tools(tools))) if tools else 0))

    def _fit(self, model: Model, system: str | None, messages: list[dict[str, Any]],
             tools: list[str]) -> int:
        """Estimated input tokens after eliding the oldest tool results that do not fit."""
        limit = model.context_window - self.max_tokens - 256
        est = chars_to_tokens(self._request_chars(system, messages, tools))
        i = 1
        while est > limit and i < len(messages) - KEEP_RECENT:
            content = messages[i]["content"]
            if isinstance(content, list):
                for block in content:
                    if block.get("type") == "tool_result" and \
                            not str(block.get("content", "")).startswith("[elided"):
                        block["content"] = (f"[elided to fit the context window: "
                                            f"{len(str(block['content']))} chars]")
            i += 1
            est = chars_to_tokens(self._request_chars(system, messages, tools))
        if est > limit:
            raise AttemptFailed(failures.LIMIT_EXCEEDED,
                                f"the conversation (~{est} tokens) does not fit {model.name}'s "
                                f"context window even after eliding old tool results")
        return est

    def _preflight(self, model: Model, system: str | None, messages: list[dict[str, Any]],
                   tools: list[str]) -> None:
        self._check_running()
        est_in = self._fit(model, system, messages, tools)
        if self.tokens + est_in + self.max_tokens > self.token_limit:
            raise AttemptFailed(failures.LIMIT_EXCEEDED,
                                f"token limit: {self.tokens} used, the next call needs up to "
                                f"{est_in + self.max_tokens} of {self.token_limit}")
        remaining = self.budget.remaining()
        if remaining is not None:
            p = model.prices
            estimate = est_in * p.input + self.max_tokens * p.output
            self.last_estimate = estimate
            if estimate > remaining:
                raise AttemptFailed(failures.BUDGET_EXCEEDED,
                                    f"the next call to {model.name} could cost ${estimate:.6f} "
                                    f"(~{est_in} input tokens, up to {self.max_tokens} output); "
                                    f"${remaining:.6f} of ${self.budget.limit} left")

    def _call(self, system: str | None, messages: list[dict[str, Any]],
              tools: list[str]) -> ModelTurn:
        """One turn: retries retriable errors with exponential backoff, then the catalog's
        fallback model; every call audited."""
        candidates = [self.model]
        if self.model.fallback:
            fb = self.catalog.model(self.model.fallback)
            if fb.tool_use or not tools:
                candidates.append(fb)
        last: ModelCallError | None = None
        for model in candidates:
            for retry in range(self.retries + 1):
                self._preflight(model, system, messages, tools)
                try:
                    return self._one_call(model, system, messages, tools)
                except ModelCallError as exc:
                    last = exc
                    self._check_running()  # the SDK's timeout was the attempt's wall time
                    if not exc.retriable:
                        raise AttemptFailed(failures.MODEL_ERROR,
                                            f"{exc.kind}: {exc}") from exc
                    if retry < self.retries:
                        delay = min(BACKOFF_CAP_S, max(exc.retry_after_s or 0.0,
                                                       self.backoff * 2 ** retry))
                        if self.run_.cancel.wait(min(delay, max(0.0, self.deadline
                                                                - time.monotonic()))):
                            raise AttemptFailed(failures.CANCELLED,
                                                "cancelled by request") from exc
        assert last is not None
        tried = ", ".join(m.name for m in candidates)
        raise AttemptFailed(failures.MODEL_ERROR,
                            f"{last.kind}: {last} (after {self.retries} retries; tried {tried})")

    def _one_call(self, model: Model, system: str | None, messages: list[dict[str, Any]],
                  tools: list[str]) -> ModelTurn:
        index = self.model_calls
        self.model_calls += 1
        remaining_s = max(0.5, self.deadline - time.monotonic())
        timeout = min(self.clients.settings.model_timeout_s, remaining_s)
        start = time.perf_counter()
        fut: Future[ModelTurn] = self.rt.calls.submit(self.clients.achat(
            model, system, messages, tools, self.max_tokens, self.spec.temperature, timeout))
        abandoned: str | None = None
        while True:
            self.run_.wait(fut, self.deadline - time.monotonic())
            if fut.done():
                try:
                    turn = fut.result()
                    break
                except ModelCallError as exc:
                    self.run_.slot.add("model", time.perf_counter() - start)
                    self._audit(self._model_call(index, model, None, exc.latency_ms, exc.kind,
                                                 str(exc)[:1000]))
                    raise
            if self.run_.cancel.is_set():
                abandoned = "cancelled"
            elif time.monotonic() >= self.deadline:
                abandoned = "timeout"
            else:
                continue
            fut.cancel()
            break
        took = time.perf_counter() - start
        self.run_.slot.add("model", took)
        if abandoned is not None:
            self._audit(self._model_call(index, model, None, took * 1000, abandoned,
                                         "abandoned in flight; the provider may still bill it"))
            self._check_running()
            raise AttemptFailed(failures.TIMEOUT, "wall time limit reached")
        cost = model.cost(turn.usage)
        self.budget.spent += cost
        u = turn.usage
        self.tokens += (u.input_tokens + u.output_tokens + u.cache_creation_input_tokens
                        + u.cache_read_input_tokens)
        self.final_model = model.name
        self._audit(self._model_call(index, model, turn, turn.latency_ms, "ok", None))
        return turn

    def _model_call(self, index: int, model: Model, turn: ModelTurn | None, latency_ms: float,
                    outcome: str, error: str | None) -> ModelCall:
        u = turn.usage if turn is not None else None
        return self.event.derive(
            ModelCall, event_id=self._id(f"model-call-{index}"), attempt=self.event.attempt,
            call_index=index, model=model.name, provider=model.provider, tier=model.tier,
            input_tokens=u.input_tokens if u else 0, output_tokens=u.output_tokens if u else 0,
            cache_creation_input_tokens=u.cache_creation_input_tokens if u else 0,
            cache_read_input_tokens=u.cache_read_input_tokens if u else 0,
            cost_usd=model.cost(u) if u else 0.0, latency_ms=latency_ms, outcome=outcome,
            error=error, stop_reason=turn.stop_reason if turn else None)

    # -- workspace -----------------------------------------------------------------------------
    def _commit(self, wt: Worktree) -> bool:
        ev = self.event
        try:
            commit = self.rt.workspaces.commit(wt, ev.task_id, ev.attempt, self.spec.name)
        except WorkspaceError as exc:
            raise AttemptFailed(failures.TOOL_ERROR, f"commit failed: {exc}") from exc
        if commit.sha is None:
            return False
        self._audit(ev.derive(WorkspaceChange, event_id=self._id("workspace-change"),
                              attempt=ev.attempt, repository=wt.repository, branch=wt.branch,
                              commit=commit.sha, files=commit.files))
        return True

    # -- subtasks ------------------------------------------------------------------------------
    def _submit_subtask(self, a: dict[str, Any]) -> str:
        """Fan out. Depth and count are capped per tree (team policy); the subtask's dollar
        limit is reserved from this task's remaining budget, so a tree never spends more than
        its root's max_cost_usd. Subtasks are published with the attempt's outcome (once, in
        its transaction), and only if the attempt completes."""
        spec, ev = self.spec, self.event
        depth = spec.depth + 1
        if depth > self.team.max_subtask_depth:
            raise ToolDenied(f"subtask depth {depth} exceeds the team's max_subtask_depth "
                             f"({self.team.max_subtask_depth})")
        allowance = (self.team.max_subtasks if spec.depth == 0
                     else int(spec.labels.get(SUBTASK_ALLOWANCE, "0") or 0))
        if self.subtask_units >= allowance:
            raise ToolDenied(f"this task tree may submit no more subtasks here "
                             f"(allowance {allowance})")
        name, prompt = str(a.get("name") or "").strip(), str(a.get("prompt") or "").strip()
        if not name or not prompt:
            raise ToolDenied("a subtask needs a name and a prompt")
        remaining = self.budget.remaining()
        wanted = a.get("max_cost_usd")
        cost: float | None
        if remaining is None:
            cost = float(wanted) if wanted else None
        else:
            # the parent keeps back what its next call may cost (its latest call's worst case)
            spare = remaining - 2 * self.last_estimate
            cost = min(float(wanted), spare) if wanted else spare / 2
            if cost <= 0:
                raise ToolDenied(f"no budget left for a subtask (${remaining:.6f} remaining, "
                                 f"${2 * self.last_estimate:.6f} kept for this task's own "
                                 "next calls)")
        child_allowance = max(0, min(int(a.get("max_subtasks") or 0),
                                     allowance - self.subtask_units - 1))
        index = len(self.subtasks)
        child_id = f"{ev.task_id[:80]}.s{ev.attempt}-{index}"
        child = TaskSpec(
            name=name[:200], task_type=str(a.get("task_type") or spec.task_type),
            prompt=prompt, repository=spec.repository, ref=spec.ref,
            allowed_tools=list(spec.allowed_tools), allowed_commands=list(spec.allowed_commands),
            max_cost_usd=cost, max_turns=spec.max_turns, timeout_s=spec.timeout_s,
            labels={**spec.labels, SUBTASK_ALLOWANCE: str(child_allowance)},
            parent_task_id=ev.task_id, root_task_id=spec.root_task_id or ev.task_id,
            depth=depth)
        if cost is not None:
            self.budget.reserved += cost
        self.subtask_units += 1 + child_allowance
        self.subtasks.append(ev.derive(TaskSubmitted, event_id=self._id(f"subtask-{index}"),
                                       task_id=child_id, spec=child, source="executor",
                                       idempotency_key=child_id))
        budget = f"${cost:.6f}" if cost is not None else "no dollar limit"
        return (f"subtask {child_id} will be submitted when this task completes (budget "
                f"{budget} reserved from this task's)")


__all__ = ["WORKSPACE_TOOLS", "Agent", "AttemptFailed"]
