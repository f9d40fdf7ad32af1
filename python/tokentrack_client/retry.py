"""Retries of transient failures: the policy, and which failures are transient.

A call in an explicit transaction that the client opens itself (``BEGIN``, ``SELECT
tokentrack.<function>(...)``, ``COMMIT``) tells the client how far it got when it fails:

* before ``COMMIT`` was sent (acquiring a connection, ``BEGIN``, the function call): the
  transaction certainly did not commit. A transient failure here is retried for every call,
  ``increment_usage`` included.
* while ``COMMIT`` was in flight and the connection broke: the outcome is unknown. The
  idempotent calls (all but ``increment_usage`` and ``open_usage_period``) are retried, which
  is safe because their retry answers the first result (``existing``, ``duplicate``,
  ``already_finalized``); the others raise :class:`~tokentrack_client.ConnectionLost` with
  ``outcome_unknown=True``.
* an error answered to ``COMMIT`` itself (40001, 40P01) means it rolled back: retried.

An idempotent call made as one statement of its own (see :mod:`tokentrack_client.client`)
counts as the call phase when the server answered an error (its transaction rolled back), and
as the commit phase when the connection broke while it was in flight (the outcome unknown).

Transient: a broken connection (asyncpg's connection errors, ``OSError``, SQLSTATE class 08),
the server shutting down or restarting (57P01 admin_shutdown, which is also what
``pg_terminate_backend`` sends, 57P02 crash_shutdown, 57P03 cannot_connect_now), too many
connections (53300), serialization failures (40001) and deadlocks (40P01). Retrying over a
broken connection needs a new connection, so it happens only when the client was given a
pool; with a single connection a broken connection is raised at once.

A timeout is not transient: the server cancelling the statement (57014 statement_timeout or a
cancel request, 55P03 lock_timeout) or the driver's own timeout (asyncpg's ``command_timeout``,
a ``TimeoutError`` once the connection was had) ends the call with
:class:`~tokentrack_client.CallTimeout`. It is retried only when the policy says
``retry_timeouts=True``, by the same rules as a broken connection.
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
    "is_timeout",
    "sqlstate_of",
]


@dataclass(frozen=True)
class RetryPolicy:
    """Jittered exponential backoff, bounded by a deadline and optionally by a count.

    Attempt ``n`` (counting from 1) that failed transiently is followed by a pause drawn
    uniformly from ``[0, min(max_delay, initial_delay * multiplier ** (n - 1))]`` seconds
    ("full jitter"). Another attempt is made only while both bounds allow it:

    * ``deadline`` (seconds, default 60): no attempt starts later than ``deadline`` seconds
      after the first one started; a pause that would end past it is shortened to end at it.
      ``None``: no time bound. An attempt already running is not interrupted (bound it with
      the tracker's ``timeout``).
    * ``max_attempts`` (default ``None``: as many as the deadline allows): at most this many
      attempts in all.

    The defaults (50 ms doubling to at most 2 s between attempts, for 60 s) ride out a backend
    being terminated, a deadlock, and a server restart or managed failover of up to about a
    minute; a server that is back is noticed within 2 s. ``retry_timeouts`` (default
    ``False``) also retries a :class:`~tokentrack_client.CallTimeout`.
    """

    max_attempts: int | None = None
    initial_delay: float = 0.05
    max_delay: float = 2.0
    multiplier: float = 2.0
    deadline: float | None = 60.0
    retry_timeouts: bool = False

    def __post_init__(self) -> None:
        if self.max_attempts is not None and (
            not isinstance(self.max_attempts, int)
            or isinstance(self.max_attempts, bool)
            or self.max_attempts < 1
        ):
            raise ValueError(
                f"max_attempts must be None or an integer of at least 1: {self.max_attempts!r}"
            )
        for name in ("initial_delay", "max_delay"):
            value = getattr(self, name)
            if not _seconds(value):
                raise ValueError(f"{name} must be a finite number of seconds >= 0: {value!r}")
        if not (_seconds(self.multiplier) and self.multiplier >= 1):
            raise ValueError(f"multiplier must be at least 1: {self.multiplier!r}")
        if self.deadline is not None and not _seconds(self.deadline):
            raise ValueError(
                f"deadline must be None or a finite number of seconds >= 0: {self.deadline!r}"
            )
        if self.max_attempts is None and self.deadline is None:
            raise ValueError("deadline and max_attempts cannot both be None (retries forever)")
        if not isinstance(self.retry_timeouts, bool):
            raise ValueError(f"retry_timeouts must be a bool: {self.retry_timeouts!r}")

    def backoff_ceiling(self, attempt: int) -> float:
        """The largest pause after failed attempt ``attempt`` (1-based)."""
        exponent = min(max(attempt - 1, 0), 64)
        return float(min(self.max_delay, self.initial_delay * self.multiplier**exponent))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The jittered pause after failed attempt ``attempt`` (1-based), before the bounds."""
        draw = (rng or random).uniform(0.0, 1.0)
        return draw * self.backoff_ceiling(attempt)

    def pause_after(
        self, attempt: int, elapsed: float, rng: random.Random | None = None
    ) -> float | None:
        """The pause before the next attempt, after failed attempt ``attempt`` (1-based)
        ``elapsed`` seconds after the first attempt started; ``None`` when no further
        attempt may be made (``max_attempts`` reached, or the deadline passed)."""
        if self.max_attempts is not None and attempt >= self.max_attempts:
            return None
        pause = self.delay(attempt, rng)
        if self.deadline is not None:
            left = self.deadline - elapsed
            if left <= 0:
                return None
            pause = min(pause, left)
        return pause


def _seconds(value: object) -> bool:
    """A finite, non-negative number (not a bool)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


DEFAULT_RETRY = RetryPolicy()
"""The policy a :class:`~tokentrack_client.TokenTracker` uses unless given another: retries
for up to 60 seconds, pauses of at most 2 seconds."""

NO_RETRY = RetryPolicy(max_attempts=1)
"""No retries: every transient failure is raised at once."""


class Phase(Enum):
    """How far one attempt got before it failed."""

    ACQUIRE = "acquire"  # getting a connection from the pool: nothing was sent
    BEGIN = "begin"  # BEGIN: nothing was done
    CALL = "call"  # the function call: COMMIT was not sent, so nothing committed
    COMMIT = "commit"  # COMMIT was sent: a broken connection or the driver's timeout leaves
    # the outcome unknown (an error the server answered to COMMIT means it rolled back)


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


TIMEOUT_SQLSTATES = frozenset({"57014", "55P03"})
"""query_canceled (statement_timeout, or a cancel request such as pg_cancel_backend),
lock_not_available (lock_timeout): the server ended the statement with an error, so its
transaction rolled back (none of the tokentrack functions catches either)."""


def is_timeout(exc: BaseException, phase: Phase, connection_closed: bool) -> bool:
    """The server cancelled the statement, or the driver's timeout expired on a connection
    that is still open (a ``TimeoutError`` while getting a connection is a connection
    failure: the server could not be reached in time)."""
    if connection_closed:
        return False
    if sqlstate_of(exc) in TIMEOUT_SQLSTATES:
        return True
    return isinstance(exc, TimeoutError) and phase is not Phase.ACQUIRE


def is_connection_failure(exc: BaseException, connection_closed: bool) -> bool:
    """The connection broke, could not be opened, or the server is shutting down."""
    if connection_closed:
        return True
    state = sqlstate_of(exc)
    if state is not None:
        return state.startswith("08") or state in CONNECTION_SQLSTATES
    return isinstance(exc, OSError | ConnectionError | asyncpg.PostgresConnectionError)
