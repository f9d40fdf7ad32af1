"""``tokentrack budgets set``, ``budgets list`` and ``budgets show``: an account's budgets.

``set`` creates or changes one budget with ``tokentrack.set_budget`` (through the client's
:meth:`~tokentrack_client.TokenTracker.set_budget`, so the arguments are checked by the
client's rules first, and the answer is the client's
:class:`~tokentrack_client.BudgetSet`); the service role may run it, as the schema owner may.

``list`` shows every budget of an account with its current window (the window that contains
the server's ``now()``): what its reports were billed there (``used``, from
``budget_windows``), what active, unexpired reservations hold there (``held``) and what is left
of the limit (the effective limit: limit_amount plus the unexpired credit grants, since
version 20261211000000). ``show`` adds a budget's change history (``budget_changes``) and its newest
windows, each with its ``used`` and ``held``. Both read in one read-only transaction, with one
query that asks the SQL itself where the current window starts
(``tokentrack.budget_window_start``: calendar windows in the budget's time zone, daylight
saving included) and what is held in a window (``tokentrack.budget_held``), so that the
figures are the ones ``reserve`` checks. Those two are internal functions that only the schema
owner (the installer's role) may run: for another role, ``list`` and ``show`` stop with one
line that says so.

Times are printed in each budget's time zone (UTC when Python does not know its name).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg

from tokentrack_client.client import TokenTracker
from tokentrack_client.connection import describe_target, pg_error
from tokentrack_client.contract import BIGINT_MAX, BUDGET_WINDOWS
from tokentrack_client.errors import InvalidArgument, Refusal, TokenTrackError
from tokentrack_client.ops._common import OpsError, connected, render_table, require_installed
from tokentrack_client.results import BudgetSet
from tokentrack_client.retry import NO_RETRY
from tokentrack_client.validation import (
    check_budget_kind,
    check_count,
    check_id,
    check_text,
    check_thresholds,
)

__all__ = [
    "DEFAULT_WINDOWS_SHOWN",
    "BudgetChange",
    "BudgetDetail",
    "BudgetList",
    "BudgetStatus",
    "SetBudgetResult",
    "WindowUsage",
    "list_budgets",
    "set_budget",
    "show_budget",
]

DEFAULT_WINDOWS_SHOWN: Final = 10
"""How many of a budget's windows ``show`` lists by default, newest first."""

_APPLICATION: Final = "tokentrack budgets"

# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


def _local(moment: datetime, zone: str) -> datetime:
    """``moment`` in the time zone ``zone`` (as it is when Python does not know the name)."""
    try:
        return moment.astimezone(ZoneInfo(zone))
    except (ZoneInfoNotFoundError, ValueError):
        return moment


def _subject(subject: str | None) -> str:
    return "(account)" if subject is None else subject


def _per(window: str) -> str:
    """``per day``, ``per month``...; ``in total`` for a budget that never resets."""
    return "in total" if window == "total" else f"per {window}"


@dataclass(frozen=True)
class WindowUsage:
    """One window of a budget: where it starts, what its reports were billed there
    (``used``) and what active, unexpired reservations hold there (``held``), in the
    budget's unit."""

    window_start: datetime
    used: int
    held: int

    def as_json(self, zone: str) -> dict[str, Any]:
        """``{"window_start", "used", "held"}`` (the start in the budget's time zone)."""
        return {
            "window_start": _local(self.window_start, zone).isoformat(),
            "used": self.used,
            "held": self.held,
        }


@dataclass(frozen=True)
class BudgetStatus:
    """A budget and its current window."""

    budget_id: uuid.UUID
    subject: str | None
    unit: str
    window: str
    timezone: str
    limit: int
    thresholds: tuple[int, ...]
    created_at: datetime
    current: WindowUsage

    @property
    def available(self) -> int:
        """What the current window can still hold: limit - used - held, at least 0."""
        return max(self.limit - self.current.used - self.current.held, 0)

    def as_json(self) -> dict[str, Any]:
        """The budget's settings, then its current window's ``window_start``, ``used``,
        ``held`` and ``available``."""
        return {
            "budget_id": str(self.budget_id),
            "subject": self.subject,
            "unit": self.unit,
            "window": self.window,
            "timezone": self.timezone,
            "limit": self.limit,
            "thresholds": list(self.thresholds),
            "created_at": _local(self.created_at, self.timezone).isoformat(),
            **self.current.as_json(self.timezone),
            "available": self.available,
        }

    def row(self) -> list[object]:
        """The cells of ``list``'s table."""
        return [
            self.budget_id,
            _subject(self.subject),
            self.unit,
            self.window,
            self.timezone,
            _local(self.current.window_start, self.timezone).isoformat(timespec="seconds"),
            self.current.used,
            self.current.held,
            self.limit,
            self.available,
        ]


_LIST_HEADERS: Final = (
    "BUDGET",
    "SUBJECT",
    "UNIT",
    "WINDOW",
    "TIMEZONE",
    "WINDOW START",
    "USED",
    "HELD",
    "LIMIT",
    "AVAILABLE",
)


@dataclass(frozen=True)
class BudgetList:
    """Every budget of an account with its current window (``tokentrack budgets list``):
    the whole account's first, then by subject, shortest window first."""

    account_id: uuid.UUID
    budgets: tuple[BudgetStatus, ...]

    def as_json(self) -> dict[str, Any]:
        """``{"account_id", "budgets": [...]}``."""
        return {"account_id": str(self.account_id), "budgets": [b.as_json() for b in self.budgets]}

    def render(self) -> str:
        """A table, one line per budget, and a count."""
        if not self.budgets:
            return f"account {self.account_id} has no budget"
        table = render_table(_LIST_HEADERS, [b.row() for b in self.budgets])
        return (
            f"{table}\n{len(self.budgets)} budget(s) of account {self.account_id}; used, held "
            "and available in the current window, in each budget's unit"
        )


@dataclass(frozen=True)
class BudgetChange:
    """One row of ``budget_changes``: the budget's settings from ``changed_at`` on."""

    change_id: int
    changed_at: datetime
    limit: int
    timezone: str
    thresholds: tuple[int, ...]

    def as_json(self, zone: str) -> dict[str, Any]:
        """``{"change_id", "changed_at", "limit", "timezone", "thresholds"}``."""
        return {
            "change_id": self.change_id,
            "changed_at": _local(self.changed_at, zone).isoformat(),
            "limit": self.limit,
            "timezone": self.timezone,
            "thresholds": list(self.thresholds),
        }


@dataclass(frozen=True)
class BudgetDetail:
    """One budget (``tokentrack budgets show``): its settings and current window, its change
    history (oldest first), and its newest windows (newest first; ``windows_total`` is how
    many it has)."""

    account_id: uuid.UUID
    budget: BudgetStatus
    changes: tuple[BudgetChange, ...]
    windows: tuple[WindowUsage, ...]
    windows_total: int

    def as_json(self) -> dict[str, Any]:
        """``{"account_id", "budget", "changes", "windows", "windows_total"}``."""
        zone = self.budget.timezone
        return {
            "account_id": str(self.account_id),
            "budget": self.budget.as_json(),
            "changes": [c.as_json(zone) for c in self.changes],
            "windows": [w.as_json(zone) for w in self.windows],
            "windows_total": self.windows_total,
        }

    def render(self) -> str:
        """The budget, its current window, then the changes and windows as tables."""
        b, zone = self.budget, self.budget.timezone

        def when(moment: datetime) -> str:
            return _local(moment, zone).isoformat(timespec="seconds")

        lines = [
            f"budget {b.budget_id} of account {self.account_id}: {_subject(b.subject)}, "
            f"{b.unit} {_per(b.window)} ({zone}), limit {b.limit}, thresholds "
            f"{', '.join(map(str, b.thresholds))}%, created {when(b.created_at)}",
            f"current window from {when(b.current.window_start)}: used {b.current.used}, "
            f"held {b.current.held}, available {b.available} of {b.limit}",
            "",
            f"changes ({len(self.changes)}):",
            render_table(
                ["CHANGED AT", "LIMIT", "TIMEZONE", "THRESHOLDS"],
                [
                    [when(c.changed_at), c.limit, c.timezone, ",".join(map(str, c.thresholds))]
                    for c in self.changes
                ],
            ),
            "",
        ]
        if self.windows:
            lines.append(f"windows (newest {len(self.windows)} of {self.windows_total}):")
            lines.append(
                render_table(
                    ["WINDOW START", "USED", "HELD"],
                    [[when(w.window_start), w.used, w.held] for w in self.windows],
                )
            )
        else:
            lines.append("windows: none yet (a window starts with its first reservation)")
        return "\n".join(lines)


@dataclass(frozen=True)
class SetBudgetResult:
    """What ``tokentrack budgets set`` did: ``budget`` is the client's
    :class:`~tokentrack_client.BudgetSet`."""

    account_id: uuid.UUID
    budget: BudgetSet

    def as_json(self) -> dict[str, Any]:
        """``{"account_id", "budget_id", "created", "changed", "subject", "unit", "window",
        "limit", "timezone", "thresholds"}``."""
        b = self.budget
        return {
            "account_id": str(self.account_id),
            "budget_id": str(b.budget_id),
            "created": b.created,
            "changed": b.changed,
            "subject": b.subject,
            "unit": b.unit,
            "window": b.window,
            "limit": b.limit,
            "timezone": b.timezone,
            "thresholds": list(b.thresholds),
        }

    def render(self) -> str:
        """``budget ID created|changed|unchanged: SUBJECT, UNIT per WINDOW (TZ), limit N,
        thresholds P%`` (``in total`` for a total budget)."""
        b = self.budget
        what = "created" if b.created else "changed" if b.changed else "unchanged"
        return (
            f"budget {b.budget_id} {what}: {_subject(b.subject)}, {b.unit} {_per(b.window)} "
            f"({b.timezone}), limit {b.limit}, thresholds {', '.join(map(str, b.thresholds))}% "
            f"(account {self.account_id})"
        )


# --------------------------------------------------------------------------------------------
# The database
# --------------------------------------------------------------------------------------------


def _argument(exc: InvalidArgument) -> OpsError:
    return OpsError(f"invalid {exc.argument or 'argument'}: {exc}")


def _account(account_id: str) -> uuid.UUID:
    try:
        return check_id("account", account_id)
    except InvalidArgument as exc:
        raise _argument(exc) from exc


async def set_budget(
    dsn: str,
    account_id: str,
    subject: str | None,
    unit: str,
    window: str,
    limit: int,
    *,
    timezone: str | None = None,
    thresholds: Iterable[int] | None = None,
) -> SetBudgetResult:
    """Create or change the budget with :meth:`TokenTracker.set_budget`; the arguments are
    checked before connecting. A refusal (``account_not_found``), an argument the server
    refuses (an unknown time zone) or any other failure is an :class:`OpsError`."""
    account = _account(account_id)
    try:
        check_budget_kind(unit, window)
        check_count("limit", limit, minimum=0, maximum=BIGINT_MAX)
        if subject is not None:
            check_text("subject", subject, required=True)
        check_text("timezone", timezone, required=False)
        levels = check_thresholds(thresholds)
    except InvalidArgument as exc:
        raise _argument(exc) from exc
    async with connected(dsn, _APPLICATION) as conn:
        await require_installed(conn, table="budgets")
        tracker = TokenTracker(conn, retry=NO_RETRY)
        try:
            budget = await tracker.set_budget(
                account, subject, unit, window, limit, timezone=timezone, thresholds=levels
            )
        except Refusal as exc:
            raise OpsError(f"{exc.message or exc.code} ({exc.code}): nothing was written") from exc
        except InvalidArgument as exc:
            raise _argument(exc) from exc
        except TokenTrackError as exc:
            raise OpsError(f"{describe_target(dsn)}: {exc}") from exc
    return SetBudgetResult(account, budget)


# Every budget of the account (or one), with its current window: where it starts, its
# effective limit there (limit_amount plus unexpired grants: budget_limit, since version
# 20261211000000), what was billed there and what active reservations hold there, as reserve
# computes them.
_BUDGETS: Final = """
SELECT b.id, b.subject, b.unit, b.budget_window, b.timezone,
       tokentrack.budget_limit(b.account_id, b.id, w.window_start) AS limit_amount, b.thresholds,
       b.created_at, w.window_start, COALESCE(bw.used, 0) AS used,
       tokentrack.budget_held(b.account_id, b.id, b.unit, w.window_start) AS held
FROM tokentrack.budgets AS b
CROSS JOIN LATERAL (
    SELECT tokentrack.budget_window_start(
        b.budget_window, b.timezone, b.created_at, pg_catalog.now()
    ) AS window_start
) AS w
LEFT JOIN tokentrack.budget_windows AS bw
    ON bw.account_id = b.account_id AND bw.budget_id = b.id AND bw.window_start = w.window_start
WHERE b.account_id = $1 AND ($2::uuid IS NULL OR b.id = $2::uuid)
ORDER BY b.subject COLLATE "C" NULLS FIRST,
         pg_catalog.array_position($3::text[], b.budget_window), b.unit
"""

_ACCOUNT_EXISTS: Final = "SELECT EXISTS (SELECT FROM tokentrack.accounts WHERE id = $1)"

_CHANGES: Final = """
SELECT c.id, c.changed_at, c.limit_amount, c.timezone, c.thresholds
FROM tokentrack.budget_changes AS c
WHERE c.account_id = $1 AND c.budget_id = $2
ORDER BY c.id
"""

_WINDOWS: Final = """
SELECT w.window_start, w.used,
       tokentrack.budget_held(w.account_id, w.budget_id, $3, w.window_start) AS held,
       pg_catalog.count(*) OVER () AS total
FROM tokentrack.budget_windows AS w
WHERE w.account_id = $1 AND w.budget_id = $2
ORDER BY w.window_start DESC
LIMIT $4
"""


def _status(row: asyncpg.Record) -> BudgetStatus:
    return BudgetStatus(
        budget_id=row["id"],
        subject=row["subject"],
        unit=row["unit"],
        window=row["budget_window"],
        timezone=row["timezone"],
        limit=int(row["limit_amount"]),
        thresholds=tuple(row["thresholds"]),
        created_at=row["created_at"],
        current=WindowUsage(row["window_start"], int(row["used"]), int(row["held"])),
    )


async def _read_budgets(
    conn: asyncpg.Connection, account: uuid.UUID, budget: uuid.UUID | None
) -> Sequence[asyncpg.Record]:
    if not await conn.fetchval(_ACCOUNT_EXISTS, account):
        raise OpsError(f"account {account} does not exist (account_not_found)")
    rows: Sequence[asyncpg.Record] = await conn.fetch(
        _BUDGETS, account, budget, list(BUDGET_WINDOWS)
    )
    return rows


async def _owner_only(dsn: str, conn: asyncpg.Connection, exc: asyncpg.PostgresError) -> OpsError:
    role = await conn.fetchval("SELECT current_user")
    return OpsError(
        f"{describe_target(dsn)}: {pg_error(exc)}: role {role} may not read the budgets' "
        "windows: `tokentrack budgets list` and `show` call the internal functions "
        "tokentrack.budget_window_start and tokentrack.budget_held, which only the schema "
        "owner (the installer's role) may run"
    )


async def list_budgets(dsn: str, account_id: str) -> BudgetList:
    """Every budget of the account with its current window (read-only; the schema owner's)."""
    account = _account(account_id)
    async with connected(dsn, _APPLICATION) as conn:
        await require_installed(conn, table="budgets")
        try:
            async with conn.transaction(readonly=True):
                rows = await _read_budgets(conn, account, None)
        except asyncpg.InsufficientPrivilegeError as exc:
            raise await _owner_only(dsn, conn, exc) from exc
    return BudgetList(account, tuple(_status(r) for r in rows))


async def show_budget(
    dsn: str, account_id: str, budget_id: str, *, windows: int = DEFAULT_WINDOWS_SHOWN
) -> BudgetDetail:
    """One budget of the account: its current window, its changes and its newest
    ``windows`` windows (read-only; the schema owner's)."""
    account = _account(account_id)
    try:
        budget = check_id("budget", budget_id)
        shown = check_count("windows", windows, minimum=1)
    except InvalidArgument as exc:
        raise _argument(exc) from exc
    async with connected(dsn, _APPLICATION) as conn:
        await require_installed(conn, table="budgets")
        try:
            async with conn.transaction(readonly=True):
                found = await _read_budgets(conn, account, budget)
                if not found:
                    raise OpsError(f"account {account} has no budget {budget}")
                status = _status(found[0])
                changes = await conn.fetch(_CHANGES, account, budget)
                recent = await conn.fetch(_WINDOWS, account, budget, status.unit, shown)
                total = int(recent[0]["total"]) if recent else 0  # counted before the LIMIT
        except asyncpg.InsufficientPrivilegeError as exc:
            raise await _owner_only(dsn, conn, exc) from exc
    return BudgetDetail(
        account_id=account,
        budget=status,
        changes=tuple(
            BudgetChange(
                change_id=int(c["id"]),
                changed_at=c["changed_at"],
                limit=int(c["limit_amount"]),
                timezone=c["timezone"],
                thresholds=tuple(c["thresholds"]),
            )
            for c in changes
        ),
        windows=tuple(
            WindowUsage(w["window_start"], int(w["used"]), int(w["held"])) for w in recent
        ),
        windows_total=total,
    )
