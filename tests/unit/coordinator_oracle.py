"""The admission of the scheduler before it was made incremental (a full pass over every
waiting task on each event), kept only as the oracle of the replay-equivalence test
(tests/unit/test_coordinator_replay.py): same inputs, same decisions."""

from __future__ import annotations

from collections import Counter
from datetime import datetime

from fleetplane.coordinator.scheduler import Scheduler, _quota_reason, _why_expired
from fleetplane.coordinator.state import TaskRow
from fleetplane.coordinator.world import rank as _rank


class FullPassScheduler(Scheduler):
    def _expired(self, at: datetime) -> list[tuple[str, TaskRow, str]]:
        """Every active attempt classified at every tick (no deadline kept per row)."""
        timeouts = self._timeouts()
        found = ((t, s, _why_expired(s, at, *timeouts)) for t, s in self.world.active.items())
        return [(t, s, why) for t, s, why in found if why is not None]

    def _release_backoffs(self) -> None:
        for state in sorted(self.world.waiting.values(), key=lambda s: s.task_id):
            if state.hold_kind == "backoff" and (state.not_before is None
                                                 or state.not_before <= self.at):
                self._put(state, hold_kind=None, held_by=None, hold_reason="", not_before=None)
                self.admit_needed = True

    def _admit(self) -> None:  # type: ignore[override]
        world, fleet = self.world, self.world.fleet
        active, running = world.active, Counter(world.running)
        if fleet.kill_switch:
            for s in sorted(world.waiting.values(), key=_rank):
                if s.ready:
                    self._hold(s, "kill_switch", f"kill switch on: {fleet.kill_switch_reason}")
            return
        # one cheap look at each waiting task: skip those whose reported hold still stands
        # (their holder is active, or their team is still blocked for the reported reason)
        blocks: dict[str, tuple[str, str] | None] = {}
        queues: dict[str, list[TaskRow]] = {}
        look = [*world.candidates.values(), *(world.tasks[t] for t in sorted(world.recheck))]
        for s in look:
            if not s.ready or s.spec is None:
                continue
            if s.hold_kind == "conflict" and s.held_by in active:
                continue
            if s.team not in blocks:
                blocks[s.team] = self._team_block(s.team, running[s.team])
            block = blocks[s.team]
            if block is not None:
                self._hold_blocked(s, *block)
                continue
            queues.setdefault(s.team, []).append(s)
        for queue in queues.values():
            queue.sort(key=_rank)
        capacity = self.policy.max_running - len(active)
        open_teams = sorted(queues)
        heads: dict[str, int] = dict.fromkeys(open_teams, 0)  # first unexamined in queue
        while capacity > 0 and heads:
            best: tuple[tuple[float, int, int, str], str, TaskRow] | None = None
            for team in sorted(heads):
                queue, i = queues[team], heads[team]
                policy = self.policy.team(team)
                if running[team] >= policy.max_running:
                    for s in queue[i:]:
                        self._hold_blocked(s, "quota", _quota_reason(team, policy.max_running))
                    del heads[team]
                    continue
                while i < len(queue):
                    s = queue[i]
                    conflict = self._conflict(s)
                    if conflict is None:
                        break
                    self._hold(s, "conflict", *conflict)
                    i += 1
                heads[team] = i
                if i >= len(queue):
                    del heads[team]
                    continue
                s = queue[i]
                key = (running[team] / policy.weight, *_rank(s))
                if best is None or key < best[0]:
                    best = (key, team, s)
            if best is None:
                break
            _, team, s = best
            self._dispatch(s)
            heads[team] += 1
            if heads[team] >= len(queues[team]):
                del heads[team]
            running[team] += 1
            capacity -= 1
        if capacity <= 0:
            for team, i in heads.items():
                for s in queues[team][i:]:
                    self._hold_blocked(s, "quota",
                               f"the fleet is at its limit of {self.policy.max_running} "
                               "running tasks")

