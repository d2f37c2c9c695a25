"""Ingest HTTP API (FastAPI): the front door teams share.

Every call under /v1 names its team through its token (``Authorization: Bearer fpt_...``):
401 without a valid token, 429 after too many failed token checks from one address. A team token
sees only its team's tasks (another team's task is 404, another team's list 403); an admin token
sees all. Submissions: 413 above the size limit, 400 for a body that is not a JSON object, 422
naming each field at fault, 403 for a manifest of another team, 429 with Retry-After beyond the
team's rate, 409 for an idempotency key reused with a different manifest; 202 once the
TaskSubmitted is acknowledged by the broker (200 when the key names a task that exists already).
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from fleetplane.core.errors import Retriable
from fleetplane.core.events import ControlCommand, TaskSpec, TaskSubmitted
from fleetplane.core.kafka import EventProducer
from fleetplane.core.periods import period_name
from fleetplane.core.states import STATES, TERMINAL_STATES
from fleetplane.core.teams import TeamsConfig
from fleetplane.ingest.idempotency import (
    Marks,
    PublishedKeys,
    lost_task,
    resubmission,
    spec_digest,
    task_id_for,
)
from fleetplane.ingest.kvtopic import TopicWriter
from fleetplane.ingest.manifest import NAME_RE, TaskManifest, reference_problem
from fleetplane.ingest.names import NameIndex, resolve
from fleetplane.ingest.ratelimit import Limiter
from fleetplane.ingest.repositories import REPOSITORIES_TOPIC, RepositoryRegistry, record_for
from fleetplane.ingest.taskview import AccountingUnavailable, TaskView
from fleetplane.ingest.tokens import Principal, TokenStore
from fleetplane.metrics.http import instrument_requests, mount_metrics

TASK_ID_RE = r"^[A-Za-z0-9._-]{1,128}$"
SOURCES = ("http", "cli", "sdk")
MAX_LIST = 10_000
MAX_BATCH = 1_000


class ApiError(Exception):
    def __init__(self, status: int, message: str, errors: list[dict[str, str]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors
        self.headers = headers or {}


@dataclass
class Intake:
    """What the API needs (built by the composition root, ingest.main, or a test)."""

    producer: EventProducer
    tokens: TokenStore
    marks: Marks
    teams: TeamsConfig
    view: TaskView
    # registered repositories (None: repository names are not checked; tests of other things)
    repositories: RepositoryRegistry | None = None
    writer: TopicWriter | None = None  # publishes repository records (admin API)
    # task names, to resolve dependencies given by name (None: dependencies pass as given)
    names: NameIndex | None = None
    max_request_bytes: int = 1_048_576
    max_batch_bytes: int = 16 * 1_048_576
    delivery_timeout_s: float = 10.0
    auth_failures_per_minute: float = 30.0
    auth_failure_burst: int = 20
    # called once accepted tasks are acknowledged: wakes the ingest loop (core.doorbell)
    on_published: Callable[[], object] | None = None
    # keyed submissions this replica published, replays until the loop's mark arrives
    published: PublishedKeys = field(default_factory=PublishedKeys)
    # the share of every rate limit this process enforces (1/N of N workers on one port)
    rate_share: float = 1.0

    def __post_init__(self) -> None:
        share = self.rate_share

        def team_limits(team: str) -> tuple[float, float]:
            rl = self.teams.policy(team).rate_limit
            return rl.per_second * share, max(1.0, rl.burst * share)

        self.rate = Limiter(team_limits)
        per_s = self.auth_failures_per_minute / 60.0 * share
        burst = max(1.0, self.auth_failure_burst * share)
        self.auth_failures = Limiter(lambda _addr: (per_s, burst))


@dataclass(frozen=True)
class Prepared:
    """A validated submission: the event to publish (None: an idempotent replay) and the
    answer the caller gets."""

    event: TaskSubmitted | None
    answer: dict[str, Any]


def _has_dependencies(doc: Any) -> bool:
    """Whether a manifest names dependencies (their resolution may query the task history)."""
    spec = doc.get("spec") if isinstance(doc, dict) else None
    return isinstance(spec, dict) and bool(spec.get("dependsOn") or spec.get("depends_on"))


def _field(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if p != "body") or "body"


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def _surrogate_path(value: Any, path: str = "") -> str | None:
    """The path of the first string that cannot be UTF-8 encoded (lone surrogates)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            found = _surrogate_path(k, path) or _surrogate_path(v, f"{path}.{k}" if path else k)
            if found:
                return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _surrogate_path(v, f"{path}.{i}" if path else str(i))
            if found:
                return found
    return None


MAX_DRAIN_BYTES = 64 * 1_048_576


async def _too_large(request: Request, limit: int, seen: int) -> ApiError:
    """The 413 for a body over `limit`, after reading (and dropping) the rest of it: a server
    that answers and closes while the client is still sending makes the kernel reset the
    connection (unread data in the receive buffer), and the client sees ECONNRESET instead of
    the 413. Beyond MAX_DRAIN_BYTES the connection is closed anyway."""
    size = seen
    if size <= MAX_DRAIN_BYTES:
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_DRAIN_BYTES:
                    break
        except Exception:
            pass
    return ApiError(413, f"request body larger than {limit} bytes",
                    [{"field": "body", "reason": f"at most {limit} bytes"}],
                    headers={"Connection": "close"})


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise await _too_large(request, limit, 0)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise await _too_large(request, limit, size)
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "request body is not JSON",
                       [{"field": "body", "reason": f"invalid JSON: {exc}"[:300]}]) from exc
    if not isinstance(doc, dict):
        raise ApiError(400, "request body must be a JSON object",
                       [{"field": "body", "reason": f"expected an object, got "
                                                    f"{type(doc).__name__}"}])
    bad = _surrogate_path(doc)
    if bad is not None:
        raise ApiError(422, "invalid task manifest",
                       [{"field": bad, "reason": "not valid Unicode (lone surrogate)"}])
    return doc


def principal(request: Request) -> Principal:
    """The caller, from its bearer token (401 / 429 otherwise)."""
    intake: Intake = request.app.state.intake
    addr = request.client.host if request.client else "unknown"
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)",
                       headers={"WWW-Authenticate": "Bearer"})
    wait = intake.auth_failures.blocked_for(addr)
    if wait > 0:
        raise ApiError(429, "too many failed token checks from this address",
                       headers=_retry_after(wait))
    who = intake.tokens.verify(token.strip())
    if who is None:
        intake.auth_failures.take(addr)
        raise ApiError(401, "invalid or revoked token",
                       headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return who


Caller = Annotated[Principal, Depends(principal)]
TaskId = Annotated[str, Path(pattern=TASK_ID_RE)]
TeamPath = Annotated[str, Path(pattern=NAME_RE.pattern)]
TeamQuery = Annotated[str | None, Query(pattern=NAME_RE.pattern)]
CostBy = Literal["team", "task_type", "model", "tier"]


def create_app(intake: Intake) -> FastAPI:
    app = FastAPI(title="fleetplane ingest", version="1")
    app.state.intake = intake
    metrics = CollectorRegistry()
    instrument_requests(app, metrics, "ingest")
    mount_metrics(app, metrics)  # GET /metrics (docs/operations.md, "Metrics")

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        body: dict[str, Any] = {"error": exc.message}
        if exc.errors is not None:
            body["errors"] = exc.errors
        return JSONResponse(status_code=exc.status, content=body, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": _field(tuple(e.get("loc", ()))), "reason": e.get("msg", "invalid")}
                  for e in exc.errors()]
        return JSONResponse(status_code=422, content={"error": "invalid request",
                                                      "errors": errors})

    @app.exception_handler(Retriable)
    async def unavailable(_: Request, exc: Retriable) -> JSONResponse:
        return JSONResponse(status_code=503, content={"error": str(exc)},
                            headers={"Retry-After": "1"})


    def charge(team: str) -> None:
        wait = intake.rate.take(team)
        if wait > 0:
            raise ApiError(429, f"team {team} is over its intake rate limit",
                           headers=_retry_after(wait))

    def visible_task(who: Principal, task_id: str) -> dict[str, Any]:
        row = intake.view.task(task_id)
        if row is None or not who.may_see(str(row.get("team", ""))):
            raise ApiError(404, f"no task {task_id}")
        return row

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "service": "ingest", "tokens": len(intake.tokens),
                "idempotency_marks": len(intake.marks)}

    @app.get("/v1/whoami")
    def whoami(who: Caller) -> dict[str, str]:
        return {"team": who.team, "role": who.role, "token_id": who.token_id}

    def known_task_of(team: str) -> Callable[[str], bool]:
        def known(task_id: str) -> bool:
            try:
                row = intake.view.task(task_id)
            except AccountingUnavailable as exc:
                raise ApiError(503, f"dependencies cannot be checked now: {exc}",
                               headers={"Retry-After": "1"}) from exc
            return row is not None and row.get("team") == team
        return known

    def resolve_dependencies(team: str, spec: TaskSpec,
                             batch_names: dict[str, str | None] | None) -> TaskSpec:
        """dependsOn as task ids (ingest.names): 422 naming the entry that names no task of
        the team, or several."""
        if not spec.depends_on or intake.names is None:
            return spec
        ids, unresolved = resolve(team, spec.depends_on, intake.names, batch=batch_names,
                                  known_id=known_task_of(team))
        if unresolved:
            raise ApiError(422, "invalid task manifest", [
                {"field": f"spec.dependsOn.{u.index}", "reason": u.reason} for u in unresolved])
        return spec if ids == list(spec.depends_on) else \
            spec.model_copy(update={"depends_on": ids})

    def prepare(who: Principal, doc: Any, source: str,
                batch_keys: dict[tuple[str, str], tuple[str, str]] | None = None,
                batch_names: dict[str, str | None] | None = None) -> Prepared:
        """Validate one manifest and decide what it becomes: a TaskSubmitted to publish, or
        the answer for an idempotency key already used. ApiError names the field at fault.
        May block on the task history when dependencies name old task ids: call it off the
        event loop then (`needs_history`)."""
        if not isinstance(doc, dict):
            raise ApiError(422, "invalid task manifest", [{
                "field": "body", "reason": f"expected an object, got {type(doc).__name__}"}])
        try:
            manifest = TaskManifest.model_validate(doc)
        except ValidationError as exc:
            errors = [{"field": _field(tuple(e.get("loc", ()))), "reason": e.get("msg", "")}
                      for e in exc.errors()]
            raise ApiError(422, "invalid task manifest", errors) from exc
        team = manifest.metadata.team or who.team
        if not who.may_see(team):
            raise ApiError(403, "a team token submits only for its own team",
                           [{"field": "metadata.team",
                             "reason": f"the token belongs to team {who.team}, not {team}"}])
        spec = manifest.to_spec()
        key = manifest.idempotency_key
        problem = reference_problem(spec, task_id_for(team, key) if key else None,
                                    intake.repositories.known if intake.repositories else None)
        if problem is not None:
            field = {"spec.repository": "spec.workspace.repository",
                     "spec.depends_on": "spec.dependsOn"}.get(problem[0], problem[0])
            raise ApiError(422, "invalid task manifest", [{"field": field,
                                                            "reason": problem[1]}])
        spec = resolve_dependencies(team, spec, batch_names)
        charge(team)
        answer = {"team": team, "name": spec.name, "state": "submitted"}
        if key:
            digest = spec_digest(spec)
            mark = intake.marks.get(team, key)
            earlier = (mark.task_id, mark.spec_sha256) if mark is not None else \
                (batch_keys or {}).get((team, key)) or intake.published.get(team, key)
            if earlier is not None:
                if earlier[1] != digest:
                    raise ApiError(409, "idempotency key already used with another manifest",
                                   [{"field": "idempotencyKey",
                                     "reason": f"names task {earlier[0]}"}])
                if batch_names is not None:
                    batch_names[spec.name] = None if spec.name in batch_names else earlier[0]
                if mark is not None and lost_task(mark, lambda t: intake.view.events(t, 20)):
                    # the broker lost the task, not the mark: recreate it (issue 19)
                    return Prepared(resubmission(mark, team, spec, key, source if source in
                                                 SOURCES else "http"),
                                    {"task_id": mark.task_id, **answer,
                                     "idempotent_replay": False, "recreated": True})
                return Prepared(None, {"task_id": earlier[0], **answer,
                                       "idempotent_replay": True})
            task_id = task_id_for(team, key)
            if batch_keys is not None:
                batch_keys[(team, key)] = (task_id, digest)
        else:
            task_id = uuid.uuid4().hex
        if batch_names is not None:
            batch_names[spec.name] = None if spec.name in batch_names else task_id
        event = TaskSubmitted(task_id=task_id, team=team, spec=spec,
                              source=source if source in SOURCES else "http",
                              idempotency_key=key)
        return Prepared(event, {"task_id": task_id, **answer, "idempotent_replay": False})

    def accepted(prepared: Prepared) -> None:
        event = prepared.event
        assert event is not None
        intake.view.remember(event.task_id, event.team, event.spec.name, event.spec.task_type)
        if event.idempotency_key:
            intake.published.add(event.team, event.idempotency_key, event.task_id,
                                 spec_digest(event.spec))
        if intake.names is not None:
            intake.names.add(event.team, event.spec.name, event.task_id)

    @app.post("/v1/tasks", status_code=202)
    async def submit(request: Request, who: Caller) -> JSONResponse:
        doc = _parse_json_object(await _read_body(request, intake.max_request_bytes))
        source = request.headers.get("x-fleetplane-source", "http")
        if _has_dependencies(doc):
            prepared = await run_in_threadpool(prepare, who, doc, source)
        else:
            prepared = prepare(who, doc, source)
        if prepared.event is None:
            return JSONResponse(status_code=200, content=prepared.answer)
        (failed,) = await intake.producer.deliver([prepared.event], intake.delivery_timeout_s)
        if failed is not None:
            raise ApiError(503, f"the broker did not acknowledge the task: {failed}",
                           headers={"Retry-After": "1"})
        accepted(prepared)
        if intake.on_published is not None:
            intake.on_published()
        return JSONResponse(status_code=202, content=prepared.answer)

    @app.post("/v1/tasks:batch")
    async def submit_batch(request: Request, who: Caller) -> JSONResponse:
        """Body {"tasks": [manifest, ...]} (at most MAX_BATCH). One result per item, in order:
        {"index", "status", ...}: 202 accepted (task_id), 200 an idempotent replay, 422 with
        the fields at fault, 403, 409, 429 (retry_after_s), 503 (not acknowledged: send again,
        with idempotency keys). The response is 200 whatever the items' results; a body that
        is not a batch is 400 / 413 / 422 as a whole."""
        doc = _parse_json_object(await _read_body(request, intake.max_batch_bytes))
        unknown = set(doc) - {"tasks"}
        items = doc.get("tasks")
        if unknown or not isinstance(items, list):
            raise ApiError(422, "invalid batch", [{
                "field": sorted(unknown)[0] if unknown else "tasks",
                "reason": "the body is {\"tasks\": [manifest, ...]}"}])
        if not items or len(items) > MAX_BATCH:
            raise ApiError(422, "invalid batch", [{
                "field": "tasks", "reason": f"between 1 and {MAX_BATCH} manifests, "
                                            f"got {len(items)}"}])
        source = request.headers.get("x-fleetplane-source", "http")
        if any(_has_dependencies(item) for item in items):
            results, to_send = await run_in_threadpool(prepare_all, who, items, source)
        else:
            results, to_send = prepare_all(who, items, source)
        outcomes = await intake.producer.deliver([p.event for _, p in to_send if p.event],
                                                 intake.delivery_timeout_s)
        for (index, prepared), failed in zip(to_send, outcomes, strict=True):
            if failed is None:
                accepted(prepared)
            else:
                results[index] = {"index": index, "status": 503,
                                  "task_id": prepared.answer["task_id"],
                                  "error": f"the broker did not acknowledge the task: {failed}"}
        if intake.on_published is not None and any(f is None for f in outcomes):
            intake.on_published()
        counts: dict[str, int] = {}
        for r in results:
            counts[str(r["status"])] = counts.get(str(r["status"]), 0) + 1
        return JSONResponse(status_code=200, content={
            "accepted": counts.get("202", 0) + counts.get("200", 0),
            "rejected": len(results) - counts.get("202", 0) - counts.get("200", 0),
            "by_status": counts, "results": results})

    def prepare_all(who: Principal, items: list[Any], source: str
                    ) -> tuple[list[dict[str, Any]], list[tuple[int, Prepared]]]:
        """Each manifest of a batch prepared in order: one result per item, and the events to
        publish. A dependency may name an earlier manifest of the batch."""
        results: list[dict[str, Any]] = []
        to_send: list[tuple[int, Prepared]] = []
        keys: dict[tuple[str, str], tuple[str, str]] = {}
        names: dict[str, str | None] = {}
        for index, item in enumerate(items):
            try:
                prepared = prepare(who, item, source, keys, names)
            except ApiError as exc:
                result: dict[str, Any] = {"index": index, "status": exc.status,
                                          "error": exc.message}
                if exc.errors is not None:
                    result["errors"] = exc.errors
                if "Retry-After" in exc.headers:
                    result["retry_after_s"] = int(exc.headers["Retry-After"])
                results.append(result)
                continue
            if prepared.event is None:
                results.append({"index": index, "status": 200, **prepared.answer})
            else:
                results.append({"index": index, "status": 202, **prepared.answer})
                to_send.append((index, prepared))
        return results, to_send

    @app.get("/v1/tasks")
    def list_tasks(
        who: Caller,
        state: Annotated[str | None, Query(max_length=50)] = None,
        task_type: Annotated[str | None, Query(alias="type", min_length=1, max_length=63)] = None,
        team: Annotated[str | None, Query(min_length=1, max_length=63)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 100,
    ) -> list[dict[str, Any]]:
        if state is not None and state not in STATES:
            raise ApiError(422, "invalid request",
                           [{"field": "state", "reason": f"one of {', '.join(STATES)}"}])
        if team is not None and not who.may_see(team):
            raise ApiError(403, f"a token of team {who.team} cannot list team {team}'s tasks")
        scope = team if (team is not None or who.is_admin) else who.team
        return intake.view.tasks(team=scope, state=state, task_type=task_type, limit=limit)

    @app.get("/v1/tasks/{task_id}")
    def get_task(task_id: TaskId, who: Caller) -> dict[str, Any]:
        return visible_task(who, task_id)

    @app.get("/v1/tasks/{task_id}/events")
    def task_events(task_id: TaskId, who: Caller,
                    limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000
                    ) -> list[dict[str, Any]]:
        visible_task(who, task_id)
        return intake.view.events(task_id, limit)

    async def reason_of(request: Request) -> str:
        """The optional body of a command: {"reason": string} (at most 500 characters kept)."""
        body = await _read_body(request, 16_384)
        if not body.strip():
            return ""
        doc = _parse_json_object(body)
        unknown = set(doc) - {"reason"}
        if unknown or not isinstance(doc.get("reason", ""), str):
            raise ApiError(422, "invalid request", [{
                "field": sorted(unknown)[0] if unknown else "reason",
                "reason": "the body takes only {\"reason\": string}"}])
        return str(doc.get("reason", ""))[:500]

    async def publish(command: ControlCommand) -> None:
        # once acknowledged, send rings fleet.control's doorbell for the partition it wrote:
        # the coordinator and executors parked on it read the command at once (core.doorbell)
        await run_in_threadpool(intake.producer.send, [command], 10)

    async def task_command(task_id: str, request: Request, who: Principal, command: str,
                           verb: str) -> dict[str, Any]:
        """cancel / approve / reject: the owning team or an admin (another team's task is
        404, as for reads); 409 once the task is finished."""
        reason = await reason_of(request)
        row = await run_in_threadpool(visible_task, who, task_id)
        team = str(row["team"])
        if row.get("state") in TERMINAL_STATES:
            raise ApiError(409, f"task {task_id} is already {row['state']}")
        charge(team)
        await publish(ControlCommand(task_id=task_id, team=team, command=command,
                                     requested_by=f"{who.team}/{who.token_id}",
                                     reason=reason or f"{verb} by {who.team} via the API"))
        return {"task_id": task_id, "team": team, "command": command,
                "state": {"cancel": "cancelling", "approve": "approving",
                          "reject": "rejecting"}[command]}

    @app.post("/v1/tasks/{task_id}:cancel", status_code=202)
    async def cancel(task_id: TaskId, request: Request, who: Caller) -> dict[str, Any]:
        return await task_command(task_id, request, who, "cancel", "cancelled")

    @app.post("/v1/tasks/{task_id}:approve", status_code=202)
    async def approve(task_id: TaskId, request: Request, who: Caller) -> dict[str, Any]:
        """A task held for approval is retried (a conflict hold keeps its changes)."""
        return await task_command(task_id, request, who, "approve", "approved")

    @app.post("/v1/tasks/{task_id}:reject", status_code=202)
    async def reject(task_id: TaskId, request: Request, who: Caller) -> dict[str, Any]:
        """A task held for approval fails (a conflict hold is rolled back)."""
        return await task_command(task_id, request, who, "reject", "rejected")

    # -- spend ---------------------------------------------------------------------------------
    def scope_of(who: Principal, team: str | None, what: str) -> str | None:
        """The team a read is about: a team token reads its own (another is 403); an admin
        reads the one named, or all (None)."""
        if team is not None and not who.may_see(team):
            raise ApiError(403, f"a token of team {who.team} cannot read team {team}'s {what}",
                           [{"field": "team", "reason": f"the token belongs to team "
                                                        f"{who.team}"}])
        return team if (team is not None or who.is_admin) else who.team

    @app.get("/v1/cost")
    def cost(who: Caller, by: CostBy = "team", team: TeamQuery = None,
             since: Annotated[datetime | None, Query()] = None,
             until: Annotated[datetime | None, Query()] = None) -> list[dict[str, Any]]:
        """Spend (USD, tokens, calls) grouped by team, task type, model or tier."""
        scope = scope_of(who, team, "costs")
        return intake.view.cost(by=by, team=scope,
                                since=since.isoformat() if since else None,
                                until=until.isoformat() if until else None)

    @app.get("/v1/budgets")
    def budgets(who: Caller, team: TeamQuery = None) -> list[dict[str, Any]]:
        """Spend against budget in the current period, per team."""
        scope = scope_of(who, team, "budget")
        rows = intake.view.budgets()
        if scope is not None:
            rows = [r for r in rows if r.get("team") == scope]
            if not rows:  # a team with no spend yet: its configured budget, nothing spent
                # (the period named as accounting names it: 2026-12-06, not "day")
                policy = intake.teams.policy(scope)
                rows = [{"team": scope,
                         "period": period_name(policy.budget_period, datetime.now(UTC)),
                         "budget_usd": policy.budget_usd, "spent_usd": 0.0,
                         "remaining_usd": policy.budget_usd, "state": "ok",
                         "max_running": policy.max_running}]
        return rows

    # -- admin ---------------------------------------------------------------------------------
    def admin(who: Principal) -> Principal:
        if not who.is_admin:
            raise ApiError(403, "an admin token is required (this token is of team "
                                f"{who.team})")
        return who

    async def fleet_command(who: Principal, command: str, team: str, reason: str
                            ) -> dict[str, Any]:
        charge(who.team)
        event = ControlCommand(task_id="", team=team, command=command,
                               requested_by=f"{who.team}/{who.token_id}",
                               reason=reason or f"{command} by {who.team} via the API")
        await publish(event)
        return {"command": command, "team": team or None, "event_id": event.event_id}

    @app.post("/v1/admin/teams/{team}:pause", status_code=202)
    async def pause(team: TeamPath, request: Request, who: Caller) -> dict[str, Any]:
        """Hold the team's waiting work (`paused`); running work finishes."""
        admin(who)
        return await fleet_command(who, "pause", team, await reason_of(request))

    @app.post("/v1/admin/teams/{team}:resume", status_code=202)
    async def resume(team: TeamPath, request: Request, who: Caller) -> dict[str, Any]:
        admin(who)
        return await fleet_command(who, "resume", team, await reason_of(request))

    @app.post("/v1/admin/kill-switch", status_code=202)
    async def kill_switch(request: Request, who: Caller) -> dict[str, Any]:
        """Body {"state": "on" | "off", "reason": "..."}: on cancels every running attempt and
        dispatches nothing; off dispatches again."""
        admin(who)
        doc = _parse_json_object(await _read_body(request, 16_384))
        unknown = set(doc) - {"state", "reason"}
        if unknown:
            raise ApiError(422, "invalid request", [{"field": sorted(unknown)[0],
                                                     "reason": "unknown field"}])
        if doc.get("state") not in ("on", "off"):
            raise ApiError(422, "invalid request", [{"field": "state",
                                                     "reason": "must be \"on\" or \"off\""}])
        reason = doc.get("reason", "")
        if not isinstance(reason, str):
            raise ApiError(422, "invalid request", [{"field": "reason",
                                                     "reason": "must be a string"}])
        command = "kill_switch" if doc["state"] == "on" else "kill_switch_off"
        return await fleet_command(who, command, "", reason[:500])

    @app.get("/v1/admin/tokens")
    def tokens(who: Caller, team: TeamQuery = None) -> list[dict[str, Any]]:
        """Token metadata (id, team, role, description, created, revoked); never a hash."""
        admin(who)
        return intake.tokens.metadata(team)

    # -- repositories (admin writes; any token reads) -------------------------------------------
    def registry() -> RepositoryRegistry:
        if intake.repositories is None:
            raise ApiError(503, "this ingest has no repository registry")
        return intake.repositories

    def shown(who: Principal, record: dict[str, Any]) -> dict[str, Any]:
        """A team token sees what it needs to name a repository; where it lives and who
        registered it are for admins."""
        if who.is_admin:
            return record
        return {k: v for k, v in record.items() if k not in ("location", "created_by")}

    @app.get("/v1/admin/repositories")
    def list_repositories(who: Caller) -> list[dict[str, Any]]:
        """Registered repositories (and the static ones of infra/repositories.yaml)."""
        return [shown(who, r) for r in registry().records()]

    @app.get("/v1/admin/repositories/{name}")
    def get_repository(name: Annotated[str, Path(max_length=200)], who: Caller
                       ) -> dict[str, Any]:
        found = registry().get(name)
        if found is None:
            raise ApiError(404, f"no repository {name}")
        return shown(who, found)

    @app.put("/v1/admin/repositories/{name}")
    async def put_repository(name: Annotated[str, Path(max_length=200)], request: Request,
                             who: Caller) -> JSONResponse:
        """Body {"location": "/abs/path" | "https://...", "description": "..."}: 201 when new,
        200 when it replaced a record."""
        admin(who)
        reg = registry()
        doc = _parse_json_object(await _read_body(request, 16_384))
        unknown = set(doc) - {"location", "description"}
        if unknown:
            raise ApiError(422, "invalid request", [{"field": sorted(unknown)[0],
                                                     "reason": "unknown field"}])
        for fld in ("location", "description"):
            if not isinstance(doc.get(fld, ""), str):
                raise ApiError(422, "invalid request", [{"field": fld,
                                                         "reason": "must be a string"}])
        try:
            record = record_for(name, str(doc.get("location", "")),
                                str(doc.get("description", "")),
                                created_by=f"{who.team}/{who.token_id}")
        except ValueError as exc:
            fld, _, reason = str(exc).partition(": ")
            raise ApiError(422, "invalid repository", [{"field": fld, "reason": reason}]) \
                from exc
        existed = reg.get(name) is not None
        await write_repository(name, record)
        return JSONResponse(status_code=200 if existed else 201, content=record)

    @app.delete("/v1/admin/repositories/{name}")
    async def delete_repository(name: Annotated[str, Path(max_length=200)], who: Caller
                                ) -> dict[str, Any]:
        """Unregister (a tombstone on fleet.repositories); a static repository stays."""
        admin(who)
        found = registry().get(name)
        if found is None or found.get("static"):
            raise ApiError(404, f"no registered repository {name}" +
                           (" (it is configured in infra/repositories.yaml)" if found else ""))
        await write_repository(name, None)
        return {"name": name, "removed": True}

    async def write_repository(name: str, record: dict[str, Any] | None) -> None:
        if intake.writer is None:
            raise ApiError(503, "this ingest cannot publish repository records")
        await run_in_threadpool(intake.writer.put, REPOSITORIES_TOPIC, name, record)
        registry().apply(name, record)  # this replica knows it at once; others follow the topic

    return app

