"""Error taxonomy: every handler error says whether to retry.

* ``Retriable``: transient (a dependency is down, a timeout). The loop retries the record with the
  backoff of its RetryPolicy; when retries run out the record goes to the dead-letter topic.
* ``NotRetriable``: the record itself is bad. It goes to the dead-letter topic at once, with the
  reason and its original headers, and the flow goes on.
* ``Fatal``: the process cannot go on (misconfiguration, fenced producer). The loop stops without
  storing the offset, so the record is redelivered to the next instance.
Any other exception is treated as NotRetriable (logged with its traceback).
"""

from __future__ import annotations

from dataclasses import dataclass

#: the exit status of a service process that asks its supervisor for a restart (EX_TEMPFAIL):
#: a coordinator that stood down for a later claimant, a transactional call that hung. The
#: local supervisor and `Stack.wait_ready` restart such a process instead of failing on it.
EXIT_RESTART = 75


class FleetplaneError(Exception):
    retriable: bool = False


class Retriable(FleetplaneError):
    retriable = True


class NotRetriable(FleetplaneError):
    retriable = False


class Fatal(FleetplaneError):
    retriable = False


@dataclass(frozen=True)
class RetryPolicy:
    """How the loop retries a record whose handler raised Retriable.

    initial_interval_s: first backoff; multiplied by backoff_coefficient each attempt, capped at
    maximum_interval_s; maximum_attempts counts the first try (1 disables retries).
    """

    initial_interval_s: float = 0.2
    backoff_coefficient: float = 2.0
    maximum_interval_s: float = 5.0
    maximum_attempts: int = 5

    def delay(self, attempt: int) -> float:
        """Backoff before retry number `attempt` (1-based)."""
        raw = self.initial_interval_s * self.backoff_coefficient ** (attempt - 1)
        return float(min(self.maximum_interval_s, raw))
