"""Git worktrees per attempt: registered repositories, create, commit, remove, roll back, orphans.

Every host-side git command names the repository's git directory explicitly and disables hooks and
fsmonitor (`-c core.hooksPath=/dev/null -c core.fsmonitor=false`): an agent can write files in its
worktree, and nothing it writes may make the executor run code on the host.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fleetplane.core.events import FileChange
from fleetplane.core.settings import Settings

TRAILER_TASK = "Fleetplane-Task"
TRAILER_ATTEMPT = "Fleetplane-Attempt"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_GIT_SAFE = ["-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false",
             "-c", "user.name=fleetplane executor", "-c", "user.email=executor@fleetplane.local",
             "-c", "commit.gpgsign=false"]


class WorkspaceError(Exception):
    """A git operation failed (the attempt fails with tool_error)."""


class WorkspaceConfigError(WorkspaceError):
    """The repository is not registered or the ref does not exist: permanent (the attempt fails
    with failure class `configuration`, never retried)."""


def load_repositories(settings: Settings) -> dict[str, Path]:
    """name -> repository path: infra/repositories.yaml (`repositories: {name: path}`), then
    FLEETPLANE_EXECUTOR_REPOSITORIES (JSON) on top. Relative paths are relative to the file."""
    repos: dict[str, Path] = {}
    path = settings.executor_repositories_file
    if path.exists():
        raw = yaml.safe_load(path.read_text()) or {}
        for name, value in (raw.get("repositories") or {}).items():
            p = Path(str(value)).expanduser()
            repos[str(name)] = p if p.is_absolute() else (path.parent / p).resolve()
    for name, value in settings.executor_repositories.items():
        repos[name] = Path(value).expanduser().resolve()
    return repos


def safe_name(text: str) -> str:
    return _SAFE.sub("-", text).strip("-.")[:100] or "x"


def branch_name(task_id: str, attempt: int) -> str:
    return f"fleetplane/{safe_name(task_id)}/attempt-{attempt}"


def _git(repo: Path, *args: str, cwd: Path | None = None, check: bool = True,
         input_text: str | None = None) -> str:
    proc = subprocess.run(["git", *_GIT_SAFE, *args], cwd=cwd or repo, capture_output=True,
                          text=True, input=input_text, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "GIT_TERMINAL_PROMPT": "0",
                               "HOME": "/nonexistent", "GIT_CONFIG_NOSYSTEM": "1"})
    if check and proc.returncode != 0:
        raise WorkspaceError(f"git {' '.join(args[:3])}: {proc.stderr.strip()[:400]}")
    return proc.stdout


@dataclass
class Worktree:
    repository: str
    repo_path: Path
    path: Path
    branch: str
    base: str
    gitdir: Path = field(default_factory=Path)

    def git(self, *args: str, check: bool = True, input_text: str | None = None) -> str:
        return _git(self.repo_path, f"--git-dir={self.gitdir}", f"--work-tree={self.path}",
                    *args, cwd=self.path, check=check, input_text=input_text)


@dataclass(frozen=True)
class Commit:
    sha: str | None
    files: list[FileChange]


@dataclass(frozen=True)
class Rollback:
    reverted_commit: str | None
    files: list[str]
    reason: str


def _numstat(text: str) -> list[FileChange]:
    files = []
    for line in text.splitlines():
        parts = line.split("\t", 2)
        if len(parts) != 3:
            continue
        added, removed, path = parts
        files.append(FileChange(path=path, added=int(added) if added.isdigit() else 0,
                                removed=int(removed) if removed.isdigit() else 0))
    return files


class Workspaces:
    """Creates and removes attempt worktrees under `root`, one directory per repository."""

    def __init__(self, repositories: dict[str, Path], root: Path,
                 lookup: Callable[[str], Path | None] | None = None) -> None:
        """`lookup`: registered repositories (fleet.repositories, ingest/repositories.py
        CheckoutResolver), consulted before the static `repositories`."""
        self.repositories = repositories
        self.root = root.resolve()
        self.lookup = lookup
        self._locks: dict[str, threading.Lock] = {n: threading.Lock() for n in repositories}
        self._locks_lock = threading.Lock()

    def repo(self, name: str) -> Path:
        try:
            found = self.lookup(name) if self.lookup is not None else None
        except Exception as exc:
            raise WorkspaceError(f"repository {name!r}: {exc}") from exc
        if found is None:
            found = self.repositories.get(name)
        if found is None:
            known = ", ".join(sorted(self.repositories)) or "none"
            raise WorkspaceConfigError(f"repository {name!r} is not registered (static: {known}; "
                                       "fleetplane repo add NAME PATH|URL)")
        with self._locks_lock:
            self._locks.setdefault(name, threading.Lock())
        return found

    def _gitdir(self, repo_path: Path) -> Path:
        common = _git(repo_path, "rev-parse", "--git-common-dir").strip()
        p = Path(common)
        return p if p.is_absolute() else (repo_path / p).resolve()

    def create(self, repository: str, task_id: str, attempt: int, ref: str) -> Worktree:
        repo_path = self.repo(repository)
        branch = branch_name(task_id, attempt)
        path = self.root / safe_name(repository) / f"{safe_name(task_id)}-a{attempt}"
        with self._locks[repository]:
            if path.exists():  # a leftover of a crashed run of this attempt
                self._remove_locked(repo_path, path)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                base = _git(repo_path, "rev-parse", "--verify", "--end-of-options",
                            f"{ref}^{{commit}}").strip()
            except WorkspaceError as exc:
                raise WorkspaceConfigError(f"ref {ref!r} is not a commit of {repository}: "
                                           f"{exc}") from exc
            _git(repo_path, "worktree", "add", "--force", "-B", branch, str(path), base)
            name = _git(repo_path, "rev-parse", "--git-dir", cwd=path).strip()
        gitdir = Path(name) if Path(name).is_absolute() else (path / name).resolve()
        return Worktree(repository, repo_path, path, branch, base, gitdir)

    def commit(self, wt: Worktree, task_id: str, attempt: int, title: str) -> Commit:
        """Commit everything the agent changed; (None, []) when it changed nothing."""
        with self._locks[wt.repository]:
            wt.git("add", "-A", "--", ".")
            files = _numstat(wt.git("diff", "--cached", "--numstat", "--no-renames", wt.base))
            if not files:
                return Commit(None, [])
            message = (f"{title}\n\nAgent changes of task {task_id}, attempt {attempt}.\n\n"
                       f"{TRAILER_TASK}: {task_id}\n{TRAILER_ATTEMPT}: {attempt}\n")
            wt.git("commit", "--no-verify", "-q", "-F", "-", input_text=message)
            sha = wt.git("rev-parse", "HEAD").strip()
        return Commit(sha, files)

    def remove(self, wt: Worktree, *, delete_branch: bool = False) -> None:
        with self._locks[wt.repository]:
            self._remove_locked(wt.repo_path, wt.path)
            if delete_branch:
                _git(wt.repo_path, "branch", "-D", wt.branch, check=False)

    def _remove_locked(self, repo_path: Path, path: Path) -> None:
        _git(repo_path, "worktree", "remove", "--force", "--force", str(path), check=False)
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        _git(repo_path, "worktree", "prune", check=False)

    # -- rollback ------------------------------------------------------------------------------
    def rollback(self, repository: str, task_id: str, attempt: int, ref: str) -> Rollback:
        """Undo attempt `attempt`: drop its branch and worktree if its commit is not on `ref`,
        else revert the commit on `ref` (compare-and-swap on the ref)."""
        repo_path = self.repo(repository)
        branch = branch_name(task_id, attempt)
        path = self.root / safe_name(repository) / f"{safe_name(task_id)}-a{attempt}"
        with self._locks[repository]:
            if path.exists():
                self._remove_locked(repo_path, path)
            commit = self._attempt_commit(repo_path, branch, task_id, attempt, ref)
            if commit is None:
                _git(repo_path, "branch", "-D", branch, check=False)
                return Rollback(None, [], "nothing to roll back: the attempt left no commit")
            files = [f.path for f in _numstat(_git(repo_path, "show", "--numstat",
                                                   "--format=", "--no-renames", commit))]
            merged = self._is_ancestor(repo_path, commit, ref)
            if not merged:
                _git(repo_path, "branch", "-D", branch, check=False)
                return Rollback(commit, files, f"branch {branch} with commit {commit[:12]} "
                                "deleted (not merged)")
            revert = self._revert_on(repo_path, repository, commit, ref, task_id, attempt)
            _git(repo_path, "branch", "-D", branch, check=False)
            return Rollback(commit, files, f"commit {commit[:12]} was merged into {ref}: "
                            f"reverted by {revert[:12]}")

    def _is_ancestor(self, repo_path: Path, commit: str, ref: str) -> bool:
        proc = subprocess.run(["git", *_GIT_SAFE, "merge-base", "--is-ancestor", commit, ref],
                              cwd=repo_path, capture_output=True, timeout=60)
        return proc.returncode == 0

    def _attempt_commit(self, repo_path: Path, branch: str, task_id: str, attempt: int,
                        ref: str) -> str | None:
        exists = _git(repo_path, "rev-parse", "--verify", "-q", f"refs/heads/{branch}",
                      check=False).strip()
        if exists:
            body = _git(repo_path, "log", "-1", "--format=%B", exists)
            if f"{TRAILER_TASK}: {task_id}" in body and f"{TRAILER_ATTEMPT}: {attempt}" in body:
                return exists
        found = _git(repo_path, "log", ref, "--fixed-strings", "--format=%H %B%x00",
                     f"--grep={TRAILER_TASK}: {task_id}", check=False)
        for entry in found.split("\x00"):
            entry = entry.strip()
            if entry and f"{TRAILER_ATTEMPT}: {attempt}\n" in entry + "\n":
                return entry.split(" ", 1)[0]
        return None

    def _revert_on(self, repo_path: Path, repository: str, commit: str, ref: str,
                   task_id: str, attempt: int) -> str:
        full_ref = _git(repo_path, "rev-parse", "--symbolic-full-name", ref).strip() or ref
        old = _git(repo_path, "rev-parse", ref).strip()
        tmp = self.root / safe_name(repository) / f"rollback-{safe_name(task_id)}-a{attempt}"
        if tmp.exists():
            self._remove_locked(repo_path, tmp)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        _git(repo_path, "worktree", "add", "--force", "--detach", str(tmp), old)
        try:
            _git(repo_path, "revert", "--no-edit", commit, cwd=tmp)
            new = _git(repo_path, "rev-parse", "HEAD", cwd=tmp).strip()
            _git(repo_path, "update-ref", full_ref, new, old)
        finally:
            self._remove_locked(repo_path, tmp)
        return new

    # -- orphans -------------------------------------------------------------------------------
    def clean_orphans(self, keep: set[Path] | None = None) -> list[str]:
        """Remove every worktree under `root` not in `keep` (at start-up: all of them), with its
        branch when the branch holds no commit of the attempt. Returns the removed paths."""
        keep = keep or set()
        removed: list[str] = []
        for name, repo_path in self.repositories.items():
            if not (repo_path / ".git").exists() and not (repo_path / "HEAD").exists():
                continue
            listing = _git(repo_path, "worktree", "list", "--porcelain", check=False)
            entries: list[tuple[Path, str | None]] = []
            path: Path | None = None
            for line in [*listing.splitlines(), ""]:
                if line.startswith("worktree "):
                    path = Path(line[len("worktree "):])
                elif line.startswith("branch ") and path is not None:
                    entries.append((path, line[len("branch refs/heads/"):]))
                    path = None
                elif line == "" and path is not None:
                    entries.append((path, None))
                    path = None
            with self._locks[name]:
                for p, branch in entries:
                    if p.resolve() in keep or self.root not in p.resolve().parents:
                        continue
                    self._remove_locked(repo_path, p)
                    removed.append(str(p))
                    if branch and branch.startswith("fleetplane/"):
                        tip = _git(repo_path, "log", "-1", "--format=%B", branch, check=False)
                        if TRAILER_TASK not in tip:
                            _git(repo_path, "branch", "-D", branch, check=False)
        if self.root.exists():
            for repo_dir in self.root.iterdir():
                for leftover in (repo_dir.iterdir() if repo_dir.is_dir() else []):
                    if leftover.resolve() not in keep:
                        shutil.rmtree(leftover, ignore_errors=True)
                        removed.append(str(leftover))
        return removed
