"""Retries of transient failures: the policy, and which failures are transient.

A call is one transaction that the client opens itself (``BEGIN``, ``SELECT
tokentrack.<function>(...)``, ``COMMIT``), so the client knows how far it got when it fails:

* before ``COMMIT`` was sent (acquiring a connection, ``BEGIN``, the function call): the
  transaction certainly did not commit. A transient failure here is retried for every call,
  ``increment_usage`` included.
* while ``COMMIT`` was in flight and the connection broke: the outcome is unknown. The
  idempotent calls (all but ``increment_usage`` and ``open_usage_period``) are retried, which
  is safe because their retry answers the first result (``existing``, ``duplicate``,
  ``already_finalized``); the others raise :class:`~tokentrack_client.ConnectionLost` with
  ``outcome_unknown=True``.
* an error answered to ``COMMIT`` itself (40001, 40P01) means it rolled back: retried.

Transient: a broken connection (asyncpg's connection errors, ``OSError``, SQLSTATE class 08),
the server shutting down or restarting (57P01 admin_shutdown, which is also what
``pg_terminate_backend`` sends, 57P02 crash_shutdown, 57P03 cannot_connect_now), too many
connections (53300), serialization failures (40001) and deadlocks (40P01). Retrying over a
broken connection needs a new connection, so it happens only when the client was given a
pool; with a single connection a broken connection is raised at once.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from enum import Enum

import asyncpg

__all__ = [
    "DEFAULT_RETRY",
    "NO_RETRY",
    "Phase",
    "RetryPolicy",
    "is_connection_failure",
    "is_rolled_back",
    "sqlstate_of",
]


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with full jitter.

    Attempt ``n`` (counting from 1) that failed transiently is followed by a pause drawn
    uniformly from ``[0, min(max_delay, initial_delay * multiplier ** (n - 1))]`` seconds,
    at most ``max_attempts`` attempts in all. The defaults (5 attempts, 50 ms doubling to at
    most 2 s) ride out a backend being terminated, a failover of a few hundred milliseconds
    or a deadlock, and give up within about 4 seconds.
    """

    max_attempts: int = 5
    initial_delay: float = 0.05
    max_delay: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(
                f"max_attempts must be an integer of at least 1: {self.max_attempts!r}"
            )
        for name in ("initial_delay", "max_delay"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number of seconds >= 0: {value!r}")
        if not (math.isfinite(self.multiplier) and self.multiplier >= 1):
            raise ValueError(f"multiplier must be at least 1: {self.multiplier!r}")

    def backoff_ceiling(self, attempt: int) -> float:
        """The largest pause after failed attempt ``attempt`` (1-based)."""
        exponent = min(max(attempt - 1, 0), 64)
        return float(min(self.max_delay, self.initial_delay * self.multiplier**exponent))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The jittered pause after failed attempt ``attempt`` (1-based)."""
        draw = (rng or random).uniform(0.0, 1.0)
        return draw * self.backoff_ceiling(attempt)


DEFAULT_RETRY = RetryPolicy()
"""The policy a :class:`~tokentrack_client.TokenTracker` uses unless given another."""

NO_RETRY = RetryPolicy(max_attempts=1)
"""No retries: every transient failure is raised at once."""


class Phase(Enum):
    """How far one attempt got before it failed."""

    ACQUIRE = "acquire"  # getting a connection from the pool: nothing was sent
    BEGIN = "begin"  # BEGIN: nothing was done
    CALL = "call"  # the function call: COMMIT was not sent, so nothing committed
    COMMIT = "commit"  # COMMIT was sent: a broken connection leaves the outcome unknown


ROLLED_BACK_SQLSTATES = frozenset({"40001", "40P01"})
"""serialization_failure, deadlock_detected: the server rolled the transaction back."""

CONNECTION_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})
"""admin_shutdown (pg_terminate_backend), crash_shutdown, cannot_connect_now,
too_many_connections; plus the whole class 08 (connection exception)."""


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of an asyncpg server error, else None."""
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None)
        return state if isinstance(state, str) else None
    return None


def is_rolled_back(exc: BaseException) -> bool:
    """Serialization failure or deadlock: the server rolled back; any call may be retried."""
    return sqlstate_of(exc) in ROLLED_BACK_SQLSTATES


def is_connection_failure(exc: BaseException, connection_closed: bool) -> bool:
    """The connection broke, could not be opened, or the server is shutting down."""
    if connection_closed:
        return True
    state = sqlstate_of(exc)
    if state is not None:
        return state.startswith("08") or state in CONNECTION_SQLSTATES
    return isinstance(exc, OSError | ConnectionError | asyncpg.PostgresConnectionError)
