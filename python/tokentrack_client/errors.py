"""The exceptions of the tokentrack client.

Everything the client raises is a :class:`TokenTrackError`::

    TokenTrackError
    ├── Refusal                     a business refusal: the answer had "success": false
    │   ├── InsufficientTokens      insufficient_tokens (.available_tokens, .requested_tokens,
    │   │                           .period_id)
    │   ├── InsufficientBudget      insufficient_budget (.budget_id, .subject, .window, .unit,
    │   │                           .window_start, .available, .requested)
    │   ├── NoActivePeriod          no_active_period
    │   ├── AccountNotFound         account_not_found
    │   ├── ReportAccountMismatch   report_account_mismatch
    │   ├── StepConflict            step_conflict (.recorded: the numbers that stand)
    │   ├── ReservationNotFound     reservation_not_found
    │   └── ReportFinalized         report_finalized (.report_status when known)
    ├── ReportEnded                 a step of a report that was ended from outside (.status)
    │   └── ReportCancelled         ... ended as "cancelled" (the cancel button)
    ├── ReservationExceeded         a step took the report past its reservation
    │                               (track_report(on_overrun="raise"); .step, .over_by)
    │                               (the three in tokentrack_client.tracking, which raises them)
    ├── InvalidArgument             also a ValueError: a bad argument (.argument names it)
    ├── UnexpectedAnswer            the server answered something the client does not understand
    └── DatabaseError               any other driver or server error (.sqlstate)
        ├── NotInstalled            the tokentrack schema or a function is missing
        ├── PermissionDenied        the role may not call the function (42501)
        ├── CallTimeout             the call timed out (.outcome_unknown, .attempts)
        └── TransientError          a transient failure that outlived the retries
            └── ConnectionLost      the connection broke (.outcome_unknown)

Refusals are mapped from the answer's ``"error"`` code, never from its message text. Every
exception that wraps a driver error is raised ``from`` it, so ``__cause__`` is the asyncpg
exception.

This module is the bottom of the package: it imports none of its other modules, so that every
one of them can raise these. ``ReportEnded``, ``ReportCancelled`` and ``ReservationExceeded``
carry the :class:`~tokentrack_client.StepRecord` of the step that raised them, so they are
defined above the result types, with the report tracker that raises them; all of them are
importable from ``tokentrack_client``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

__all__ = [
    "AccountNotFound",
    "AlreadyRefunded",
    "BudgetNotFound",
    "CallTimeout",
    "ConnectionLost",
    "DatabaseError",
    "IdempotencyConflict",
    "InsufficientBudget",
    "InsufficientTokens",
    "InvalidArgument",
    "NegativeUsage",
    "NoActivePeriod",
    "NotInstalled",
    "PermissionDenied",
    "Refusal",
    "ReportAccountMismatch",
    "ReportFinalized",
    "ReportNotBilled",
    "ReportNotFound",
    "ReservationNotFound",
    "StepConflict",
    "TokenTrackError",
    "TransientError",
    "UnexpectedAnswer",
    "refusal_from_answer",
]


class TokenTrackError(Exception):
    """Base class of every exception the tokentrack client raises."""


# --------------------------------------------------------------------------------------------
# Refusals: "success": false answers, mapped by code
# --------------------------------------------------------------------------------------------


class Refusal(TokenTrackError):
    """The database refused the request: its answer was ``{"success": false, "error": CODE}``.

    Nothing was written. ``code`` is the machine-readable reason, ``message`` the server's
    human-readable text (for logs only: never match on it), ``answer`` the whole answer.
    Codes this client does not know yet are raised as a plain :class:`Refusal`.
    """

    code: str = ""

    def __init__(self, code: str, message: str, answer: Mapping[str, Any]) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.answer: Mapping[str, Any] = answer


class InsufficientTokens(Refusal):
    """``insufficient_tokens``: the estimate does not fit the account's remaining budget.

    ``available_tokens`` is what the account could still reserve, ``requested_tokens`` the
    estimate (or the extension) that was refused, ``period_id`` the usage period that refused
    it (when the server says).
    """

    code = "insufficient_tokens"

    def __init__(self, code: str, message: str, answer: Mapping[str, Any]) -> None:
        super().__init__(code, message, answer)
        self.available_tokens: int | None = _int_or_none(answer.get("available_tokens"))
        self.requested_tokens: int | None = _int_or_none(answer.get("requested_tokens"))
        self.period_id: uuid.UUID | None = _uuid_or_none(answer.get("period_id"))


class InsufficientBudget(Refusal):
    """``insufficient_budget``: a budget (of the account, or of one of the subjects) cannot
    hold the estimate (or the extension) in its current window.

    ``budget_id``, ``subject`` (``None``: the whole account), ``window`` (``minute`` ...
    ``total``), ``unit`` (``tokens`` or ``cost_micros``) and ``window_start`` name the budget
    window that refused; ``available`` is what it could still hold, ``requested`` what was
    asked of it, in its unit. A budget whose window has nothing left refuses even a request of
    0 (a reservation without a cost estimate, against a cost budget).
    """

    code = "insufficient_budget"

    def __init__(self, code: str, message: str, answer: Mapping[str, Any]) -> None:
        super().__init__(code, message, answer)
        self.budget_id: uuid.UUID | None = _uuid_or_none(answer.get("budget_id"))
        self.subject: str | None = _str_or_none(answer.get("subject"))
        self.window: str | None = _str_or_none(answer.get("window"))
        self.unit: str | None = _str_or_none(answer.get("unit"))
        self.window_start: datetime | None = _datetime_or_none(answer.get("window_start"))
        self.available: int | None = _int_or_none(answer.get("available"))
        self.requested: int | None = _int_or_none(answer.get("requested"))


class BudgetNotFound(Refusal):
    """``budget_not_found``: the account has no such budget."""

    code = "budget_not_found"


class IdempotencyConflict(Refusal):
    """``idempotency_conflict``: the idempotency key was already used, for this account and
    operation, with other arguments; the first record stands. ``record_id`` is its id (a
    grant, an adjustment or a refund)."""

    code = "idempotency_conflict"

    def __init__(self, code: str, message: str, answer: Mapping[str, Any]) -> None:
        super().__init__(code, message, answer)
        self.record_id: uuid.UUID | None = _uuid_or_none(
            answer.get("grant_id") or answer.get("adjustment_id") or answer.get("refund_id")
        )


class ReportNotFound(Refusal):
    """``report_not_found``: there is no such report."""

    code = "report_not_found"


class ReportNotBilled(Refusal):
    """``report_not_billed``: the report has no reservation, or it is still active (finish,
    finalize or the expiry sweep bills it first)."""

    code = "report_not_billed"


class AlreadyRefunded(Refusal):
    """``already_refunded``: the report was already refunded under another key;
    ``refund_id`` is that refund."""

    code = "already_refunded"

    def __init__(self, code: str, message: str, answer: Mapping[str, Any]) -> None:
        super().__init__(code, message, answer)
        self.refund_id: uuid.UUID | None = _uuid_or_none(answer.get("refund_id"))


class NegativeUsage(Refusal):
    """``negative_usage``: the correction would take a used amount below 0 (an adjustment
    larger than what is there; a refund of a report whose usage an adjustment already took
    out). ``used`` is the amount now; ``period_id`` or ``budget_id`` and ``window_start`` name
    it."""

    code = "negative_usage"

    def __init__(self, code: str, message: str, answer: Mapping[str, Any]) -> None:
        super().__init__(code, message, answer)
        self.used: int | None = _int_or_none(answer.get("used"))
        self.period_id: uuid.UUID | None = _uuid_or_none(answer.get("period_id"))
        self.budget_id: uuid.UUID | None = _uuid_or_none(answer.get("budget_id"))
        self.window_start: datetime | None = _datetime_or_none(answer.get("window_start"))


class NoActivePeriod(Refusal):
    """``no_active_period``: the account exists but has no active usage period."""

    code = "no_active_period"


class AccountNotFound(Refusal):
    """``account_not_found``: there is no such account."""

    code = "account_not_found"


class ReportAccountMismatch(Refusal):
    """``report_account_mismatch``: the report belongs to another account."""

    code = "report_account_mismatch"


class StepConflict(Refusal):
    """``step_conflict``: the step was already recorded with other numbers; the first stands.

    ``recorded`` holds the numbers that stand (``input_tokens``, ``output_tokens``,
    ``total_tokens``) when the server sent them.
    """

    code = "step_conflict"

    def __init__(self, code: str, message: str, answer: Mapping[str, Any]) -> None:
        super().__init__(code, message, answer)
        recorded = answer.get("recorded")
        self.recorded: Mapping[str, Any] | None = (
            recorded if isinstance(recorded, Mapping) else None
        )


class ReservationNotFound(Refusal):
    """``reservation_not_found``: the report has no reservation (try_reserve was not granted)."""

    code = "reservation_not_found"


class ReportFinalized(Refusal):
    """``report_finalized``: the report already has an outcome, or was already billed.

    ``report_status`` is the outcome it has (``complete``, ``failed`` or ``cancelled``) when
    the server said so.
    """

    code = "report_finalized"

    def __init__(self, code: str, message: str, answer: Mapping[str, Any]) -> None:
        super().__init__(code, message, answer)
        status = answer.get("report_status")
        self.report_status: str | None = status if isinstance(status, str) else None


_REFUSALS: dict[str, type[Refusal]] = {
    cls.code: cls
    for cls in (
        InsufficientTokens,
        InsufficientBudget,
        NoActivePeriod,
        AccountNotFound,
        ReportAccountMismatch,
        StepConflict,
        ReservationNotFound,
        ReportFinalized,
        BudgetNotFound,
        IdempotencyConflict,
        ReportNotFound,
        ReportNotBilled,
        AlreadyRefunded,
        NegativeUsage,
    )
}


def refusal_from_answer(answer: Mapping[str, Any]) -> Refusal:
    """The typed :class:`Refusal` for a ``"success": false`` answer, chosen by its code."""
    code = answer.get("error")
    code = code if isinstance(code, str) and code else "unknown"
    message = answer.get("message")
    cls = _REFUSALS.get(code, Refusal)
    return cls(code, message if isinstance(message, str) else "", answer)


# --------------------------------------------------------------------------------------------
# Arguments, answers and driver errors
# --------------------------------------------------------------------------------------------


class InvalidArgument(TokenTrackError, ValueError):
    """An argument is invalid; nothing was written.

    Raised before calling the server when the client can tell, and for the server's SQLSTATE
    class 22 errors (data exception) otherwise. ``argument`` names the argument (the Python
    parameter name; the server's ``p_`` prefix is dropped), ``sqlstate`` is set when the
    server raised it.
    """

    def __init__(self, argument: str | None, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.argument = argument
        self.sqlstate = sqlstate


class UnexpectedAnswer(TokenTrackError):
    """The server's answer is not the JSON object the client expects (a version mismatch?)."""


class DatabaseError(TokenTrackError):
    """A driver or server error that is neither a refusal nor an invalid argument.

    ``sqlstate`` is the server's SQLSTATE when there is one. The asyncpg exception is the
    ``__cause__``.
    """

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class NotInstalled(DatabaseError):
    """The tokentrack schema or one of its functions does not exist (run ``tokentrack migrate
    install``), or the installed version is older than this client."""


class PermissionDenied(DatabaseError):
    """The database role may not call the function: grant it ``tokentrack_service``."""


class CallTimeout(DatabaseError):
    """The call took longer than allowed and was ended.

    Two timeouts end a call, and they differ in what is known afterwards:

    * **the server's** (``sqlstate`` is ``57014`` or ``55P03``): the tracker's ``timeout``,
      applied to the call's own transaction as ``SET LOCAL statement_timeout`` and ``SET
      LOCAL lock_timeout``, or one set on the role or database, or a ``pg_cancel_backend``.
      The server ended the statement with an error, so it rolled the whole transaction back:
      **the call did not take effect**, whichever call it was (each is one statement, and no
      tokentrack function catches these errors). ``outcome_unknown`` is ``False``.
    * **the driver's** (``sqlstate`` is ``None``, the cause a ``TimeoutError``): asyncpg's
      ``command_timeout`` or ``timeout`` expired before the server answered. Before
      ``COMMIT`` was sent the call did not take effect (``outcome_unknown`` is ``False``);
      while ``COMMIT`` was in flight the server may have committed it (``outcome_unknown`` is
      ``True``): as for :class:`ConnectionLost`, the idempotent calls can simply be repeated,
      an ``increment_usage`` or ``open_usage_period`` must be checked first.

    Not retried unless the tracker's :class:`~tokentrack_client.RetryPolicy` says
    ``retry_timeouts=True``: a timeout is the caller's limit on how long a call may take, and
    what blocked it (a lock held by a long transaction, an overloaded server) is usually
    still there. ``attempts`` says how many attempts were made.
    """

    def __init__(
        self,
        message: str,
        sqlstate: str | None = None,
        attempts: int = 1,
        *,
        outcome_unknown: bool = False,
    ) -> None:
        super().__init__(message, sqlstate)
        self.attempts = attempts
        self.outcome_unknown = outcome_unknown


class TransientError(DatabaseError):
    """A transient failure (serialization failure, deadlock, server shutting down, connection
    lost) that was not retried, or that outlived the retries. ``attempts`` says how many
    attempts were made."""

    def __init__(self, message: str, sqlstate: str | None = None, attempts: int = 1) -> None:
        super().__init__(message, sqlstate)
        self.attempts = attempts


class ConnectionLost(TransientError):
    """The connection to the server broke during a call.

    ``outcome_unknown`` is true when the connection broke while the call's ``COMMIT`` was in
    flight, so that the call may or may not have taken effect. For every call but
    ``increment_usage`` that does not matter (they are idempotent: call again); an
    ``increment_usage`` with an unknown outcome must be checked (``reconcile``, the ledger)
    before it is repeated. With a pool it is raised once the retry policy's deadline (60 s by
    default) or ``max_attempts`` ends the retries, or at once when the call may not be repeated
    (``increment_usage`` or ``open_usage_period`` whose ``COMMIT`` was in flight); with a single
    connection (no pool) a lost connection is never retried: the client cannot open a new one.
    """

    def __init__(
        self,
        message: str,
        sqlstate: str | None = None,
        attempts: int = 1,
        *,
        outcome_unknown: bool = False,
    ) -> None:
        super().__init__(message, sqlstate, attempts)
        self.outcome_unknown = outcome_unknown


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _uuid_or_none(value: object) -> uuid.UUID | None:
    if not isinstance(value, str):
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _datetime_or_none(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None
