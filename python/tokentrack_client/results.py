"""Frozen result types of the tokentrack client, built from the functions' jsonb answers.

Each ``from_answer`` takes an answer that :func:`tokentrack_client.answers.read_answer`
decoded and reads its fields through that module's readers.

Each result keeps the whole answer in ``answer`` (excluded from comparisons and ``repr``),
so keys that a newer SQL version adds are not lost.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tokentrack_client.answers import (
    get_bool,
    get_datetime,
    get_int,
    get_int_list,
    get_list,
    get_optional_int,
    get_optional_str,
    get_optional_uuid,
    get_str,
    get_uuid,
)

__all__ = [
    "BudgetHold",
    "BudgetSet",
    "CreditGrant",
    "Discrepancy",
    "Extension",
    "PeriodOpened",
    "Reconciliation",
    "Refund",
    "RefundPeriod",
    "RefundWindow",
    "Reservation",
    "Settlement",
    "StepRecord",
    "SweepResult",
    "UsageAdjustment",
    "UsageIncrement",
]


def _answer_field() -> Any:
    """The ``answer`` field: the raw answer, kept out of comparisons, hashing and repr."""
    return field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class BudgetHold:
    """What a reservation holds in one budget window (an element of ``budgets`` in the
    answers of ``reserve``, ``try_reserve_tokens`` and ``extend_reservation``).

    ``subject`` is ``None`` for a budget of the whole account; ``window`` is ``minute``,
    ``hour``, ``day``, ``week``, ``month`` or ``total``; ``unit`` ``tokens`` or
    ``cost_micros``; ``window_start`` the start of the window the reservation was granted in.
    ``held`` is what this reservation holds there (its tokens, or its cost estimate: 0
    without one), ``available`` what the window can still hold after it, in the budget's
    unit (``None`` in the answer to a retry, which reports what the reservation holds
    without checking the window again).
    """

    budget_id: uuid.UUID
    subject: str | None
    window: str
    unit: str
    window_start: datetime
    held: int
    available: int | None

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> BudgetHold:
        """Build from one element of an answer's ``budgets``."""
        return cls(
            budget_id=get_uuid(answer, "budget_id"),
            subject=get_optional_str(answer, "subject"),
            window=get_str(answer, "window"),
            unit=get_str(answer, "unit"),
            window_start=get_datetime(answer, "window_start"),
            held=get_int(answer, "held"),
            available=get_optional_int(answer, "available"),
        )


def _holds(answer: Mapping[str, Any]) -> tuple[BudgetHold, ...]:
    return tuple(BudgetHold.from_answer(item) for item in get_list(answer, "budgets"))


@dataclass(frozen=True)
class Reservation:
    """A granted reservation (``try_reserve_tokens``, ``reserve``).

    ``available_tokens`` is what the account's usage period can still reserve after this
    one; ``existing`` is true when the report already held this active reservation (a retry:
    nothing more was reserved). ``budgets`` is what it holds in each budget window that
    applied (the account's budgets and those of its subjects); empty for a retry
    (``existing``), whose answer does not list them.
    """

    reservation_id: uuid.UUID
    reserved_tokens: int
    available_tokens: int
    expires_at: datetime
    period_id: uuid.UUID | None = None
    existing: bool = False
    budgets: tuple[BudgetHold, ...] = ()
    answer: Mapping[str, Any] = _answer_field()

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> Reservation:
        """Build from a ``"success": true`` answer of ``try_reserve_tokens`` or ``reserve``."""
        return cls(
            reservation_id=get_uuid(answer, "reservation_id"),
            reserved_tokens=get_int(answer, "reserved_tokens"),
            available_tokens=get_int(answer, "available_tokens"),
            expires_at=get_datetime(answer, "expires_at"),
            period_id=get_optional_uuid(answer, "period_id"),
            existing=get_bool(answer, "existing", default=False),
            budgets=_holds(answer),
            answer=answer,
        )


@dataclass(frozen=True)
class Extension:
    """A reservation after ``extend_reservation`` raised its hold.

    ``reserved_tokens`` and ``reserved_cost_micros`` (``None``: no cost estimate) are the
    reservation's whole hold now; ``available_tokens`` is what its usage period can still
    reserve; ``expires_at`` is unchanged by the extension. ``budgets`` is what it holds in
    each budget window it was granted in, after the extension.
    """

    reservation_id: uuid.UUID
    reserved_tokens: int
    reserved_cost_micros: int | None
    available_tokens: int
    expires_at: datetime
    period_id: uuid.UUID | None = None
    budgets: tuple[BudgetHold, ...] = ()
    answer: Mapping[str, Any] = _answer_field()

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> Extension:
        """Build from a ``"success": true`` answer of ``extend_reservation``."""
        return cls(
            reservation_id=get_uuid(answer, "reservation_id"),
            reserved_tokens=get_int(answer, "reserved_tokens"),
            reserved_cost_micros=get_optional_int(answer, "reserved_cost_micros"),
            available_tokens=get_int(answer, "available_tokens"),
            expires_at=get_datetime(answer, "expires_at"),
            period_id=get_optional_uuid(answer, "period_id"),
            budgets=_holds(answer),
            answer=answer,
        )


@dataclass(frozen=True)
class BudgetSet:
    """A budget after ``set_budget`` created or changed it.

    ``created``: it is new; ``changed``: something was written (always when created; false
    when the budget already had exactly these settings). ``subject`` is ``None`` for the
    whole account; ``limit`` is in ``unit``; ``thresholds`` are the soft thresholds in
    percent, ascending.
    """

    budget_id: uuid.UUID
    created: bool
    changed: bool
    subject: str | None
    unit: str
    window: str
    limit: int
    timezone: str
    thresholds: tuple[int, ...]
    answer: Mapping[str, Any] = _answer_field()

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> BudgetSet:
        """Build from a ``"success": true`` answer of ``set_budget``."""
        return cls(
            budget_id=get_uuid(answer, "budget_id"),
            created=get_bool(answer, "created"),
            changed=get_bool(answer, "changed"),
            subject=get_optional_str(answer, "subject"),
            unit=get_str(answer, "unit"),
            window=get_str(answer, "window"),
            limit=get_int(answer, "limit"),
            timezone=get_str(answer, "timezone"),
            thresholds=get_int_list(answer, "thresholds"),
            answer=answer,
        )


@dataclass(frozen=True)
class StepRecord:
    """A recorded step (``persist_step_usage``, ``record_step``).

    ``duplicate``: the same step with the same numbers was already recorded (a retry; nothing
    changed). ``late``: the report was already billed, so this step was billed at once.
    ``report_status`` is set when the report already has an outcome (``complete``,
    ``failed``, ``cancelled``): the generator should stop. ``cost_micros`` is the step's
    cost in micro-units of the installation's currency (``record_step``'s answer), computed
    once from the model's price in effect when the step was recorded; ``None`` when the model
    is unpriced, and from ``persist_step_usage``, whose answer keeps Part 1's keys (its step
    is priced all the same: the report's ``token_usage`` counts the cost).
    ``over_reservation`` is true once the report's recorded tokens pass what it reserved
    (this step's answer and every later one), ``over_by`` how far (``None`` when not over);
    billing stays the actual usage.
    """

    step_id: uuid.UUID
    total_tokens: int
    duplicate: bool
    late: bool
    report_status: str | None = None
    cost_micros: int | None = None
    over_reservation: bool = False
    over_by: int | None = None
    answer: Mapping[str, Any] = _answer_field()

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> StepRecord:
        """Build from a ``"success": true`` answer of ``persist_step_usage`` or
        ``record_step``."""
        return cls(
            step_id=get_uuid(answer, "step_id"),
            total_tokens=get_int(answer, "total_tokens"),
            duplicate=get_bool(answer, "duplicate"),
            late=get_bool(answer, "late"),
            report_status=get_optional_str(answer, "report_status"),
            cost_micros=get_optional_int(answer, "cost_micros"),
            over_reservation=get_bool(answer, "over_reservation", default=False),
            over_by=get_optional_int(answer, "over_by"),
            answer=answer,
        )


@dataclass(frozen=True)
class Settlement:
    """A billed report (``finalize_report_usage``, ``finish_report``, ``cancel_report``).

    ``billed_tokens`` is what the reservation billed (the first time, however often it is
    asked), ``steps`` how many steps it covers; ``already_finalized`` is true when it had been
    billed before this call. ``tokens_used``/``tokens_limit`` are the period's after billing.
    ``report_status`` is the report's outcome (set by ``finish_report``).
    """

    billed_tokens: int
    steps: int
    already_finalized: bool
    tokens_used: int
    tokens_limit: int
    reservation_status: str | None = None
    report_status: str | None = None
    answer: Mapping[str, Any] = _answer_field()

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> Settlement:
        """Build from a ``"success": true`` answer of finalize or finish_report."""
        return cls(
            billed_tokens=get_int(answer, "billed_tokens"),
            steps=get_int(answer, "steps"),
            already_finalized=get_bool(answer, "already_finalized"),
            tokens_used=get_int(answer, "tokens_used"),
            tokens_limit=get_int(answer, "tokens_limit"),
            reservation_status=get_optional_str(answer, "reservation_status"),
            report_status=get_optional_str(answer, "report_status"),
            answer=answer,
        )


@dataclass(frozen=True)
class SweepResult:
    """What one expiry sweep did (``cleanup_expired_reservations``)."""

    expired: int
    billed_tokens: int
    steps: int = 0
    answer: Mapping[str, Any] = _answer_field()

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> SweepResult:
        """Build from the answer of ``cleanup_expired_reservations``."""
        return cls(
            expired=get_int(answer, "expired"),
            billed_tokens=get_int(answer, "billed_tokens"),
            steps=get_int(answer, "steps", default=0),
            answer=answer,
        )


@dataclass(frozen=True)
class Discrepancy:
    """One failed check of :meth:`TokenTracker.reconcile`.

    ``check`` is ``tokens_used``, ``reports_count``, ``ledger_entry`` or ``billed_steps``;
    ``expected`` is what the ledger explains, ``actual`` what the period (or entry) holds.
    """

    period_id: uuid.UUID
    account_id: uuid.UUID
    check: str
    expected: int
    actual: int
    ledger_entry_id: int | None = None
    answer: Mapping[str, Any] = _answer_field()

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> Discrepancy:
        """Build from one element of reconcile's ``discrepancies``."""
        return cls(
            period_id=get_uuid(answer, "period_id"),
            account_id=get_uuid(answer, "account_id"),
            check=get_str(answer, "check"),
            expected=get_int(answer, "expected"),
            actual=get_int(answer, "actual"),
            ledger_entry_id=get_optional_int(answer, "ledger_entry_id"),
            answer=answer,
        )


@dataclass(frozen=True)
class Reconciliation:
    """The verdict of ``reconcile``: ``ok`` when every period is explained by its ledger."""

    ok: bool
    periods_checked: int
    discrepancies: tuple[Discrepancy, ...] = ()
    answer: Mapping[str, Any] = _answer_field()

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> Reconciliation:
        """Build from the answer of ``reconcile``."""
        return cls(
            ok=get_bool(answer, "ok"),
            periods_checked=get_int(answer, "periods_checked"),
            discrepancies=tuple(
                Discrepancy.from_answer(item) for item in get_list(answer, "discrepancies")
            ),
            answer=answer,
        )


@dataclass(frozen=True)
class UsageIncrement:
    """The period after ``increment_usage`` (the legacy path)."""

    tokens_used: int
    tokens_limit: int
    reports_count: int
    period_id: uuid.UUID | None = None
    answer: Mapping[str, Any] = _answer_field()

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> UsageIncrement:
        """Build from a ``"success": true`` answer of ``increment_usage``."""
        return cls(
            tokens_used=get_int(answer, "tokens_used"),
            tokens_limit=get_int(answer, "tokens_limit"),
            reports_count=get_int(answer, "reports_count"),
            period_id=get_optional_uuid(answer, "period_id"),
            answer=answer,
        )


@dataclass(frozen=True)
class PeriodOpened:
    """A newly opened usage period (``open_usage_period``)."""

    period_id: uuid.UUID
    tokens_limit: int
    period_start: datetime
    period_end: datetime
    previous_period_id: uuid.UUID | None = None
    answer: Mapping[str, Any] = _answer_field()

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> PeriodOpened:
        """Build from a ``"success": true`` answer of ``open_usage_period``."""
        return cls(
            period_id=get_uuid(answer, "period_id"),
            tokens_limit=get_int(answer, "tokens_limit"),
            period_start=get_datetime(answer, "period_start"),
            period_end=get_datetime(answer, "period_end"),
            previous_period_id=get_optional_uuid(answer, "previous_period_id"),
            answer=answer,
        )


@dataclass(frozen=True)
class CreditGrant:
    """A grant of credits to a budget (``grant_credits``).

    ``amount`` (in the budget's ``unit``) raises the budget's limit in every window the grant
    overlaps until ``expires_at`` (``None``: never). ``limit`` is the budget's effective limit
    in its current window (from ``window_start``) at the time of the answer, this grant
    included while unexpired. ``duplicate``: the same key with the same arguments was already
    granted (a retry; nothing was written, the fields are the first grant's).
    """

    grant_id: uuid.UUID
    budget_id: uuid.UUID
    unit: str
    amount: int
    expires_at: datetime | None
    granted_at: datetime
    window_start: datetime
    limit: int
    duplicate: bool
    answer: Mapping[str, Any] = _answer_field()

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> CreditGrant:
        """Build from a ``"success": true`` answer of ``grant_credits``."""
        return cls(
            grant_id=get_uuid(answer, "grant_id"),
            budget_id=get_uuid(answer, "budget_id"),
            unit=get_str(answer, "unit"),
            amount=get_int(answer, "amount"),
            expires_at=None
            if answer.get("expires_at") is None
            else get_datetime(answer, "expires_at"),
            granted_at=get_datetime(answer, "granted_at"),
            window_start=get_datetime(answer, "window_start"),
            limit=get_int(answer, "limit"),
            duplicate=get_bool(answer, "duplicate"),
            answer=answer,
        )


@dataclass(frozen=True)
class UsageAdjustment:
    """A signed correction (``adjust_usage``) of a budget window's used amount (``budget_id``
    and ``window_start`` set, ``period_id`` ``None``) or of the account's active usage
    period's ``tokens_used`` (``period_id`` set, the others ``None``).

    ``delta`` is in ``unit`` (``tokens`` for a period); ``used`` is the window's used amount
    or the period's ``tokens_used`` after the adjustment (for a ``duplicate``: now).
    """

    adjustment_id: uuid.UUID
    budget_id: uuid.UUID | None
    window_start: datetime | None
    period_id: uuid.UUID | None
    unit: str
    delta: int
    used: int
    duplicate: bool
    answer: Mapping[str, Any] = _answer_field()

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> UsageAdjustment:
        """Build from a ``"success": true`` answer of ``adjust_usage``."""
        return cls(
            adjustment_id=get_uuid(answer, "adjustment_id"),
            budget_id=get_optional_uuid(answer, "budget_id"),
            window_start=(
                None if answer.get("window_start") is None else get_datetime(answer, "window_start")
            ),
            period_id=get_optional_uuid(answer, "period_id"),
            unit=get_str(answer, "unit"),
            delta=get_int(answer, "delta"),
            used=get_int(answer, "used"),
            duplicate=get_bool(answer, "duplicate"),
            answer=answer,
        )


@dataclass(frozen=True)
class RefundPeriod:
    """What a refund took out of one usage period's ``tokens_used``."""

    period_id: uuid.UUID
    tokens: int

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> RefundPeriod:
        """Build from one element of a refund's ``periods``."""
        return cls(period_id=get_uuid(answer, "period_id"), tokens=get_int(answer, "tokens"))


@dataclass(frozen=True)
class RefundWindow:
    """What a refund took out of one budget window's used amount, in the budget's ``unit``."""

    budget_id: uuid.UUID
    window_start: datetime
    unit: str
    amount: int

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> RefundWindow:
        """Build from one element of a refund's ``windows``."""
        return cls(
            budget_id=get_uuid(answer, "budget_id"),
            window_start=get_datetime(answer, "window_start"),
            unit=get_str(answer, "unit"),
            amount=get_int(answer, "amount"),
        )


@dataclass(frozen=True)
class Refund:
    """A refund of a billed report (``refund_report``): ``tokens`` (its billed steps'
    total_tokens) and ``cost_micros`` (their cost) taken back out of every usage period
    (``periods``) and budget window (``windows``) the report was billed into.

    ``duplicate``: the same key for the same report was already refunded (a retry; nothing was
    written, the fields are the first refund's).
    """

    refund_id: uuid.UUID
    report_id: uuid.UUID
    tokens: int
    cost_micros: int
    periods: tuple[RefundPeriod, ...]
    windows: tuple[RefundWindow, ...]
    refunded_at: datetime
    duplicate: bool
    answer: Mapping[str, Any] = _answer_field()

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> Refund:
        """Build from a ``"success": true`` answer of ``refund_report``."""
        return cls(
            refund_id=get_uuid(answer, "refund_id"),
            report_id=get_uuid(answer, "report_id"),
            tokens=get_int(answer, "tokens"),
            cost_micros=get_int(answer, "cost_micros"),
            periods=tuple(RefundPeriod.from_answer(p) for p in get_list(answer, "periods")),
            windows=tuple(RefundWindow.from_answer(w) for w in get_list(answer, "windows")),
            refunded_at=get_datetime(answer, "refunded_at"),
            duplicate=get_bool(answer, "duplicate"),
            answer=answer,
        )
