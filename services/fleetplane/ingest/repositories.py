"""Registered repositories: the compacted topic fleet.repositories (name -> where the git
repository is), followed by every ingest replica (a task naming an unregistered repository is
refused at the door) and every executor (where it checks the repository out).

A record is ``{"name", "location", "kind": "path" | "url", "description", "created_by",
"created_at"}``; a tombstone removes the repository. ``location`` is an absolute path of a git
repository on the executors' machines, or a git URL (https, ssh, git, file, or scp-like
``user@host:path``) that an executor clones (bare) into its data directory on first use.
infra/repositories.yaml and FLEETPLANE_EXECUTOR_REPOSITORIES (static, per machine) still count;
a registered name takes precedence over a static one.
"""

from __future__ import annotations

import re
import subprocess
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fleetplane.core.settings import Settings
from fleetplane.ingest.kvtopic import TopicWriter, read_all
from fleetplane.ingest.manifest import NAME_RE

REPOSITORIES_TOPIC = "fleet.repositories"
URL_RE = re.compile(r"^(https?|ssh|git|file)://[^\s]+$|^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^\s]+$")
MAX_LOCATION = 1000


def location_problem(location: str) -> str | None:
    """Why `location` cannot name a repository (None: it can)."""
    if not location or len(location) > MAX_LOCATION:
        return f"must be 1-{MAX_LOCATION} characters"
    if any(ord(c) < 0x20 or c == "\x7f" for c in location):
        return "may not contain control characters"
    if location.startswith("-"):
        return "may not begin with '-'"
    if URL_RE.match(location) or location.startswith("/"):
        return None
    return ("must be an absolute path or a git URL (https://, ssh://, git://, file://, "
            "user@host:path)")


def kind_of(location: str) -> str:
    return "path" if location.startswith("/") else "url"


def record_for(name: str, location: str, description: str = "",
               created_by: str = "") -> dict[str, Any]:
    """A repository record; ValueError naming the field when `name` or `location` is invalid."""
    if not NAME_RE.match(name):
        raise ValueError(f"name: must match {NAME_RE.pattern}")
    problem = location_problem(location)
    if problem:
        raise ValueError(f"location: {problem}")
    return {"name": name, "location": location, "kind": kind_of(location),
            "description": description[:200], "created_by": created_by[:200],
            "created_at": datetime.now(UTC).isoformat(timespec="seconds")}


class RepositoryRegistry:
    """The registered repositories one process knows (fed by a TopicTable on
    fleet.repositories), plus static names (infra/repositories.yaml) that count as known."""

    def __init__(self, static: dict[str, Path] | None = None) -> None:
        self._records: dict[str, dict[str, Any]] = {}
        self._static = dict(static or {})
        self._lock = threading.Lock()

    def apply(self, name: str, record: dict[str, Any] | None) -> None:
        with self._lock:
            if record is None:
                self._records.pop(name, None)
            else:
                self._records[name] = record

    def known(self, name: str) -> bool:
        with self._lock:
            return name in self._records or name in self._static

    def get(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            rec = self._records.get(name)
            if rec is not None:
                return dict(rec)
            path = self._static.get(name)
        if path is None:
            return None
        return {"name": name, "location": str(path), "kind": "path", "static": True}

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            names = sorted(set(self._records) | set(self._static))
        return [r for r in (self.get(n) for n in names) if r is not None]

    def names(self) -> list[str]:
        with self._lock:
            return sorted(set(self._records) | set(self._static))

    def __len__(self) -> int:
        with self._lock:
            return len(set(self._records) | set(self._static))


class CheckoutResolver:
    """The executor's lookup (Workspaces' ``lookup``): name -> local git repository path, for
    registered repositories. A path is used as it is; a URL is cloned (bare, once) under
    `clones_dir` and fetched again when the record changes."""

    def __init__(self, registry: RepositoryRegistry, clones_dir: Path) -> None:
        self.registry = registry
        self.clones_dir = clones_dir
        self._lock = threading.Lock()
        self._cloned: dict[str, str] = {}

    def __call__(self, name: str) -> Path | None:
        rec = self.registry.get(name)
        if rec is None:
            return None
        location = str(rec["location"])
        if location.startswith("/"):
            return Path(location)
        target = self.clones_dir / f"{name}.git"
        with self._lock:
            if self._cloned.get(name) == location and target.exists():
                return target
            env = {"PATH": "/usr/bin:/bin", "GIT_TERMINAL_PROMPT": "0", "HOME": "/nonexistent",
                   "GIT_CONFIG_NOSYSTEM": "1"}
            if target.exists():
                cmd = ["git", "-C", str(target), "fetch", "--prune", location,
                       "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"]
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                cmd = ["git", "clone", "--bare", "--", location, str(target)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"cannot fetch {location}: {proc.stderr.strip()[:300]}")
            self._cloned[name] = location
        return target


# -- direct topic access (tests, tools; the CLI goes through the API) -----------------------------
def put(settings: Settings, record: dict[str, Any]) -> None:
    writer = TopicWriter(settings)
    try:
        writer.put(REPOSITORIES_TOPIC, str(record["name"]), record)
    finally:
        writer.close()


def delete(settings: Settings, name: str) -> None:
    writer = TopicWriter(settings)
    try:
        writer.put(REPOSITORIES_TOPIC, name, None)
    finally:
        writer.close()


def list_registered(settings: Settings) -> list[dict[str, Any]]:
    return sorted(read_all(settings, REPOSITORIES_TOPIC).values(), key=lambda r: str(r["name"]))
