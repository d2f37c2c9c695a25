"""Token buckets: per-team intake rate limits (infra/teams.yaml `rate_limit`) and the limit on
failed token checks per client address (token guessing).

Each ingest replica keeps its own buckets in memory: with N replicas behind a load balancer a team
may submit up to N times its rate (docs/intake.md)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_KEYS = 100_000


@dataclass
class Bucket:
    rate: float        # tokens per second
    burst: float       # capacity
    tokens: float
    updated: float

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take `cost` tokens; returns 0 on success, else the seconds until they are there."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate


class Limiter:
    """One bucket per key (team, client address); `limits(key)` gives (rate/s, burst)."""

    def __init__(self, limits: Callable[[str], tuple[float, float]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def _bucket(self, key: str, now: float) -> Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            rate, burst = self.limits(key)
            bucket = Bucket(rate=rate, burst=burst, tokens=burst, updated=now)
            self._buckets[key] = bucket
            if len(self._buckets) > MAX_KEYS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def take(self, key: str, cost: float = 1.0) -> float:
        """0 when allowed, else the seconds to wait (for Retry-After)."""
        with self._lock:
            now = self.clock()
            return self._bucket(key, now).take(now, cost)

    def blocked_for(self, key: str) -> float:
        """Seconds until `key` has a whole token again (0: not blocked); takes nothing."""
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                return 0.0
            now = self.clock()
            tokens = min(bucket.burst, bucket.tokens + (now - bucket.updated) * bucket.rate)
            return 0.0 if tokens >= 1.0 else (1.0 - tokens) / bucket.rate
