"""A standby's judgement of the active coordinator: is it dead, or only slow?

The group decides who is active: the process assigned the scheduler partition (through the
role's static member id, see docs/coordinator.md, Failover). On Apache Kafka a dead member is
expired after its session timeout (librdkafka heartbeats from a thread of its own, untouched by
the Python interpreter's load) and the partition moves by itself. The pinned embedded broker
never expires a member killed with SIGKILL, so a standby must tell when to take the role: this
class is that judgement, and it is built so that load cannot trip it:

* **Progress, not arrival.** The evidence is broker state the active moves: the end of the
  scheduler topic (its ticks and forwarded records), the end of the changelog (its decisions)
  and the scheduler group's committed offset (every transaction it commits). The standby reads
  them with fresh requests; if the active made any progress while the standby itself was
  starved of CPU, the next look sees it (a look that came late is no evidence of silence, as
  the arrival time of a record was).
* **Enough looks.** Silence needs ``min_looks`` answered looks in a row that saw nothing move,
  spread over at least half the timeout: a standby that wakes up once after a long stall
  cannot decide from that one look.
* **No answer is no evidence.** A look that fails (broker away or too slow to answer) restarts
  the wait: the active cannot progress either.
* **The timeout adapts to the load.** It is ``max(takeover_s, factor x the longest proven gap
  of the active over the recent past)``: on a loaded machine where the active's ticks come 2 s
  apart, a takeover needs about 4 x 2 = 8 s of silence instead of 5. A gap is *proven* by the
  looks that saw the marks unchanged: from the look that saw them move to the last look that
  still saw them as they were. The time between two looks is not counted: a standby starved of
  CPU looks late, which says nothing about the active (counting it made the standby's own
  stalls lengthen every later takeover: 10.5 s at load 44 after a 2.6 s stall of its looks).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

Marks = tuple[int, ...]


@dataclass
class Liveness:
    takeover_s: float
    now: float
    factor: float = 4.0
    min_looks: int = 4
    history: int = 240  # progress steps remembered for the adaptive timeout
    max_timeout_s: float = 60.0  # however slow the past, a dead active is replaced by then
    marks: Marks | None = None
    since: float = 0.0  # when progress was last seen (or the wait restarted)
    quiet_looks: int = 0
    first_quiet: float | None = None
    last_quiet: float = 0.0  # the latest look that saw the marks unchanged
    gaps: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.since = self.now

    def timeout(self) -> float:
        longest = max(self.gaps, default=0.0)
        return max(self.takeover_s, min(self.max_timeout_s, self.factor * longest))

    def reset(self, now: float) -> None:
        """A look that got no answer: no evidence either way, the wait starts again."""
        self.since = now
        self.quiet_looks = 0
        self.first_quiet = None

    def observe(self, marks: Marks, now: float) -> bool:
        """One answered look at the progress marks; True: the active is gone, take over."""
        if marks != self.marks:
            if self.marks is not None:
                self.gaps.append(self.last_quiet - self.since if self.quiet_looks else 0.0)
                while len(self.gaps) > self.history:
                    self.gaps.popleft()
            self.marks = marks
            self.reset(now)
            return False
        self.quiet_looks += 1
        self.last_quiet = now
        if self.first_quiet is None:
            self.first_quiet = now
        timeout = self.timeout()
        return (self.quiet_looks >= self.min_looks and now - self.since >= timeout
                and now - self.first_quiet >= timeout / 2)

    def describe(self, now: float) -> dict[str, object]:
        """For the takeover's log line: what the decision was based on."""
        return {"quiet_s": round(now - self.since, 2), "quiet_looks": self.quiet_looks,
                "timeout_s": round(self.timeout(), 2),
                "longest_gap_s": round(max(self.gaps, default=0.0), 2),
                "marks": list(self.marks) if self.marks else None}
