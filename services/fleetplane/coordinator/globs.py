"""Write-scope globs: matching a path, and deciding exactly whether two globs overlap.

Syntax (paths are relative, '/'-separated, no empty, '.' or '..' segments):

* ``*``      any run of characters inside one segment (not '/'), also empty
* ``?``      one character other than '/'
* ``[abc]`` ``[a-z]`` ``[!a-z]`` (or ``[^a-z]``)  one character of (not of) the class, never '/'
* ``**``     as a whole segment: zero or more whole segments (elsewhere it is ``*``)
* ``\\c``    the character c literally
* a glob covers what it matches **and everything below it**: ``src`` and ``src/`` lease the
  directory ``src`` with its contents, like ``src/**``; ``src/*.py`` covers ``src/a.py`` (and
  ``src/a.py/x``, which cannot be a file when ``src/a.py`` is one, so nothing is lost).

Two globs overlap when some path is covered by both. The decision is exact: each glob compiles
to a nondeterministic automaton over characters (transition labels are character sets, kept as
sorted code point intervals, so classes and negations cost nothing), and the product automaton is
searched for an accepting path whose string is a valid path (no empty segment), which is also
returned as a witness.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import lru_cache

MAX_CP = 0x10FFFF
SLASH = ord("/")

Intervals = tuple[tuple[int, int], ...]  # sorted, disjoint, inclusive code point ranges

ANY: Intervals = ((0, MAX_CP),)
NOSLASH: Intervals = ((0, SLASH - 1), (SLASH + 1, MAX_CP))


class GlobError(ValueError):
    """A write-scope glob that is not valid (the message says why)."""


def _normalize(ranges: list[tuple[int, int]]) -> Intervals:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def _complement(ranges: Intervals) -> Intervals:
    out: list[tuple[int, int]] = []
    start = 0
    for lo, hi in ranges:
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= MAX_CP:
        out.append((start, MAX_CP))
    return tuple(out)


def _intersect(a: Intervals, b: Intervals) -> Intervals:
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tuple(out)


def _minus_slash(a: Intervals) -> Intervals:
    return _intersect(a, NOSLASH)


def _contains(a: Intervals, cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in a)


# -- compilation: glob -> epsilon-NFA ----------------------------------------------------------
@dataclass
class _NFA:
    """States 0..n-1; ``edges[s]`` = [(label, target)]; ``eps[s]`` = [target]."""

    edges: list[list[tuple[Intervals, int]]]
    eps: list[list[int]]
    start: int
    accept: int

    def new(self) -> int:
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1


def split(pattern: str) -> list[str]:
    """Validate and split a glob into segments (a trailing '/' or '/**' adds nothing: every
    glob covers everything below what it matches)."""
    if not pattern or not pattern.strip():
        raise GlobError("empty write-scope glob")
    if pattern.startswith("/"):
        raise GlobError(f"{pattern!r}: write-scope globs are relative to the repository root")
    raw = pattern.rstrip("/").split("/") if pattern.rstrip("/") else []
    segs = [s for s in raw if s != "."]
    if not segs:
        raise GlobError(f"{pattern!r}: names no path")
    for s in segs:
        if s == "":
            raise GlobError(f"{pattern!r}: empty path segment")
        if s == "..":
            raise GlobError(f"{pattern!r}: '..' is not allowed")
        _tokens(s, pattern)  # raises on a bad class
    while len(segs) > 1 and segs[-1] == "**":
        segs.pop()
    return segs


def _tokens(seg: str, pattern: str) -> list[tuple[str, Intervals]]:
    """A segment as ("char", label) and ("star", label) tokens."""
    out: list[tuple[str, Intervals]] = []
    i = 0
    while i < len(seg):
        c = seg[i]
        if c == "*":
            while i + 1 < len(seg) and seg[i + 1] == "*":
                i += 1
            out.append(("star", NOSLASH))
        elif c == "?":
            out.append(("char", NOSLASH))
        elif c == "[":
            end, label = _char_class(seg, i, pattern)
            out.append(("char", label))
            i = end
        elif c == "\\" and i + 1 < len(seg):
            i += 1
            out.append(("char", ((ord(seg[i]), ord(seg[i])),)))
        else:
            out.append(("char", ((ord(c), ord(c)),)))
        i += 1
    return out


def _char_class(seg: str, i: int, pattern: str) -> tuple[int, Intervals]:
    """Parse ``[...]`` starting at seg[i]; returns (index of ']', label)."""
    j = i + 1
    negate = j < len(seg) and seg[j] in "!^"
    if negate:
        j += 1
    ranges: list[tuple[int, int]] = []
    first = True
    while j < len(seg) and (seg[j] != "]" or first):
        lo = seg[j]
        if j + 2 < len(seg) and seg[j + 1] == "-" and seg[j + 2] != "]":
            hi = seg[j + 2]
            if ord(hi) < ord(lo):
                raise GlobError(f"{pattern!r}: bad range {lo}-{hi}")
            ranges.append((ord(lo), ord(hi)))
            j += 3
        else:
            ranges.append((ord(lo), ord(lo)))
            j += 1
        first = False
    if j >= len(seg):
        raise GlobError(f"{pattern!r}: unclosed '['")
    label = _normalize(ranges)
    if negate:
        label = _complement(label)
    label = _minus_slash(label)
    if not label:
        raise GlobError(f"{pattern!r}: a class that matches no character")
    return j, label


@lru_cache(maxsize=4096)
def compile_glob(pattern: str) -> _NFA:
    """The automaton of the paths a glob covers (what it matches and everything below)."""
    segs = split(pattern)
    nfa = _NFA(edges=[], eps=[], start=0, accept=0)
    cur = nfa.new()
    nfa.start = cur

    def char(label: Intervals) -> None:
        nonlocal cur
        nxt = nfa.new()
        nfa.edges[cur].append((label, nxt))
        cur = nxt

    def star(label: Intervals) -> None:  # cur -label-> cur
        nfa.edges[cur].append((label, cur))

    for k, seg in enumerate(segs):
        if seg == "**":
            if k == len(segs) - 1:  # only for the glob "**": any path
                star(ANY)
                continue
            # zero or more whole segments, each followed by '/': (ANY* '/')?
            begin = cur
            loop = nfa.new()
            nfa.eps[begin].append(loop)
            nfa.edges[loop].append((ANY, loop))
            after = nfa.new()
            nfa.edges[loop].append((((SLASH, SLASH),), after))
            nfa.eps[begin].append(after)
            cur = after
            continue
        for kind, label in _tokens(seg, pattern):
            if kind == "star":
                hub = nfa.new()  # a fresh state so loops of adjacent stars don't merge
                nfa.eps[cur].append(hub)
                cur = hub
                star(label)
            else:
                char(label)
        if k < len(segs) - 1:
            char(((SLASH, SLASH),))
    # everything below: ('/' ANY*)?
    end = nfa.new()
    nfa.eps[cur].append(end)
    below = nfa.new()
    nfa.edges[cur].append((((SLASH, SLASH),), below))
    nfa.edges[below].append((ANY, below))
    nfa.eps[below].append(end)
    nfa.accept = end
    return nfa


def _closure(nfa: _NFA, states: frozenset[int]) -> frozenset[int]:
    seen = set(states)
    stack = list(states)
    while stack:
        for t in nfa.eps[stack.pop()]:
            if t not in seen:
                seen.add(t)
                stack.append(t)
    return frozenset(seen)


def matches(pattern: str, path: str) -> bool:
    """True when `path` is covered by `pattern` (the path itself or one of its ancestors
    matches)."""
    nfa = compile_glob(pattern)
    states = _closure(nfa, frozenset({nfa.start}))
    for ch in path:
        cp = ord(ch)
        nxt = {t for s in states for label, t in nfa.edges[s] if _contains(label, cp)}
        if not nxt:
            return False
        states = _closure(nfa, frozenset(nxt))
    return nfa.accept in states


def _eps_single(nfa: _NFA, s: int) -> frozenset[int]:
    return _closure(nfa, frozenset({s}))


def _pick(label: Intervals) -> str:
    """A readable character of a non-empty label (for witnesses)."""
    for preferred in "abcxyz0123456789_.-":
        if _contains(label, ord(preferred)):
            return preferred
    lo = label[0][0]
    return chr(lo)


@lru_cache(maxsize=65536)
def witness(a: str, b: str) -> str | None:
    """A path covered by both globs, or None when they do not overlap (exact)."""
    na, nb = compile_glob(a), compile_glob(b)
    # product states: (state in a, state in b, previous char was '/' or nothing yet)
    start = (na.start, nb.start, True)
    parent: dict[tuple[int, int, bool], tuple[tuple[int, int, bool], str] | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        sa, sb, after_slash = node
        ca, cb = _eps_single(na, sa), _eps_single(nb, sb)
        if not after_slash and na.accept in ca and nb.accept in cb:
            out: list[str] = []
            cur: tuple[int, int, bool] | None = node
            while cur is not None and parent[cur] is not None:
                prev, ch = parent[cur]  # type: ignore[misc]
                out.append(ch)
                cur = prev
            return "".join(reversed(out))
        for x in ca:
            for la, ta in na.edges[x]:
                for y in cb:
                    for lb, tb in nb.edges[y]:
                        both = _intersect(la, lb)
                        if not both:
                            continue
                        steps: list[tuple[tuple[int, int, bool], str]] = []
                        if not after_slash and _contains(both, SLASH):
                            steps.append(((ta, tb, True), "/"))
                        other = _minus_slash(both)
                        if other:
                            steps.append(((ta, tb, False), _pick(other)))
                        for nxt, ch in steps:
                            if nxt not in parent:
                                parent[nxt] = (node, ch)
                                queue.append(nxt)
    return None


@lru_cache(maxsize=65536)
def literal_prefix(pattern: str) -> tuple[str, ...]:
    """The leading segments without wildcards (or escapes)."""
    out: list[str] = []
    for seg in split(pattern):
        if any(c in seg for c in "*?[\\"):
            break
        out.append(seg)
    return tuple(out)


def overlaps(a: str, b: str) -> bool:
    """True when some path is covered by both globs (order does not matter).

    Fast path: two globs whose leading literal segments differ at some position cannot cover
    a common path (each of those segments must equal the path's segment there)."""
    for x, y in zip(literal_prefix(a), literal_prefix(b), strict=False):
        if x != y:
            return False
    if a > b:
        a, b = b, a
    return witness(a, b) is not None


def scope_overlap(scope_a: list[str], scope_b: list[str]) -> list[tuple[str, str]]:
    """The pairs (glob of a, glob of b) that overlap."""
    return [(x, y) for x in scope_a for y in scope_b if overlaps(x, y)]


def covered(scope: list[str], path: str) -> bool:
    """True when `path` lies inside the write scope."""
    return any(matches(g, path) for g in scope)


def validate_scope(scope: list[str]) -> str | None:
    """The reason the write scope is invalid, or None."""
    for g in scope:
        try:
            split(g)
        except GlobError as exc:
            return str(exc)
    return None
