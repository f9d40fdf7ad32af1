"""``TokenTracker``: the thin asyncpg client of the tokentrack SQL functions.

One method per function; each call is one short transaction of its own. The idempotent calls
(all but ``increment_usage``, ``extend_reservation``, ``open_usage_period`` and
``claim_notifications``) are one statement, one round trip, that the server commits as it
ends::

    SELECT CASE WHEN pg_catalog.current_setting('transaction_isolation') = 'read committed'
                THEN tokentrack.<function>($1::uuid, ...)::text END

(a session whose default isolation is not READ COMMITTED answers NULL, having done nothing,
and the call is made as below). The others, every call when the tracker has a ``timeout``,
and every call on a connection whose asyncpg statement cache is off or that has a
``command_timeout``, are an explicit transaction::

    BEGIN ISOLATION LEVEL READ COMMITTED
    SELECT tokentrack.<function>($1::uuid, ...)::text
    COMMIT

It sets no session state and prepares no named statement of its own, so it works behind
PgBouncer in transaction pooling mode as long as the caller's pool or connection was created
with ``statement_cache_size=0`` (asyncpg's cache of named prepared statements is the one thing
the client cannot switch off for the caller). Without the cache, asyncpg's unnamed Parse and
Bind are two round trips, which only the explicit transaction keeps on one server connection
behind PgBouncer; with it, a call is one Bind, Execute and Sync. The explicit transaction
tells the client whether a failed call may have committed: a failure before ``COMMIT`` was
sent did not. For the one-statement calls, an error the server answered means it rolled back,
and a connection that broke (or the driver's ``command_timeout``, hence the explicit
transaction there) while the statement was in flight leaves the outcome unknown; they are
idempotent, so a retry answers the first result either way (see
:mod:`tokentrack_client.retry`).

With a ``timeout``, the transaction starts with ``SET LOCAL statement_timeout`` and ``SET LOCAL
lock_timeout`` in the same round trip as ``BEGIN`` (one simple query): the settings end with
the transaction, so nothing is left on the connection (PgBouncer included).

A connection that is already inside a transaction when a method is called (the caller's own
``async with conn.transaction()``) is used as it is: the call joins the caller's transaction,
commits with it, and is never retried.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import random
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, Final, NoReturn, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from tokentrack_client.answers import get_list, read_answer
from tokentrack_client.contract import BIGINT_MAX, LEASE_MAX, NOTIFICATIONS_CLAIM_MAX
from tokentrack_client.errors import (
    CallTimeout,
    ConnectionLost,
    DatabaseError,
    InvalidArgument,
    NotInstalled,
    PermissionDenied,
    TransientError,
)
from tokentrack_client.notifications import (
    DEFAULT_BATCH,
    DEFAULT_POLL_INTERVAL,
    ListenSource,
    NotificationStream,
)
from tokentrack_client.results import (
    BudgetSet,
    CreditGrant,
    Extension,
    Notification,
    NotificationAck,
    PeriodOpened,
    Reconciliation,
    Refund,
    Reservation,
    Settlement,
    StepRecord,
    SweepResult,
    UsageAdjustment,
    UsageIncrement,
)
from tokentrack_client.retry import (
    DEFAULT_RETRY,
    Phase,
    RetryPolicy,
    is_connection_failure,
    is_rolled_back,
    is_timeout,
    sqlstate_of,
)
from tokentrack_client.tracking import OnOverrun, ReportTracker
from tokentrack_client.usage import Usage
from tokentrack_client.validation import (
    IdLike,
    check_budget_kind,
    check_count,
    check_error_message,
    check_estimate,
    check_flag,
    check_id,
    check_mode,
    check_optional_datetime,
    check_outcome,
    check_seconds,
    check_subjects,
    check_text,
    check_thresholds,
    check_total_tokens,
)

__all__ = ["ConnectionLike", "IdLike", "TokenTracker", "create_pool", "reset_nothing"]

logger = logging.getLogger("tokentrack_client")

ConnectionLike: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"
"""A single asyncpg connection (or one acquired from a pool and held by the caller)."""

_SQL_TRY_RESERVE: Final = (
    "SELECT tokentrack.try_reserve_tokens($1::uuid, $2::uuid, $3::integer)::text"
)
_SQL_RESERVE: Final = (
    "SELECT tokentrack.reserve($1::uuid, $2::uuid, $3::jsonb, $4::text[], $5::text)::text"
)
_SQL_EXTEND: Final = "SELECT tokentrack.extend_reservation($1::uuid, $2::uuid, $3::jsonb)::text"
_SQL_SET_BUDGET: Final = (
    "SELECT tokentrack.set_budget("
    "$1::uuid, $2::text, $3::text, $4::text, $5::bigint, $6::jsonb)::text"
)
_SQL_GRANT_CREDITS: Final = (
    "SELECT tokentrack.grant_credits("
    "$1::uuid, $2::uuid, $3::bigint, $4::timestamptz, $5::text, $6::text)::text"
)
_SQL_ADJUST_USAGE: Final = (
    "SELECT tokentrack.adjust_usage($1::uuid, $2::uuid, $3::bigint, $4::text, $5::text)::text"
)
_SQL_REFUND_REPORT: Final = (
    "SELECT tokentrack.refund_report($1::uuid, $2::uuid, $3::text, $4::text)::text"
)
_IDEMPOTENCY_KEY_MAX: Final = 200
_REASON_MAX: Final = 1000
_SQL_RECORD_STEP: Final = (
    "SELECT tokentrack.persist_step_usage("
    "$1::uuid, $2::uuid, $3::text, $4::integer, $5::integer, $6::integer, $7::text)::text"
)
_SQL_RECORD_STEP_USAGE: Final = (
    "SELECT tokentrack.record_step($1::uuid, $2::uuid, $3::text, $4::jsonb, $5::text)::text"
)
_SQL_FINALIZE: Final = "SELECT tokentrack.finalize_report_usage($1::uuid, $2::uuid)::text"
_SQL_FINISH: Final = "SELECT tokentrack.finish_report($1::uuid, $2::uuid, $3::text, $4::text)::text"
_SQL_SWEEP: Final = "SELECT tokentrack.cleanup_expired_reservations()::text"
_SQL_RECONCILE: Final = "SELECT tokentrack.reconcile($1::uuid)::text"
_SQL_INCREMENT: Final = (
    "SELECT tokentrack.increment_usage($1::uuid, $2::integer, $3::boolean, $4::boolean)::text"
)
_SQL_OPEN_PERIOD: Final = (
    "SELECT tokentrack.open_usage_period($1::uuid, $2::bigint, $3::timestamptz)::text"
)
_SQL_CLAIM: Final = "SELECT tokentrack.claim_notifications($1::text, $2::integer)::text"
_SQL_CLAIM_LEASE: Final = (
    "SELECT tokentrack.claim_notifications($1::text, $2::integer, $3::interval)::text"
)
_SQL_ACK: Final = "SELECT tokentrack.ack_notification($1::bigint, $2::text)::text"
_BEGIN: Final = "BEGIN ISOLATION LEVEL READ COMMITTED"

TIMEOUT_MAX: Final = 2_147_483.647
"""The largest ``timeout`` in seconds (statement_timeout is an int4 of milliseconds)."""


def _check_timeout(timeout: object) -> float | None:
    """``timeout`` as seconds (``None``: no timeout); a bad one raises TypeError/ValueError."""
    if timeout is None:
        return None
    if not isinstance(timeout, int | float) or isinstance(timeout, bool):
        raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if not (math.isfinite(timeout) and 0 < timeout <= TIMEOUT_MAX):
        raise ValueError(f"timeout must be > 0 and at most {TIMEOUT_MAX} seconds: {timeout!r}")
    return float(timeout)


def _begin_statement(timeout: float | None) -> str:
    """``BEGIN``, and with a timeout the two ``SET LOCAL`` that bound the call's statements
    (in milliseconds, rounded up: 0 would mean no timeout)."""
    if timeout is None:
        return _BEGIN
    ms = max(1, math.ceil(round(timeout * 1000, 3)))  # 0.57 s is 570 ms, not 571
    return f"{_BEGIN}; SET LOCAL statement_timeout = {ms}; SET LOCAL lock_timeout = {ms}"


async def reset_nothing(connection: asyncpg.Connection[Any]) -> None:
    """A pool ``reset`` that sends nothing: asyncpg still rolls back a transaction left open
    and drops the connection's listener callbacks, but skips its reset query (``SELECT
    pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``), one round trip on every
    release, which a pool that only a :class:`TokenTracker` uses does not need: the tracker
    leaves no session state (its settings are ``SET LOCAL``, a notification stream UNLISTENs
    when it stops)."""


async def create_pool(dsn: str | None = None, **kwargs: Any) -> asyncpg.Pool[Any]:
    """``asyncpg.create_pool(dsn, **kwargs)`` for a pool that only :class:`TokenTracker`
    uses: ``reset`` is :func:`reset_nothing` unless given (asyncpg's own reset query costs a
    round trip on each release, as much as a call). Connections your own code also uses with
    session state (``SET``, ``LISTEN``, advisory locks, held cursors) need asyncpg's default:
    pass ``reset=None`` or use ``asyncpg.create_pool``. Behind PgBouncer in transaction
    pooling mode, pass ``statement_cache_size=0`` as with any pool."""
    kwargs.setdefault("reset", reset_nothing)
    pool = await asyncpg.create_pool(dsn, **kwargs)
    assert pool is not None  # asyncpg's stubs allow None; create_pool never returns it
    return pool


class _AttemptFailed(Exception):
    """One attempt failed: the driver error, how far the attempt got, and the connection's
    state afterwards."""

    def __init__(
        self, error: Exception, phase: Phase, *, connection_closed: bool, joined: bool
    ) -> None:
        super().__init__(str(error))
        self.error = error
        self.phase = phase
        self.connection_closed = connection_closed
        self.joined = joined


class TokenTracker:
    """Bills LLM reports exactly once through the tokentrack SQL functions.

    ``TokenTracker(pool)`` with an :class:`asyncpg.Pool` is the normal use: concurrent calls
    run on separate connections, and a call whose connection breaks is retried on another
    one. ``TokenTracker(connection)`` with a single connection serialises the calls on it
    and cannot survive a broken connection (it raises :class:`ConnectionLost`). The client
    never opens connections of its own and never reads credentials from the environment.

    Behind PgBouncer in transaction pooling mode, create the pool (or connection) with
    ``statement_cache_size=0``.

    ``retry`` is the :class:`RetryPolicy` of transient failures (default: retries for up to
    60 s, jittered backoff from 50 ms to 2 s); ``NO_RETRY`` switches retries off.

    ``timeout`` (seconds, default ``None``: none) bounds each attempt on the server: its
    transaction runs with ``SET LOCAL statement_timeout`` and ``SET LOCAL lock_timeout``, and
    a call that takes longer raises :class:`~tokentrack_client.CallTimeout` (rolled back by
    the server: nothing was written). :meth:`with_timeout` gives a tracker with another one.
    A call that joins the caller's own transaction sets no timeout (it would outlive the call).

    Refusals raise the typed :class:`~tokentrack_client.Refusal` subclasses, bad arguments
    :class:`~tokentrack_client.InvalidArgument` (a ``ValueError``), everything else a
    :class:`~tokentrack_client.DatabaseError` raised from the driver's exception.
    """

    def __init__(
        self,
        pool_or_connection: asyncpg.Pool[Any] | ConnectionLike,
        *,
        retry: RetryPolicy = DEFAULT_RETRY,
        timeout: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._pool: asyncpg.Pool[Any] | None = None
        self._connection: ConnectionLike | None = None
        if isinstance(pool_or_connection, asyncpg.Pool):
            self._pool = pool_or_connection
        elif isinstance(pool_or_connection, asyncpg.Connection | PoolConnectionProxy):
            self._connection = pool_or_connection
        else:
            raise TypeError(
                "TokenTracker needs an asyncpg.Pool or an asyncpg.Connection, "
                f"not {type(pool_or_connection).__name__}"
            )
        if not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, not {type(retry).__name__}")
        self._retry = retry
        self._timeout = _check_timeout(timeout)
        self._begin = _begin_statement(self._timeout)
        self._rng = rng or random.Random()
        self._lock = asyncio.Lock()

    @property
    def retry_policy(self) -> RetryPolicy:
        """The retry policy of transient failures."""
        return self._retry

    @property
    def timeout(self) -> float | None:
        """The server-side timeout of each call in seconds (``None``: none)."""
        return self._timeout

    def with_timeout(self, timeout: float | None) -> TokenTracker:
        """The same tracker (same pool or connection, retry policy and lock) with another
        ``timeout``, for one call or a few::

            await tracker.with_timeout(0.5).try_reserve(account_id, report_id, 4_000)
        """
        other = copy.copy(self)
        other._timeout = _check_timeout(timeout)
        other._begin = _begin_statement(other._timeout)
        return other

    # ----------------------------------------------------------------------------------------
    # The RPCs
    # ----------------------------------------------------------------------------------------

    async def try_reserve(
        self,
        account_id: IdLike,
        report_id: IdLike,
        estimated_tokens: int,
        *,
        subjects: Iterable[str] = (),
        mode: str | None = None,
        cost_micros: int | None = None,
        model: str | None = None,
    ) -> Reservation:
        """Reserve ``estimated_tokens`` of the account's budget for a report before it runs.

        Creates the report (status ``processing``) when it does not exist yet. Reserving again
        while the report's reservation is active returns that reservation (``existing``).
        Raises :class:`InsufficientTokens` (with ``available_tokens`` and
        ``requested_tokens``), :class:`InsufficientBudget` (the budget that refused),
        :class:`NoActivePeriod`, :class:`AccountNotFound`, :class:`ReportAccountMismatch` or
        :class:`ReportFinalized`; nothing is written then.

        The account's own budgets always apply. ``subjects`` (at most 32 labels, such as
        ``team:research`` or ``key:sk-live-1``) adds the budgets of each; ``mode`` (standard,
        dd, discovery or hybrid) is the report's mode; ``cost_micros`` is the cost estimate
        that cost budgets hold, or ``model`` prices the tokens at that model's dearest class
        (not both). With none of these the call is ``tokentrack.try_reserve_tokens`` (a
        pending report keeps its mode); with any of them it is ``tokentrack.reserve`` (a new
        report is ``standard`` unless ``mode`` is given, and a pending one keeps its mode).
        """
        account = check_id("account_id", account_id)
        report = check_id("report_id", report_id)
        tokens = check_count("estimated_tokens", estimated_tokens, minimum=1)
        chosen = check_subjects(subjects)
        report_mode = check_mode(mode)
        estimate = check_estimate(tokens, cost_micros, model)
        if not chosen and report_mode is None and len(estimate) == 1:
            answer = await self._call(
                "try_reserve_tokens", _SQL_TRY_RESERVE, (account, report, tokens)
            )
        else:
            args = (account, report, json.dumps(estimate), list(chosen), report_mode)
            answer = await self._call("reserve", _SQL_RESERVE, args)
        return Reservation.from_answer(answer)

    async def extend_reservation(
        self,
        report_id: IdLike,
        account_id: IdLike,
        tokens: int,
        *,
        cost_micros: int | None = None,
        model: str | None = None,
    ) -> Extension:
        """Raise the report's active reservation by ``tokens`` (and by ``cost_micros``, or
        the tokens priced by ``model``, in its cost budgets) when the extra fits its usage
        period and every budget window it holds (the windows it was granted in).

        The expiry time does not move. Raises :class:`InsufficientTokens`,
        :class:`InsufficientBudget`, :class:`ReportFinalized` (the reservation is completed,
        expired or past its expiry), :class:`ReservationNotFound` and
        :class:`ReportAccountMismatch`; nothing is written then.

        Not idempotent: every call adds. It is retried only when the server certainly did not
        commit it; when the connection breaks while its ``COMMIT`` is in flight it raises
        :class:`ConnectionLost` with ``outcome_unknown=True``.
        """
        more = check_estimate(check_count("tokens", tokens, minimum=1), cost_micros, model)
        args = (
            check_id("report_id", report_id),
            check_id("account_id", account_id),
            json.dumps(more),
        )
        answer = await self._call("extend_reservation", _SQL_EXTEND, args, idempotent=False)
        return Extension.from_answer(answer)

    async def set_budget(
        self,
        account_id: IdLike,
        subject: str | None,
        unit: str,
        window: str,
        limit: int,
        *,
        timezone: str | None = None,
        thresholds: Iterable[int] | None = None,
    ) -> BudgetSet:
        """Create or change the account's budget for (``subject``, ``unit``, ``window``).

        ``subject`` ``None`` is the whole account, else a label the application chooses;
        ``unit`` is ``tokens`` or ``cost_micros``; ``window`` is ``minute``, ``hour``,
        ``day``, ``week`` (from Monday), ``month`` (calendar windows in ``timezone``, an IANA
        name, default UTC) or ``total`` (never resets); ``limit`` (>= 0) is in ``unit``.
        ``thresholds`` are soft thresholds in percent (1 to 10 of them, each 1 to 1000;
        default 80 and 100). On a change, ``timezone`` or ``thresholds`` left out keep their
        value; every change is recorded. The same settings again change nothing
        (``changed`` false). Raises :class:`AccountNotFound`.
        """
        kind = check_budget_kind(unit, window)
        options: dict[str, object] = {}
        zone = check_text("timezone", timezone, required=False)
        if zone is not None:
            options["timezone"] = zone
        levels = check_thresholds(thresholds)
        if levels is not None:
            options["thresholds"] = list(levels)
        args = (
            check_id("account_id", account_id),
            None if subject is None else check_text("subject", subject, required=True),
            *kind,
            check_count("limit", limit, minimum=0, maximum=BIGINT_MAX),
            json.dumps(options),
        )
        answer = await self._call("set_budget", _SQL_SET_BUDGET, args)
        return BudgetSet.from_answer(answer)

    async def grant_credits(
        self,
        account_id: IdLike,
        budget_id: IdLike,
        amount: int,
        *,
        idempotency_key: str,
        reason: str,
        expires_at: datetime | None = None,
    ) -> CreditGrant:
        """Raise the budget's limit by ``amount`` (> 0, in its unit) until ``expires_at``
        (``None``: never; else in the future): the grant counts in every window of the
        budget it overlaps while unexpired; usage billed under it stays billed after it expires.

        Idempotent by ``idempotency_key`` (per account, among grants): the same key with the
        same arguments returns the first grant with ``duplicate`` true, so the call is retried
        safely. Raises :class:`AccountNotFound`, :class:`BudgetNotFound` and
        :class:`IdempotencyConflict` (the key was used with other arguments).
        """
        args = (
            check_id("account_id", account_id),
            check_id("budget_id", budget_id),
            check_count("amount", amount, minimum=1, maximum=BIGINT_MAX),
            check_optional_datetime("expires_at", expires_at),
            check_text(
                "idempotency_key", idempotency_key, required=True, limit=_IDEMPOTENCY_KEY_MAX
            ),
            check_text("reason", reason, required=True, limit=_REASON_MAX),
        )
        answer = await self._call("grant_credits", _SQL_GRANT_CREDITS, args)
        return CreditGrant.from_answer(answer)

    async def adjust_usage(
        self,
        account_id: IdLike,
        delta: int,
        *,
        idempotency_key: str,
        reason: str,
        budget_id: IdLike | None = None,
    ) -> UsageAdjustment:
        """Add a signed correction ``delta`` (not 0) to the used amount of the budget's current
        window (``budget_id``, in its unit) or, without ``budget_id``, to the account's active
        usage period's ``tokens_used``. Never below 0: raises :class:`NegativeUsage` instead.

        Idempotent by ``idempotency_key`` (per account, among adjustments), as
        :meth:`grant_credits`. Raises :class:`AccountNotFound`, :class:`BudgetNotFound`,
        :class:`NoActivePeriod`, :class:`NegativeUsage` and :class:`IdempotencyConflict`.
        """
        if isinstance(delta, bool) or not isinstance(delta, int) or delta == 0:
            raise InvalidArgument("delta", f"delta must be a non-zero integer (got {delta!r})")
        check_count("delta", abs(delta), minimum=1, maximum=BIGINT_MAX)
        args = (
            check_id("account_id", account_id),
            None if budget_id is None else check_id("budget_id", budget_id),
            delta,
            check_text(
                "idempotency_key", idempotency_key, required=True, limit=_IDEMPOTENCY_KEY_MAX
            ),
            check_text("reason", reason, required=True, limit=_REASON_MAX),
        )
        answer = await self._call("adjust_usage", _SQL_ADJUST_USAGE, args)
        return UsageAdjustment.from_answer(answer)

    async def refund_report(
        self,
        report_id: IdLike,
        account_id: IdLike,
        *,
        idempotency_key: str,
        reason: str,
    ) -> Refund:
        """Take a billed report's usage (its billed steps' tokens, and their cost in cost
        budgets) back out of every usage period and budget window it was billed into, once.

        Idempotent by ``idempotency_key`` (per account, among refunds), as
        :meth:`grant_credits`. Raises :class:`AccountNotFound`, :class:`ReportNotFound`,
        :class:`ReportAccountMismatch`, :class:`ReportNotBilled` (not billed yet),
        :class:`AlreadyRefunded` (refunded under another key), :class:`NegativeUsage` and
        :class:`IdempotencyConflict`.
        """
        args = (
            check_id("report_id", report_id),
            check_id("account_id", account_id),
            check_text(
                "idempotency_key", idempotency_key, required=True, limit=_IDEMPOTENCY_KEY_MAX
            ),
            check_text("reason", reason, required=True, limit=_REASON_MAX),
        )
        answer = await self._call("refund_report", _SQL_REFUND_REPORT, args)
        return Refund.from_answer(answer)

    async def persist_step(
        self,
        report_id: IdLike,
        account_id: IdLike,
        step_name: str,
        input_tokens: int,
        output_tokens: int,
        total_tokens: int | None = None,
        model: str | None = None,
    ) -> StepRecord:
        """Record one finished step of a report.

        ``total_tokens`` defaults to input + output; a larger total may count cache or
        reasoning tokens. The same step again with the same numbers is a retry
        (``duplicate``); with other numbers it raises :class:`StepConflict` and the first
        record stands. A step of a report that was already billed is billed at once
        (``late``); when the report already has an outcome, ``report_status`` says which
        (the generator should stop). Raises :class:`ReservationNotFound` and
        :class:`ReportAccountMismatch`.
        """
        name = check_text("step_name", step_name, required=True)
        inputs = check_count("input_tokens", input_tokens, minimum=0)
        outputs = check_count("output_tokens", output_tokens, minimum=0)
        total = check_total_tokens(total_tokens, inputs, outputs)
        args = (
            check_id("report_id", report_id),
            check_id("account_id", account_id),
            name,
            inputs,
            outputs,
            total,
            check_text("model", model, required=False),
        )
        answer = await self._call("persist_step_usage", _SQL_RECORD_STEP, args)
        return StepRecord.from_answer(answer)

    async def record_step(
        self,
        report_id: IdLike,
        account_id: IdLike,
        step_name: str,
        usage: Usage,
        model: str | None = None,
    ) -> StepRecord:
        """Record one finished step with its tokens by class (a :class:`Usage`, e.g. from
        ``Usage.from_openai(response)``), priced by ``model``.

        The same rules as :meth:`persist_step`: the same step again with the same usage is a
        retry (``duplicate``), with another it raises :class:`StepConflict`; a late step is
        billed at once; ``report_status`` says when the report already has an outcome. The
        answer's ``cost_micros`` is the step's cost (``None`` when ``model`` is unpriced).
        Raises :class:`ReservationNotFound` and :class:`ReportAccountMismatch`.
        """
        if not isinstance(usage, Usage):
            raise InvalidArgument(
                "usage",
                f"usage must be a Usage, not {type(usage).__name__} (a provider's object maps "
                "to one with Usage.from_openai, from_anthropic or from_litellm)",
            )
        args = (
            check_id("report_id", report_id),
            check_id("account_id", account_id),
            check_text("step_name", step_name, required=True),
            json.dumps(usage.to_dict()),
            check_text("model", model, required=False),
        )
        answer = await self._call("record_step", _SQL_RECORD_STEP_USAGE, args)
        return StepRecord.from_answer(answer)

    async def finalize(self, report_id: IdLike, account_id: IdLike) -> Settlement:
        """Bill the report's recorded steps exactly once and complete its reservation.

        Idempotent: calling it again changes nothing and answers ``already_finalized`` with
        the same ``billed_tokens``. It does not set the report's outcome: generators end a
        report with :meth:`finish_report` (or :meth:`track_report`). Raises
        :class:`ReservationNotFound` and :class:`ReportAccountMismatch`.
        """
        args = (check_id("report_id", report_id), check_id("account_id", account_id))
        answer = await self._call("finalize_report_usage", _SQL_FINALIZE, args)
        return Settlement.from_answer(answer)

    async def finish_report(
        self,
        report_id: IdLike,
        account_id: IdLike,
        status: str,
        error_message: str | None = None,
    ) -> Settlement:
        """Set the report's outcome (``complete``, ``failed`` or ``cancelled``) and bill it.

        One transaction; the same outcome again is an idempotent retry. Another outcome than
        the one the report already has raises :class:`ReportFinalized` (its
        ``report_status`` says which it has). ``error_message`` (at most 10,000 characters)
        is kept on the report. Raises :class:`ReservationNotFound` and
        :class:`ReportAccountMismatch`.
        """
        outcome = check_outcome(status)
        message = check_error_message(error_message)
        args = (
            check_id("report_id", report_id),
            check_id("account_id", account_id),
            outcome,
            message,
        )
        answer = await self._call("finish_report", _SQL_FINISH, args)
        return Settlement.from_answer(answer)

    async def cancel_report(self, report_id: IdLike, account_id: IdLike) -> Settlement:
        """Cancel a report from outside (a cancel button) and bill it at once.

        The same as ``finish_report(report_id, account_id, "cancelled")``. The generator's
        next step is still recorded (billed late, never lost) and its
        :meth:`ReportTracker.step` then raises :class:`ReportCancelled`. Cancelling a report
        that already ended otherwise raises :class:`ReportFinalized`.
        """
        return await self.finish_report(report_id, account_id, "cancelled")

    async def cleanup_expired_reservations(self) -> SweepResult:
        """Run the expiry sweep once: bill and expire every reservation past ``expires_at``.

        Safe to run concurrently with itself and with finalize. For a large backlog prefer
        ``CALL tokentrack.sweep_expired_reservations()`` (batched commits), e.g. from pg_cron.
        """
        answer = await self._call("cleanup_expired_reservations", _SQL_SWEEP, ())
        return SweepResult.from_answer(answer)

    async def reconcile(self, account_id: IdLike | None = None) -> Reconciliation:
        """Audit every period (of one account, or all): is ``tokens_used`` explained by the
        ledger? Read-only. Raises :class:`AccountNotFound` for an unknown account."""
        account = None if account_id is None else check_id("account_id", account_id)
        answer = await self._call("reconcile", _SQL_RECONCILE, (account,))
        return Reconciliation.from_answer(answer)

    async def increment_usage(
        self,
        account_id: IdLike,
        tokens: int,
        *,
        is_report: bool = False,
        is_chat: bool = False,
    ) -> UsageIncrement:
        """The legacy path: add ``tokens`` (and a report when ``is_report``) to the active
        period at once.

        Not idempotent: every call adds. It is retried only when the server certainly did not
        commit it; when the connection breaks while its ``COMMIT`` is in flight it raises
        :class:`ConnectionLost` with ``outcome_unknown=True`` (check before repeating it).
        Raises :class:`AccountNotFound` and :class:`NoActivePeriod`.
        """
        args = (
            check_id("account_id", account_id),
            check_count("tokens", tokens, minimum=0),
            check_flag("is_report", is_report),
            check_flag("is_chat", is_chat),
        )
        answer = await self._call("increment_usage", _SQL_INCREMENT, args, idempotent=False)
        return UsageIncrement.from_answer(answer)

    async def open_usage_period(
        self, account_id: IdLike, tokens_limit: int, period_end: datetime | None = None
    ) -> PeriodOpened:
        """Open a new active usage period of ``tokens_limit`` tokens for an account (creating
        the account when missing) and close its active one.

        ``period_end`` defaults to one month from now (the server's clock decides whether it
        is in the future). Not idempotent: each call opens a new period, so a call whose
        ``COMMIT`` was lost raises :class:`ConnectionLost` with ``outcome_unknown=True``.
        """
        end = check_optional_datetime("period_end", period_end)
        args = (
            check_id("account_id", account_id),
            check_count("tokens_limit", tokens_limit, minimum=0, maximum=BIGINT_MAX),
            end,
        )
        answer = await self._call("open_usage_period", _SQL_OPEN_PERIOD, args, idempotent=False)
        return PeriodOpened.from_answer(answer)

    async def claim_notifications(
        self, consumer: str, limit: int = DEFAULT_BATCH, *, lease: float | None = None
    ) -> tuple[Notification, ...]:
        """Claim at most ``limit`` (1 to 1000) unacknowledged notifications for ``consumer``,
        oldest first: those never handed out and those whose lease lapsed. Each is leased to
        ``consumer`` for ``lease`` seconds (default 60, at most 1 day): until then no other
        claim hands it out. Acknowledge each with :meth:`ack_notification` once delivered.

        Not idempotent (a claim leases what it hands out): it is retried only when the server
        certainly did not commit it; a claim whose ``COMMIT`` was lost raises
        :class:`ConnectionLost` with ``outcome_unknown=True``, and what it leased is handed
        out again when the lease lapses.
        """
        name = check_text("consumer", consumer, required=True)
        count = check_count("limit", limit, minimum=1, maximum=NOTIFICATIONS_CLAIM_MAX)
        if lease is None:
            answer = await self._call(
                "claim_notifications", _SQL_CLAIM, (name, count), idempotent=False
            )
        else:
            seconds = check_seconds("lease", lease, maximum=LEASE_MAX)
            answer = await self._call(
                "claim_notifications",
                _SQL_CLAIM_LEASE,
                (name, count, timedelta(seconds=seconds)),
                idempotent=False,
            )
        return tuple(Notification.from_answer(item) for item in get_list(answer, "notifications"))

    async def ack_notification(self, notification_id: int, consumer: str) -> NotificationAck:
        """Acknowledge notification ``notification_id`` as ``consumer``: no claim hands it
        out again. Again: ``duplicate`` (the first acknowledgement stands). Raises
        :class:`NotificationNotFound`, and :class:`NotificationClaimed` while another
        consumer's live lease holds it."""
        args = (
            check_count("notification_id", notification_id, minimum=1, maximum=BIGINT_MAX),
            check_text("consumer", consumer, required=True),
        )
        answer = await self._call("ack_notification", _SQL_ACK, args)
        return NotificationAck.from_answer(answer)

    def notifications(
        self,
        consumer: str,
        *,
        batch: int = DEFAULT_BATCH,
        lease: float | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        listen: bool = True,
        auto_ack: bool = True,
    ) -> NotificationStream:
        """The notifications of ``consumer`` as an async iterator, for as long as it runs::

            async for n in tracker.notifications("alerts"):
                print(n.threshold, n.used, n.limit)

        Each one is acknowledged when the loop asks for the next one (or earlier with
        ``await stream.ack(n)``; with ``auto_ack=False`` only then); leaving the loop leaves
        the current one to be handed out again when its lease lapses (at least once). It
        claims ``batch`` at a time with ``lease`` seconds each (default 60), LISTENs for
        ``NOTIFY tokentrack_notifications`` on a dedicated connection (one of the pool's;
        with a single connection, that one), and polls every ``poll_interval`` seconds when
        none arrives, when ``listen`` is false, or while the listening connection is lost (it
        listens again on another of the pool's). See :mod:`tokentrack_client.notifications`.
        """
        name = check_text("consumer", consumer, required=True)
        assert name is not None
        size = check_count("batch", batch, minimum=1, maximum=NOTIFICATIONS_CLAIM_MAX)
        seconds = None if lease is None else check_seconds("lease", lease, maximum=LEASE_MAX)
        interval = check_seconds("poll_interval", poll_interval, maximum=LEASE_MAX)
        return NotificationStream(
            self,
            self._listen_source(),
            name,
            batch=size,
            lease=seconds,
            poll_interval=interval,
            listen=check_flag("listen", listen),
            auto_ack=check_flag("auto_ack", auto_ack),
        )

    def _listen_source(self) -> ListenSource:
        """Where a notification stream gets its listening connection: one of the pool's, or
        the tracker's single connection."""
        pool, single = self._pool, self._connection
        if pool is not None:

            async def acquire() -> object:
                return await pool.acquire()

            async def release(connection: object) -> None:
                await pool.release(connection)  # type: ignore[arg-type]

            return ListenSource(acquire, release, replaceable=True, closed=lambda: False)
        assert single is not None

        async def give() -> object:
            return single

        async def keep(_connection: object) -> None:
            return None

        return ListenSource(give, keep, replaceable=False, closed=lambda: _closed(single))

    def track_report(
        self,
        account_id: IdLike,
        report_id: IdLike,
        estimated_tokens: int,
        *,
        subjects: Iterable[str] = (),
        mode: str | None = None,
        cost_micros: int | None = None,
        model: str | None = None,
        on_overrun: OnOverrun = "ignore",
    ) -> ReportTracker:
        """The report lifecycle as an async context manager::

            async with tracker.track_report(account_id, report_id, 40_000) as report:
                reply = await llm(...)
                await report.step("AN0", input_tokens=reply.input, output_tokens=reply.output)

        Entering reserves ``estimated_tokens`` (with ``subjects``, ``mode``, ``cost_micros``
        or ``model`` as :meth:`try_reserve` takes them, raising its refusals); each ``step``
        records one finished step; ``extend`` raises the reservation. A normal exit marks the
        report ``complete`` and bills it; an exception marks it ``failed`` with the
        exception's message, bills it, and lets the exception propagate; cancellation of the
        task marks it ``cancelled`` and bills it, shielded from the cancellation, then lets
        ``CancelledError`` propagate. With ``on_overrun="raise"``, a step that finds the
        report past its reservation raises :class:`ReservationExceeded` once it is recorded
        (the report then ends ``failed``, as for any exception). See :class:`ReportTracker`.
        """
        return ReportTracker(
            self,
            account_id,
            report_id,
            estimated_tokens,
            subjects=subjects,
            mode=mode,
            cost_micros=cost_micros,
            model=model,
            on_overrun=on_overrun,
        )

    # ----------------------------------------------------------------------------------------
    # Calling a function: one transaction per attempt, retries, error mapping
    # ----------------------------------------------------------------------------------------

    async def _call(
        self, function: str, sql: str, args: tuple[Any, ...], *, idempotent: bool = True
    ) -> Mapping[str, Any]:
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                raw = await self._attempt(sql, args, idempotent)
            except _AttemptFailed as failed:
                elapsed = time.monotonic() - started
                pause = (
                    self._retry.pause_after(attempt, elapsed, self._rng)
                    if self._may_retry(failed, idempotent)
                    else None
                )
                if pause is not None:
                    logger.warning(
                        "tokentrack %s: attempt %d failed (%s during %s), retrying in %.3f s",
                        function,
                        attempt,
                        _describe(failed.error),
                        failed.phase.value,
                        pause,
                    )
                    await asyncio.sleep(pause)
                    continue
                _raise_failure(function, failed, attempt, elapsed)
            return read_answer(function, raw)

    def _may_retry(self, failed: _AttemptFailed, idempotent: bool) -> bool:
        """Whether the failed attempt may be repeated (see :mod:`tokentrack_client.retry`)."""
        if failed.joined:
            return False  # the caller's transaction is aborted: only the caller can retry
        error = failed.error
        if is_timeout(error, failed.phase, failed.connection_closed):
            if not self._retry.retry_timeouts:
                return False
            if sqlstate_of(error) is not None:
                return True  # the server ended the statement: the transaction rolled back
            return idempotent or failed.phase is not Phase.COMMIT  # the driver's timeout
        if is_connection_failure(error, failed.connection_closed):
            if self._pool is None and failed.connection_closed:
                return False  # a single connection that broke cannot be replaced
            return idempotent or failed.phase is not Phase.COMMIT
        return is_rolled_back(error)

    async def _attempt(self, sql: str, args: tuple[Any, ...], idempotent: bool) -> object:
        if self._pool is None:
            assert self._connection is not None
            async with self._lock:
                return await self._in_transaction(self._connection, sql, args, idempotent)
        try:
            connection = await self._pool.acquire()
        except Exception as exc:
            raise _AttemptFailed(exc, Phase.ACQUIRE, connection_closed=False, joined=False) from exc
        try:
            return await self._in_transaction(connection, sql, args, idempotent)
        finally:
            try:
                await self._pool.release(connection)
            except Exception as exc:  # the answer (if any) stands; the pool drops the connection
                logger.debug("tokentrack: releasing a connection failed: %s", _describe(exc))

    async def _in_implicit_transaction(
        self, connection: ConnectionLike, sql: str, args: tuple[Any, ...]
    ) -> object:
        """One round trip: the call as a statement of its own, which the server commits when
        it ends (asyncpg's Bind, Execute and Sync of its cached prepared statement). The
        statement runs the function only in a READ COMMITTED transaction, and answers
        :data:`_NOT_READ_COMMITTED` (having done nothing) in any other: the caller then makes
        the call in an explicit transaction.

        Which failures leave the outcome known: an error the server answered (any SQLSTATE,
        57P01 included) rolled the statement's transaction back, as in the call phase of an
        explicit transaction; a connection that broke, or the driver's timeout, while the
        statement was in flight may have come after its commit, as in the commit phase."""
        try:
            raw = await connection.fetchval(_guarded(sql), *args)
        except BaseException as exc:
            if isinstance(exc, Exception):
                phase = Phase.CALL if sqlstate_of(exc) is not None else Phase.COMMIT
                raise _AttemptFailed(
                    exc, phase, connection_closed=_closed(connection), joined=False
                ) from exc
            raise
        return _NOT_READ_COMMITTED if raw is None else raw

    async def _in_transaction(
        self,
        connection: ConnectionLike,
        sql: str,
        args: tuple[Any, ...],
        idempotent: bool,
    ) -> object:
        if connection.is_in_transaction():
            # The caller's transaction: join it; it commits (or not) with the caller.
            try:
                raw = await connection.fetchval(sql, *args)
            except Exception as exc:
                raise _AttemptFailed(
                    exc, Phase.CALL, connection_closed=_closed(connection), joined=True
                ) from exc
            return raw
        if self._timeout is None and idempotent and _autocommit_safe(connection):
            raw = await self._in_implicit_transaction(connection, sql, args)
            if raw is not _NOT_READ_COMMITTED:
                return raw
        phase = Phase.BEGIN
        try:
            await connection.execute(self._begin)
            phase = Phase.CALL
            raw = await connection.fetchval(sql, *args)
            phase = Phase.COMMIT
            await connection.execute("COMMIT")
        except BaseException as exc:
            await _rollback(connection)
            if isinstance(exc, Exception):
                raise _AttemptFailed(
                    exc, phase, connection_closed=_closed(connection), joined=False
                ) from exc
            raise
        return raw


_NOT_READ_COMMITTED: Final = object()
"""What :meth:`TokenTracker._in_implicit_transaction` answers when the session's default
isolation is not READ COMMITTED (the function was not called)."""

_GUARDED: dict[str, str] = {}


def _guarded(sql: str) -> str:
    """``SELECT tokentrack.f(...)::text`` as a statement that calls ``f`` only in a READ
    COMMITTED transaction (NULL otherwise); the same text for every call of ``f``, so that
    asyncpg's statement cache keeps hitting."""
    text = _GUARDED.get(sql)
    if text is None:
        body = sql.removeprefix("SELECT ")
        text = _GUARDED[sql] = (
            "SELECT CASE WHEN pg_catalog.current_setting('transaction_isolation')"
            f" = 'read committed' THEN {body} END"
        )
    return text


def _autocommit_safe(connection: ConnectionLike) -> bool:
    """Whether a call on ``connection`` may be a single statement of its own: asyncpg caches
    its prepared statements (so the call is one Bind, Execute and Sync, which PgBouncer's
    transaction pooling keeps on one server connection; without the cache the Parse and the
    Bind are two round trips that only an explicit transaction keeps together) and has no
    ``command_timeout`` (whose expiry mid-statement could not tell whether the statement
    committed; in an explicit transaction it can). asyncpg keeps both in the connection's
    ``_config`` (a named tuple, stable since asyncpg 0.18); without it, no."""
    config = getattr(connection, "_config", None)
    return (
        getattr(config, "statement_cache_size", 0) > 0
        and getattr(config, "command_timeout", 0) is None
    )


def _closed(connection: ConnectionLike) -> bool:
    """Whether the connection is gone (a pool's proxy detaches itself when its connection
    breaks, and then answers every method with InterfaceError)."""
    try:
        return connection.is_closed()
    except asyncpg.InterfaceError:
        return True


async def _rollback(connection: ConnectionLike) -> None:
    """Leave the connection outside any transaction, even while the task is being cancelled."""
    if _closed(connection) or not connection.is_in_transaction():
        return
    try:
        await asyncio.shield(connection.execute("ROLLBACK"))
    except BaseException as exc:  # a broken connection: nothing left to roll back
        logger.debug("tokentrack: ROLLBACK failed: %s", _describe(exc))


def _describe(exc: BaseException) -> str:
    state = sqlstate_of(exc)
    text = " ".join(str(exc).split()) or type(exc).__name__
    return (
        f"{type(exc).__name__} [SQLSTATE {state}]: {text}"
        if state
        else f"{type(exc).__name__}: {text}"
    )


def _raise_failure(
    function: str, failed: _AttemptFailed, attempts: int, elapsed: float
) -> NoReturn:
    """Raise the client's exception for a failed call, ``from`` the driver's exception."""
    error = failed.error
    state = sqlstate_of(error)
    detail = _describe(error)
    tries = f"after {attempts} attempt(s) in {elapsed:.1f} s"
    if state is not None and state.startswith("22"):
        column = getattr(error, "column_name", None)
        argument = column.removeprefix("p_") if isinstance(column, str) and column else None
        message = getattr(error, "message", None) or str(error)
        raise InvalidArgument(argument, f"{function}: {message}", state) from error
    if is_timeout(error, failed.phase, failed.connection_closed):
        # Checked before the connection failures: asyncpg's TimeoutError is an OSError.
        unknown = state is None and failed.phase is Phase.COMMIT
        if state is not None:
            how = "timed out on the server, which rolled it back: the call did not take effect"
        elif unknown:
            how = (
                "the driver's timeout expired while COMMIT was in flight: "
                "it may or may not have taken effect"
            )
        else:
            how = "the driver's timeout expired before COMMIT: the call did not take effect"
        raise CallTimeout(
            f"{function}: {how} ({tries}): {detail}", state, attempts, outcome_unknown=unknown
        ) from error
    if is_connection_failure(error, failed.connection_closed):
        unknown = failed.phase is Phase.COMMIT
        if failed.phase is Phase.ACQUIRE:
            how = "could not get a connection"
        elif unknown:
            how = (
                "the connection broke while COMMIT was in flight: "
                "it may or may not have taken effect"
            )
        else:
            how = "the connection broke before COMMIT: the call did not take effect"
        raise ConnectionLost(
            f"{function}: {how} ({tries}): {detail}",
            state,
            attempts,
            outcome_unknown=unknown,
        ) from error
    if is_rolled_back(error):
        raise TransientError(
            f"{function}: rolled back by the server ({tries}): {detail}",
            state,
            attempts,
        ) from error
    if state in ("42883", "3F000", "42P01"):
        raise NotInstalled(
            f"{function}: tokentrack is not installed in this database, or is older than the "
            f"client (run `tokentrack migrate install`): {detail}",
            state,
        ) from error
    if state in ("26000", "42P05"):
        raise DatabaseError(
            f"{function}: asyncpg's prepared statement went missing or collided ({detail}); "
            "behind PgBouncer in transaction pooling mode, create the pool or connection with "
            "statement_cache_size=0",
            state,
        ) from error
    if state == "42501":
        raise PermissionDenied(
            f"{function}: permission denied (grant the role tokentrack_service): {detail}", state
        ) from error
    raise DatabaseError(f"{function}: {detail}", state) from error
