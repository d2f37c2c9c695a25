"""The Python SDK: ``from fleetplane import Client``.

    client = Client()                                  # token and URL from the environment
    task = client.submit("examples/task.yaml")         # or a manifest dict
    done = client.wait(task.task_id, timeout=120)
    print(done.state, done.cost_usd)

Credentials: the `token` argument, else FLEETPLANE_TOKEN, else `token:` in the config file
(FLEETPLANE_CONFIG_FILE, default ~/.config/fleetplane/config.yaml), else the local embedded
stack's admin token (<data dir>/admin.token). The URL likewise (`url`, FLEETPLANE_INGEST_URL,
`ingest_url:` in the config file, the running embedded stack, http://127.0.0.1:8470).

Errors are typed and say whether a retry can help (`.retriable`): RateLimited and Unavailable
can (the client already retried them `max_retries` times, honouring Retry-After); the others
cannot.
"""

from __future__ import annotations

import builtins
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import yaml

from fleetplane.core import localstack
from fleetplane.core.errors import FleetplaneError
from fleetplane.core.settings import Settings, get_settings
from fleetplane.core.states import TERMINAL_STATES


class ApiError(FleetplaneError):
    """The API refused the call. `status` is the HTTP status, `errors` the fields at fault."""

    retriable = False

    def __init__(self, message: str, status: int = 0,
                 errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.errors = errors or []


class AuthenticationError(ApiError):
    """401: no token, or an unknown or revoked one."""


class PermissionDenied(ApiError):
    """403: the token's team may not do this (e.g. submit or list for another team)."""


class NotFound(ApiError):
    """404: no such task, or one of another team."""


class Conflict(ApiError):
    """409: e.g. cancelling a finished task, or an idempotency key reused with another manifest."""


class InvalidManifest(ApiError):
    """400/413/422: the request is malformed; `errors` lists {field, reason}."""


class RateLimited(ApiError):
    """429: over the team's rate (or too many failed token checks); retry after `retry_after`."""

    retriable = True

    def __init__(self, message: str, status: int = 429,
                 errors: list[dict[str, str]] | None = None, retry_after: float = 1.0) -> None:
        super().__init__(message, status, errors)
        self.retry_after = retry_after


class Unavailable(ApiError):
    """503 or no answer: the service or a dependency is down; retry."""

    retriable = True


class WaitTimeout(ApiError):
    """`wait` gave up before the task reached a terminal state."""

    retriable = True


_BY_STATUS: dict[int, type[ApiError]] = {400: InvalidManifest, 401: AuthenticationError,
                                         403: PermissionDenied, 404: NotFound, 409: Conflict,
                                         413: InvalidManifest, 422: InvalidManifest,
                                         429: RateLimited, 503: Unavailable}


@dataclass(frozen=True)
class Submission:
    task_id: str
    team: str
    name: str
    state: str
    idempotent_replay: bool = False


@dataclass(frozen=True)
class ItemResult:
    """One manifest's answer in a batch submission (`Client.submit_many`): status 202 (accepted)
    or 200 (an idempotent replay) carry the task id; others carry the error and, for 422, the
    fields at fault (`errors`: [{"field", "reason"}])."""

    index: int
    status: int
    task_id: str = ""
    team: str = ""
    name: str = ""
    error: str = ""
    errors: list[dict[str, str]] = field(default_factory=list)
    retry_after_s: int = 0

    @property
    def ok(self) -> bool:
        return self.status in (200, 202)

    @property
    def retriable(self) -> bool:
        return self.status in (429, 503)


@dataclass(frozen=True)
class Task:
    task_id: str
    team: str
    state: str
    task_type: str = ""
    reason: str = ""
    model: str = ""
    tier: str = ""
    attempts: int = 0
    cost_usd: float = 0.0
    submitted_at: str = ""
    updated_at: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Task:
        return cls(task_id=str(row["task_id"]), team=str(row.get("team", "")),
                   state=str(row.get("state", "")), task_type=str(row.get("task_type") or ""),
                   reason=str(row.get("reason") or ""), model=str(row.get("model") or ""),
                   tier=str(row.get("tier") or ""), attempts=int(row.get("attempts") or 0),
                   cost_usd=float(row.get("cost_usd") or 0.0),
                   submitted_at=str(row.get("submitted_at") or ""),
                   updated_at=str(row.get("updated_at") or ""), raw=dict(row))


def _config(settings: Settings) -> dict[str, Any]:
    path = settings.config_file.expanduser()
    try:
        raw = yaml.safe_load(path.read_text()) if path.exists() else None
    except (OSError, yaml.YAMLError):
        return {}
    return raw if isinstance(raw, dict) else {}


def resolve_token(settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    if settings.token:
        return settings.token
    cfg_token = _config(settings).get("token")
    if cfg_token:
        return str(cfg_token)
    return localstack.admin_token(settings)


def resolve_url(settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    if settings.ingest_url:
        return settings.ingest_url
    cfg_url = _config(settings).get("ingest_url")
    if cfg_url:
        return str(cfg_url)
    return localstack.ingest_url(settings)


def load_manifests(path: str | Path) -> list[dict[str, Any]]:
    """The manifests (YAML documents) in a file."""
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidManifest(f"{path}: {exc}") from exc
    if not docs or not all(isinstance(d, dict) for d in docs):
        raise InvalidManifest(f"{path}: expected one or more YAML mappings (kind: AgentTask)")
    return docs


def _q(task_id: str) -> str:
    return quote(task_id, safe="")


class Client:
    """A fleetplane intake client (thread-safe; one connection pool)."""

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 timeout: float = 30.0, max_retries: int = 3, source: str = "sdk") -> None:
        settings = get_settings()
        self.url = (url or resolve_url(settings)).rstrip("/")
        self.token = token if token is not None else resolve_token(settings)
        self.max_retries = max_retries
        headers = {"X-Fleetplane-Source": source}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- transport ---------------------------------------------------------------------------
    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            try:
                resp = self._http.request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                error: ApiError = Unavailable(f"cannot reach {self.url}: {exc}")
            else:
                if resp.status_code < 400:
                    return resp.json()
                error = self._error(resp)
            if not error.retriable or attempt >= self.max_retries:
                raise error
            attempt += 1
            time.sleep(min(30.0, getattr(error, "retry_after", 0.2 * 2 ** attempt)))

    @staticmethod
    def _error(resp: httpx.Response) -> ApiError:
        try:
            body = resp.json()
        except ValueError:
            body = {"error": resp.text[:500]}
        if not isinstance(body, dict):
            body = {"error": str(body)[:500]}
        message = str(body.get("error") or body.get("detail") or f"HTTP {resp.status_code}")
        errors = body.get("errors") or []
        if errors:
            message += ": " + "; ".join(f"{e.get('field')}: {e.get('reason')}" for e in errors)
        cls = _BY_STATUS.get(resp.status_code,
                             Unavailable if resp.status_code >= 500 else ApiError)
        if cls is RateLimited:
            try:
                retry_after = float(resp.headers.get("retry-after", "1"))
            except ValueError:
                retry_after = 1.0
            return RateLimited(message, resp.status_code, errors, retry_after=retry_after)
        return cls(message, resp.status_code, errors)

    # -- API ---------------------------------------------------------------------------------
    def whoami(self) -> dict[str, str]:
        result: dict[str, str] = self._call("GET", "/v1/whoami")
        return result

    def submit(self, manifest: dict[str, Any] | str | Path, *,
               idempotency_key: str | None = None) -> Submission:
        """Submit one manifest (a dict, or a YAML file holding one document)."""
        if isinstance(manifest, str | Path):
            docs = load_manifests(manifest)
            if len(docs) != 1:
                raise InvalidManifest(f"{manifest}: {len(docs)} documents; use submit_all")
            manifest = docs[0]
        if idempotency_key is not None:
            manifest = {**manifest, "idempotencyKey": idempotency_key}
        body = self._call("POST", "/v1/tasks", json=manifest)
        return Submission(task_id=body["task_id"], team=body["team"], name=body["name"],
                          state=body.get("state", "submitted"),
                          idempotent_replay=bool(body.get("idempotent_replay")))

    def submit_all(self, path: str | Path) -> builtins.list[Submission]:
        return [self.submit(doc) for doc in load_manifests(path)]

    def submit_many(self, manifests: builtins.list[dict[str, Any]] | str | Path, *,
                    chunk: int = 1000) -> builtins.list[ItemResult]:
        """Submit many manifests (dicts, or a multi-document YAML file) through the batch
        endpoint, `chunk` per request (at most 1,000). One result per manifest, in order; an
        invalid manifest does not stop the others (check `.ok`, `.status`, `.errors`)."""
        docs = load_manifests(manifests) if isinstance(manifests, str | Path) else manifests
        if not 1 <= chunk <= 1000:
            raise ValueError("chunk must be between 1 and 1000")
        results: builtins.list[ItemResult] = []
        for start in range(0, len(docs), chunk):
            body = self._call("POST", "/v1/tasks:batch",
                              json={"tasks": docs[start:start + chunk]})
            for item in body["results"]:
                results.append(ItemResult(
                    index=start + int(item["index"]), status=int(item["status"]),
                    task_id=str(item.get("task_id", "")), team=str(item.get("team", "")),
                    name=str(item.get("name", "")), error=str(item.get("error", "")),
                    errors=list(item.get("errors", [])),
                    retry_after_s=int(item.get("retry_after_s", 0))))
        return results

    def get(self, task_id: str) -> Task:
        return Task.from_row(self._call("GET", f"/v1/tasks/{_q(task_id)}"))

    def list(self, *, state: str | None = None, type: str | None = None,
             team: str | None = None, limit: int = 100) -> builtins.list[Task]:
        params: dict[str, Any] = {"limit": limit}
        for k, v in (("state", state), ("type", type), ("team", team)):
            if v is not None:
                params[k] = v
        return [Task.from_row(r) for r in self._call("GET", "/v1/tasks", params=params)]

    def events(self, task_id: str) -> builtins.list[dict[str, Any]]:
        """The task's timeline (every recorded event, in order)."""
        rows: builtins.list[dict[str, Any]] = self._call("GET", f"/v1/tasks/{_q(task_id)}/events")
        return rows

    def cancel(self, task_id: str, reason: str | None = None) -> dict[str, Any]:
        body = {"reason": reason} if reason else None
        result: dict[str, Any] = self._call("POST", f"/v1/tasks/{_q(task_id)}:cancel", json=body)
        return result

    def approve(self, task_id: str, reason: str | None = None) -> dict[str, Any]:
        """Approve a task held for approval (it is retried; a conflict hold keeps its changes)."""
        return self._command(f"/v1/tasks/{_q(task_id)}:approve", reason)

    def reject(self, task_id: str, reason: str | None = None) -> dict[str, Any]:
        """Reject a task held for approval (it fails; a conflict hold is rolled back)."""
        return self._command(f"/v1/tasks/{_q(task_id)}:reject", reason)

    def cost(self, *, by: str = "team", team: str | None = None, since: str | None = None,
             until: str | None = None) -> builtins.list[dict[str, Any]]:
        """Spend grouped by team, task_type, model or tier: the token's team (an admin: every
        team, or `team`)."""
        params = {k: v for k, v in (("by", by), ("team", team), ("since", since),
                                    ("until", until)) if v is not None}
        rows: builtins.list[dict[str, Any]] = self._call("GET", "/v1/cost", params=params)
        return rows

    def budgets(self, team: str | None = None) -> builtins.list[dict[str, Any]]:
        """Spend against budget in the current period (the token's team; an admin: all)."""
        params = {"team": team} if team else {}
        rows: builtins.list[dict[str, Any]] = self._call("GET", "/v1/budgets", params=params)
        return rows

    # -- admin (403 PermissionDenied for a team token) ---------------------------------------
    def pause_team(self, team: str, reason: str | None = None) -> dict[str, Any]:
        return self._command(f"/v1/admin/teams/{_q(team)}:pause", reason)

    def resume_team(self, team: str, reason: str | None = None) -> dict[str, Any]:
        return self._command(f"/v1/admin/teams/{_q(team)}:resume", reason)

    def kill_switch(self, on: bool, reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"state": "on" if on else "off"}
        if reason:
            body["reason"] = reason
        result: dict[str, Any] = self._call("POST", "/v1/admin/kill-switch", json=body)
        return result

    def tokens(self, team: str | None = None) -> builtins.list[dict[str, Any]]:
        """Token metadata (ids, teams, roles, created/revoked); never tokens or hashes."""
        params = {"team": team} if team else {}
        rows: builtins.list[dict[str, Any]] = self._call("GET", "/v1/admin/tokens",
                                                         params=params)
        return rows

    # -- repositories (reads: any token; add/remove: admin) ----------------------------------
    def repositories(self) -> builtins.list[dict[str, Any]]:
        """Registered repositories: name, location (path or git URL), kind, created."""
        rows: builtins.list[dict[str, Any]] = self._call("GET", "/v1/admin/repositories")
        return rows

    def add_repository(self, name: str, location: str, description: str = ""
                       ) -> dict[str, Any]:
        """Register (or re-point) repository `name` at `location`: an absolute path of a git
        repository on the executors' machines, or a git URL."""
        body = {"location": location, "description": description}
        result: dict[str, Any] = self._call("PUT", f"/v1/admin/repositories/{_q(name)}",
                                            json=body)
        return result

    def remove_repository(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("DELETE", f"/v1/admin/repositories/{_q(name)}")
        return result

    def _command(self, path: str, reason: str | None) -> dict[str, Any]:
        body = {"reason": reason} if reason else None
        result: dict[str, Any] = self._call("POST", path, json=body)
        return result

    def wait(self, task_id: str, timeout: float = 300.0, poll: float = 0.5) -> Task:
        """Poll until the task reaches a terminal state; WaitTimeout after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        task: Task | None = None
        while time.monotonic() < deadline:
            task = self.get(task_id)
            if task.finished:
                return task
            time.sleep(poll)
        raise WaitTimeout(f"task {task_id} still {task.state if task else 'unknown'} after "
                          f"{timeout}s")
