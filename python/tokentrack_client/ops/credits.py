"""``tokentrack credits grant|list``, ``tokentrack adjust`` and ``tokentrack refund``: the
only way to correct billing (docs/RUNBOOK.md, "Correcting billing").

``credits grant``, ``adjust`` and ``refund`` call ``tokentrack.grant_credits``,
``tokentrack.adjust_usage`` and ``tokentrack.refund_report`` through the client's
:meth:`~tokentrack_client.TokenTracker.grant_credits`,
:meth:`~tokentrack_client.TokenTracker.adjust_usage` and
:meth:`~tokentrack_client.TokenTracker.refund_report` (the arguments are checked by the
client's rules first; the answers are the client's
:class:`~tokentrack_client.CreditGrant`, :class:`~tokentrack_client.UsageAdjustment` and
:class:`~tokentrack_client.Refund`). Each writes one append-only record and is idempotent by
its key: running the same command again with the same key is a retry (``duplicate``).
``credits list`` reads an account's grants (``tokentrack.credit_grants``), newest first, each
with whether it still counts. The service role may run all four, as the schema owner may.
A refusal (``budget_not_found``, ``idempotency_conflict``, ``negative_usage``, ...) is an
:class:`~tokentrack_client.ops._common.OpsError`: one line, exit 2, nothing written.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from tokentrack_client.client import TokenTracker
from tokentrack_client.connection import describe_target
from tokentrack_client.errors import InvalidArgument, Refusal, TokenTrackError
from tokentrack_client.ops._common import OpsError, connected, render_table, require_installed
from tokentrack_client.results import CreditGrant, Refund, UsageAdjustment
from tokentrack_client.retry import NO_RETRY
from tokentrack_client.validation import check_id

__all__ = [
    "AdjustResult",
    "CreditList",
    "GrantResult",
    "GrantRow",
    "RefundResult",
    "adjust_usage",
    "grant_credits",
    "list_credits",
    "parse_expiry",
    "refund_report",
]

_APPLICATION: Final = "tokentrack credits"


def _argument(exc: InvalidArgument) -> OpsError:
    return OpsError(f"invalid {exc.argument or 'argument'}: {exc}")


def _id(name: str, value: str) -> uuid.UUID:
    try:
        return check_id(name, value)
    except InvalidArgument as exc:
        raise _argument(exc) from exc


def parse_expiry(text: str | None) -> datetime | None:
    """``--expires-at``: an ISO 8601 time with its UTC offset (``2027-01-01T00:00:00+00:00``),
    or None."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise OpsError(f"invalid expires_at: not an ISO 8601 time: {text!r}") from None
    if moment.tzinfo is None:
        raise OpsError(f"invalid expires_at: give its UTC offset (e.g. {text}+00:00)")
    return moment


def _refused(exc: Refusal) -> OpsError:
    return OpsError(f"{exc.message or exc.code} ({exc.code}): nothing was written")


@dataclass(frozen=True)
class GrantResult:
    """What ``credits grant`` did."""

    account_id: uuid.UUID
    grant: CreditGrant

    def as_json(self) -> dict[str, Any]:
        """grant_credits' answer."""
        return dict(self.grant.answer)

    def render(self) -> str:
        """``granted N UNIT to budget ID until T (grant G): limit now L`` (``already granted``
        for a retry)."""
        g = self.grant
        until = "without expiry" if g.expires_at is None else f"until {g.expires_at.isoformat()}"
        what = "already granted" if g.duplicate else "granted"
        return (
            f"{what} {g.amount} {g.unit} to budget {g.budget_id} {until} (grant {g.grant_id}): "
            f"its limit in the window from {g.window_start.isoformat()} is now {g.limit} "
            f"(account {self.account_id})"
        )


@dataclass(frozen=True)
class GrantRow:
    """One grant of ``credits list``."""

    grant_id: uuid.UUID
    budget_id: uuid.UUID
    amount: int
    granted_at: datetime
    expires_at: datetime | None
    active: bool
    idempotency_key: str
    reason: str
    granted_by: str

    def as_json(self) -> dict[str, Any]:
        """The grant's columns, and ``active`` (unexpired)."""
        return {
            "grant_id": str(self.grant_id),
            "budget_id": str(self.budget_id),
            "amount": self.amount,
            "granted_at": self.granted_at.isoformat(),
            "expires_at": None if self.expires_at is None else self.expires_at.isoformat(),
            "active": self.active,
            "idempotency_key": self.idempotency_key,
            "reason": self.reason,
            "granted_by": self.granted_by,
        }


@dataclass(frozen=True)
class CreditList:
    """An account's grants, newest first."""

    account_id: uuid.UUID
    grants: tuple[GrantRow, ...]

    def as_json(self) -> dict[str, Any]:
        """``{"account_id", "grants": [...]}``."""
        return {"account_id": str(self.account_id), "grants": [g.as_json() for g in self.grants]}

    def render(self) -> str:
        """A table of the grants, or a line saying there is none."""
        if not self.grants:
            return f"account {self.account_id} has no credit grants"
        rows = [
            (
                g.grant_id,
                g.budget_id,
                g.amount,
                g.granted_at.isoformat(timespec="seconds"),
                "never" if g.expires_at is None else g.expires_at.isoformat(timespec="seconds"),
                "yes" if g.active else "expired",
                g.reason,
            )
            for g in self.grants
        ]
        return render_table(
            ("grant", "budget", "amount", "granted_at", "expires_at", "counts", "reason"), rows
        )


@dataclass(frozen=True)
class AdjustResult:
    """What ``adjust`` did."""

    account_id: uuid.UUID
    adjustment: UsageAdjustment

    def as_json(self) -> dict[str, Any]:
        """adjust_usage's answer."""
        return dict(self.adjustment.answer)

    def render(self) -> str:
        """``adjusted ... by DELTA UNIT (adjustment A): used now U``."""
        a = self.adjustment
        where = (
            f"period {a.period_id}"
            if a.budget_id is None or a.window_start is None
            else f"budget {a.budget_id} (window from {a.window_start.isoformat()})"
        )
        what = "already adjusted" if a.duplicate else "adjusted"
        return (
            f"{what} {where} by {a.delta:+d} {a.unit} (adjustment {a.adjustment_id}): "
            f"used now {a.used} (account {self.account_id})"
        )


@dataclass(frozen=True)
class RefundResult:
    """What ``refund`` did."""

    account_id: uuid.UUID
    refund: Refund

    def as_json(self) -> dict[str, Any]:
        """refund_report's answer."""
        return dict(self.refund.answer)

    def render(self) -> str:
        """``refunded report R: N tokens, C cost_micros, from P period(s) and W budget
        window(s) (refund F)``."""
        r = self.refund
        what = "already refunded" if r.duplicate else "refunded"
        return (
            f"{what} report {r.report_id}: {r.tokens} tokens and {r.cost_micros} cost_micros "
            f"taken out of {len(r.periods)} period(s) and {len(r.windows)} budget window(s) "
            f"(refund {r.refund_id}, account {self.account_id})"
        )


async def grant_credits(
    dsn: str,
    account_id: str,
    budget_id: str,
    amount: int,
    *,
    expires_at: datetime | None,
    idempotency_key: str,
    reason: str,
) -> GrantResult:
    """Grant credits with :meth:`TokenTracker.grant_credits`."""
    account = _id("account", account_id)
    budget = _id("budget", budget_id)
    async with connected(dsn, _APPLICATION) as conn:
        await require_installed(conn, table="credit_grants")
        tracker = TokenTracker(conn, retry=NO_RETRY)
        try:
            grant = await tracker.grant_credits(
                account,
                budget,
                amount,
                expires_at=expires_at,
                idempotency_key=idempotency_key,
                reason=reason,
            )
        except Refusal as exc:
            raise _refused(exc) from exc
        except InvalidArgument as exc:
            raise _argument(exc) from exc
        except TokenTrackError as exc:
            raise OpsError(f"{describe_target(dsn)}: {exc}") from exc
    return GrantResult(account, grant)


_GRANTS: Final = """
SELECT g.id, g.budget_id, g.amount, g.granted_at, g.expires_at,
       (g.expires_at IS NULL OR g.expires_at > pg_catalog.now()) AS active,
       g.idempotency_key, g.reason, g.granted_by
FROM tokentrack.credit_grants AS g
WHERE g.account_id = $1 AND ($2::uuid IS NULL OR g.budget_id = $2::uuid)
ORDER BY g.granted_at DESC, g.id
"""


async def list_credits(dsn: str, account_id: str, budget_id: str | None = None) -> CreditList:
    """The account's grants (of one budget, or all), newest first."""
    account = _id("account", account_id)
    budget = None if budget_id is None else _id("budget", budget_id)
    async with connected(dsn, _APPLICATION) as conn:
        await require_installed(conn, table="credit_grants")
        rows = await conn.fetch(_GRANTS, account, budget)
    return CreditList(
        account,
        tuple(
            GrantRow(
                grant_id=r["id"],
                budget_id=r["budget_id"],
                amount=int(r["amount"]),
                granted_at=r["granted_at"],
                expires_at=r["expires_at"],
                active=bool(r["active"]),
                idempotency_key=r["idempotency_key"],
                reason=r["reason"],
                granted_by=r["granted_by"],
            )
            for r in rows
        ),
    )


async def adjust_usage(
    dsn: str,
    account_id: str,
    delta: int,
    *,
    budget_id: str | None,
    idempotency_key: str,
    reason: str,
) -> AdjustResult:
    """Adjust usage with :meth:`TokenTracker.adjust_usage`."""
    account = _id("account", account_id)
    budget = None if budget_id is None else _id("budget", budget_id)
    async with connected(dsn, _APPLICATION) as conn:
        await require_installed(conn, table="usage_adjustments")
        tracker = TokenTracker(conn, retry=NO_RETRY)
        try:
            adjustment = await tracker.adjust_usage(
                account, delta, budget_id=budget, idempotency_key=idempotency_key, reason=reason
            )
        except Refusal as exc:
            raise _refused(exc) from exc
        except InvalidArgument as exc:
            raise _argument(exc) from exc
        except TokenTrackError as exc:
            raise OpsError(f"{describe_target(dsn)}: {exc}") from exc
    return AdjustResult(account, adjustment)


async def refund_report(
    dsn: str, report_id: str, account_id: str, *, idempotency_key: str, reason: str
) -> RefundResult:
    """Refund a report with :meth:`TokenTracker.refund_report`."""
    report = _id("report", report_id)
    account = _id("account", account_id)
    async with connected(dsn, _APPLICATION) as conn:
        await require_installed(conn, table="report_refunds")
        tracker = TokenTracker(conn, retry=NO_RETRY)
        try:
            refund = await tracker.refund_report(
                report, account, idempotency_key=idempotency_key, reason=reason
            )
        except Refusal as exc:
            raise _refused(exc) from exc
        except InvalidArgument as exc:
            raise _argument(exc) from exc
        except TokenTrackError as exc:
            raise OpsError(f"{describe_target(dsn)}: {exc}") from exc
    return RefundResult(account, refund)
