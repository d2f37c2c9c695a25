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
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from fleetplane.accounting.rows import STATES, TERMINAL_STATES
from fleetplane.core.errors import Retriable
from fleetplane.core.events import ControlCommand, TaskSubmitted
from fleetplane.core.kafka import EventProducer
from fleetplane.core.teams import TeamsConfig
from fleetplane.ingest.idempotency import Marks, spec_digest, task_id_for
from fleetplane.ingest.manifest import NAME_RE, TaskManifest
from fleetplane.ingest.ratelimit import Limiter
from fleetplane.ingest.taskview import TaskView
from fleetplane.ingest.tokens import Principal, TokenStore

TASK_ID_RE = r"^[A-Za-z0-9._-]{1,128}$"
SOURCES = ("http", "cli", "sdk")
MAX_LIST = 10_000


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
    max_request_bytes: int = 1_048_576
    auth_failures_per_minute: float = 30.0
    auth_failure_burst: int = 20

    def __post_init__(self) -> None:
        def team_limits(team: str) -> tuple[float, float]:
            rl = self.teams.policy(team).rate_limit
            return rl.per_second, float(rl.burst)

        self.rate = Limiter(team_limits)
        per_s = self.auth_failures_per_minute / 60.0
        self.auth_failures = Limiter(lambda _addr: (per_s, float(self.auth_failure_burst)))


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


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body larger than {limit} bytes")
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

    @app.post("/v1/tasks", status_code=202)
    async def submit(request: Request, who: Caller) -> JSONResponse:
        doc = _parse_json_object(await _read_body(request, intake.max_request_bytes))
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
        charge(team)
        spec = manifest.to_spec()
        key = manifest.idempotency_key
        if key:
            mark = intake.marks.get(team, key)
            if mark is not None:
                if mark.spec_sha256 != spec_digest(spec):
                    raise ApiError(409, "idempotency key already used with another manifest",
                                   [{"field": "idempotencyKey",
                                     "reason": f"names task {mark.task_id}"}])
                return JSONResponse(status_code=200, content={
                    "task_id": mark.task_id, "team": team, "name": spec.name,
                    "state": "submitted", "idempotent_replay": True})
            task_id = task_id_for(team, key)
        else:
            task_id = uuid.uuid4().hex
        source = request.headers.get("x-fleetplane-source", "http")
        event = TaskSubmitted(task_id=task_id, team=team, spec=spec,
                              source=source if source in SOURCES else "http",
                              idempotency_key=key)
        await run_in_threadpool(intake.producer.send, [event], 10)
        intake.view.remember(task_id, team, spec.name, spec.task_type)
        return JSONResponse(status_code=202, content={
            "task_id": task_id, "team": team, "name": spec.name, "state": "submitted",
            "idempotent_replay": False})

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
                policy = intake.teams.policy(scope)
                rows = [{"team": scope, "period": policy.budget_period,
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

    return app

