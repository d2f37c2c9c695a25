"""Team API tokens: issued once, stored only as a SHA-256 hash on the compacted topic fleet.tokens.

A token reads ``fpt_<id>_<secret>``: the 12-hex-digit id is public (the record's key, shown by
`fleetplane token list`), the secret is 256 random bits. A plain SHA-256 is the right hash for
random secrets of that size (a slow password hash only helps low-entropy secrets); comparison is
constant-time. Roles: ``team`` (its own team's tasks) and ``admin`` (every team's).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from fleetplane.core.localstack import ADMIN_TOKEN_FILE
from fleetplane.core.settings import Settings
from fleetplane.ingest.kvtopic import TopicWriter, read_all

TOKENS_TOPIC = "fleet.tokens"
PREFIX = "fpt"
TOKEN_RE = re.compile(r"^fpt_([0-9a-f]{12})_([A-Za-z0-9_-]{20,100})$")
Role = Literal["team", "admin"]
ROLES: tuple[str, ...] = ("team", "admin")
PUBLIC_FIELDS = ("token_id", "team", "role", "description", "created_by", "created_at",
                 "revoked_at")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's team and role."""

    team: str
    role: str
    token_id: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_see(self, team: str) -> bool:
        return self.is_admin or team == self.team


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str]:
    """A fresh (token id, token)."""
    token_id = secrets.token_hex(6)
    return token_id, f"{PREFIX}_{token_id}_{secrets.token_urlsafe(32)}"


def token_id_of(token: str) -> str | None:
    m = TOKEN_RE.match(token)
    return m.group(1) if m else None


def record_for(token: str, team: str, role: str, description: str = "",
               created_by: str = "") -> dict[str, Any]:
    token_id = token_id_of(token)
    if token_id is None:
        raise ValueError("not a fleetplane token")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    return {"token_id": token_id, "team": team, "role": role, "sha256": digest(token),
            "description": description[:200], "created_by": created_by[:200],
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"), "revoked_at": None}


class TokenStore:
    """The tokens every ingest replica knows (fed by a TopicTable on fleet.tokens)."""

    def __init__(self) -> None:
        self._records: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def apply(self, token_id: str, record: dict[str, Any] | None) -> None:
        with self._lock:
            if record is None:
                self._records.pop(token_id, None)
            else:
                self._records[token_id] = record

    def verify(self, token: str) -> Principal | None:
        token_id = token_id_of(token)
        if token_id is None:
            return None
        with self._lock:
            rec = self._records.get(token_id)
        if rec is None or rec.get("revoked_at"):
            return None
        if not hmac.compare_digest(str(rec.get("sha256", "")), digest(token)):
            return None
        return Principal(team=str(rec["team"]), role=str(rec.get("role", "team")),
                         token_id=token_id)

    def metadata(self, team: str | None = None) -> list[dict[str, Any]]:
        """What an operator may see of each token (never the hash): id, team, role,
        description, created at/by, revoked at."""
        with self._lock:
            records = list(self._records.values())
        return sorted(({k: r.get(k) for k in PUBLIC_FIELDS} for r in records
                       if team is None or r.get("team") == team),
                      key=lambda r: (str(r["team"]), str(r["created_at"]), str(r["token_id"])))

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)


def issue(settings: Settings, team: str, role: str = "team", description: str = "",
          created_by: str = "cli", token: str | None = None) -> tuple[str, dict[str, Any]]:
    """Publish a token's record (a new token, or `token` again) and return (token, record)."""
    token = token or new_token()[1]
    record = record_for(token, team, role, description, created_by)
    writer = TopicWriter(settings)
    try:
        writer.put(TOKENS_TOPIC, record["token_id"], record)
    finally:
        writer.close()
    return token, record


def list_tokens(settings: Settings) -> list[dict[str, Any]]:
    rows = list(read_all(settings, TOKENS_TOPIC).values())
    return sorted(rows, key=lambda r: (str(r.get("team")), str(r.get("created_at"))))


def revoke(settings: Settings, token_id: str) -> dict[str, Any] | None:
    """Mark a token revoked (the record stays, so `token list` shows it); None if unknown."""
    records = read_all(settings, TOKENS_TOPIC)
    rec = records.get(token_id)
    if rec is None:
        return None
    rec = {**rec, "revoked_at": datetime.now(UTC).isoformat(timespec="seconds")}
    writer = TopicWriter(settings)
    try:
        writer.put(TOKENS_TOPIC, token_id, rec)
    finally:
        writer.close()
    return rec


LOCAL_ADMIN_TEAM = "operators"
LOCAL_ADMIN_FILE = ADMIN_TOKEN_FILE  # core.localstack: where the CLI and SDK look


def ensure_local_admin(settings: Settings, data_dir: Path) -> str:
    """The embedded stack's admin token: kept in <data dir>/admin.token (mode 0600) for the local
    CLI and demo, and (re)published on every start, so a fresh broker knows it too."""
    path = data_dir / LOCAL_ADMIN_FILE
    token = path.read_text().strip() if path.exists() else ""
    if token_id_of(token) is None:
        token = new_token()[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(token + "\n")
    path.chmod(0o600)
    issue(settings, LOCAL_ADMIN_TEAM, "admin", description="local admin (fleetplane up)",
          created_by="fleetplane up", token=token)
    return token
