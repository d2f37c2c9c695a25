"""The takeover claim: one active coordinator when two standbys take the role at once.

Why. After the broker's SIGKILL the supervisor restarts every service with it, so both
coordinator processes start as standbys together, both see no progress of the dead active and
both take the role, a fraction of a second apart (chaos runs: 0.17 s). Each fenced the dead
holder (its epoch read from the ticks), neither fenced the other, and both decided until the
group's static membership fenced one's consumer 3-4 s later: tasks dispatched by both, teams
above their quota (stop 18, stop 19 run 2, stop 20 runs 7 and 8).

How. Every process that takes the active role first appends a claim (its epoch) to the
one-partition topic ``fleetplane-coordinator-claims``; the log orders the claims, and **the
latest claim wins** (as the group's static membership does: the member that joins last keeps
the partitions). Each transactional step of a claimant checks, after its producer registered
and initialised its transactional id and before it joins the group (``Processor.on_ready``):

* a claim after its own: a later claimant holds the role: it stands down (``StandDown``, the
  process exits with 75 and the supervisor restarts it as a standby) before it read or decided
  anything;
* claims before its own by other processes, since the claim of the holder its ticks named
  (fenced on takeover anyway): it fences their transactional ids (the generations registered
  in ``fleet.txn-ids``, read fresh) before its table is restored, so whatever they committed
  is in the changelog it restores and nothing they decide later commits. The claims before the
  named holder's were settled by that holder: a holder ticks only once a check of its own
  passed.

Why it holds: an earlier claimant E either checks after the later claim L was written, and
stands down, or checked before it; then E's registration (before its check) precedes L's
claim, which precedes L's reading of the registry, so L fences E's producers before L restores.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from fleetplane.core.errors import Fatal
from fleetplane.core.logging import get_logger
from fleetplane.core.settings import Settings

CLAIMS_TOPIC = "fleetplane-coordinator-claims"
#: earlier claims this recent are fenced by a later claimant (older holders were fenced or
#: stood down long ago: a takeover needs seconds)
RIVAL_WINDOW_S = 600.0
#: claims read back before one's own (claims come a few per restart)
LOOKBACK = 50
TIMEOUT_S = 30.0

log = get_logger(__name__)


class StandDown(Fatal):
    """A later claimant holds the active role: this process must not decide."""


@dataclass(frozen=True)
class Claim:
    epoch: str
    offset: int
    at_ms: int


def judge(claims: list[Claim], mine: Claim, previous: str | None = None,
          window_ms: float = RIVAL_WINDOW_S * 1000) -> tuple[list[Claim], Claim | None]:
    """The earlier claimants to fence and the later claim that wins over ``mine`` (if any).

    The ``previous`` holder (named by the latest tick) was fenced on takeover, and a holder
    ticks only after its own check, which settled every claimant before it (stood down or
    fenced): so the earlier claimants to fence are those after the previous holder's claim;
    without that claim in sight, every one of the window."""
    later = [c for c in claims if c.offset > mine.offset and c.epoch != mine.epoch]
    since = max((c.offset for c in claims if c.epoch == previous and c.offset < mine.offset),
                default=-1)
    earlier = [c for c in claims if since < c.offset < mine.offset and c.epoch != mine.epoch
               and c.at_ms >= mine.at_ms - window_ms]
    return earlier, (later[-1] if later else None)


class ActiveClaim:
    """This process's claim of the active role, and the check each step runs before it joins."""

    def __init__(self, settings: Settings, epoch: str,
                 fence: Callable[[str], None]) -> None:
        self.settings = settings
        self.epoch = epoch
        self.fence = fence  # fences every transactional id of an epoch
        self.mine: Claim | None = None
        self.fenced: set[str] = set()  # epochs whose ids this process fenced
        self.previous: str | None = None  # the holder fenced on takeover (its ticks' epoch)
        self.passed = threading.Event()  # a check passed: the earlier claimants are settled
        self._lock = threading.Lock()

    def claim(self) -> Claim:
        """Append this process's claim; acknowledged before it returns."""
        # not idempotent: a duplicate of one's own claim is ignored (`judge`), and the
        # producer id it would first ask for costs a takeover about 0.5 s
        producer = Producer({**self.settings.client_config(), "acks": "all", "linger.ms": 0})
        at_ms = time.time_ns() // 1_000_000
        delivered: list[tuple[KafkaError | None, int | None]] = []
        producer.produce(CLAIMS_TOPIC, key=self.epoch.encode(),
                         value=json.dumps({"epoch": self.epoch, "at_ms": at_ms}).encode(),
                         on_delivery=lambda err, msg: delivered.append((err, msg.offset())))
        left = producer.flush(TIMEOUT_S)
        if left or not delivered or delivered[0][0] is not None:
            raise Fatal(f"{CLAIMS_TOPIC}: the claim of {self.epoch} was not acknowledged "
                        f"({delivered[0][0] if delivered else 'timed out'})")
        self.mine = Claim(self.epoch, delivered[0][1] or 0, at_ms)
        log.info("claimed the active role", epoch=self.epoch, offset=self.mine.offset)
        return self.mine

    def check(self) -> None:
        """Before a step joins the group: stand down if a later claim exists, else fence the
        recent earlier claimants (once each)."""
        if self.mine is None:
            self.passed.set()
            return
        with self._lock:
            earlier, winner = judge(self.read(), self.mine, self.previous)
            if winner is not None:
                log.critical("a later coordinator claimed the active role: standing down",
                             epoch=self.epoch, winner=winner.epoch)
                raise StandDown(f"the active role was claimed later by {winner.epoch}")
            for rival in earlier:
                if rival.epoch not in self.fenced:
                    self.fence(rival.epoch)
                    self.fenced.add(rival.epoch)
                    log.warning("fenced an earlier claimant of the active role",
                                epoch=self.epoch, rival=rival.epoch)
            self.passed.set()

    def read(self) -> list[Claim]:
        """The claims from LOOKBACK before this process's to the partition's end, read fresh."""
        assert self.mine is not None
        consumer = Consumer({**self.settings.client_config(),
                             "group.id": f"{CLAIMS_TOPIC}-reader", "enable.auto.commit": False,
                             "enable.partition.eof": True})
        tp = TopicPartition(CLAIMS_TOPIC, 0)
        claims: list[Claim] = []
        try:
            low, end = consumer.get_watermark_offsets(tp, timeout=10, cached=False)
            consumer.assign([TopicPartition(CLAIMS_TOPIC, 0,
                                            max(low, self.mine.offset - LOOKBACK))])
            deadline, done = time.monotonic() + TIMEOUT_S, False
            while not done:
                if time.monotonic() > deadline:
                    raise Fatal(f"{CLAIMS_TOPIC}: not read to its end within {TIMEOUT_S:.0f}s")
                for msg in consumer.consume(100, 0.5):
                    err = msg.error()
                    if err is not None:
                        done = done or err.code() == KafkaError._PARTITION_EOF
                        continue
                    offset = msg.offset() or 0
                    done = done or offset + 1 >= end
                    try:
                        body = json.loads(msg.value() or b"{}")
                        claims.append(Claim(str(body["epoch"]), offset, int(body["at_ms"])))
                    except (ValueError, KeyError, TypeError):
                        log.warning("unreadable claim skipped", offset=offset)
        except KafkaException as exc:
            raise Fatal(f"{CLAIMS_TOPIC}: {exc}") from exc
        finally:
            consumer.close()
        return claims
