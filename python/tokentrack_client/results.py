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
    get_list,
    get_optional_int,
    get_optional_str,
    get_optional_uuid,
    get_str,
    get_uuid,
)

__all__ = [
    "Discrepancy",
    "PeriodOpened",
    "Reconciliation",
    "Reservation",
    "Settlement",
    "StepRecord",
    "SweepResult",
    "UsageIncrement",
]


def _answer_field() -> Any:
    """The ``answer`` field: the raw answer, kept out of comparisons, hashing and repr."""
    return field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Reservation:
    """A granted reservation (``try_reserve_tokens``).

    ``available_tokens`` is what the account can still reserve after this one; ``existing``
    is true when the report already held this active reservation (a retry: nothing more was
    reserved).
    """

    reservation_id: uuid.UUID
    reserved_tokens: int
    available_tokens: int
    expires_at: datetime
    period_id: uuid.UUID | None = None
    existing: bool = False
    answer: Mapping[str, Any] = _answer_field()

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> Reservation:
        """Build from a ``"success": true`` answer of ``try_reserve_tokens``."""
        return cls(
            reservation_id=get_uuid(answer, "reservation_id"),
            reserved_tokens=get_int(answer, "reserved_tokens"),
            available_tokens=get_int(answer, "available_tokens"),
            expires_at=get_datetime(answer, "expires_at"),
            period_id=get_optional_uuid(answer, "period_id"),
            existing=get_bool(answer, "existing", default=False),
            answer=answer,
        )


@dataclass(frozen=True)
class StepRecord:
    """A recorded step (``persist_step_usage``, ``record_step``).

    ``duplicate``: the same step with the same numbers was already recorded (a retry; nothing
    changed). ``late``: the report was already billed, so this step was billed at once.
    ``report_status`` is set when the report already has an outcome (``complete``,
    ``failed``, ``cancelled``): the generator should stop. ``cost_micros`` is the step's
    cost in micro-units of the installation's currency, computed once from the model's price
    in effect when the step was recorded; ``None`` when the model is unpriced (or the server
    is older than the cost version and sends no cost).
    """

    step_id: uuid.UUID
    total_tokens: int
    duplicate: bool
    late: bool
    report_status: str | None = None
    cost_micros: int | None = None
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
