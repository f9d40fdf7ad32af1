"""The oracle: what the database must hold, given the calls that were made and their answers.

Plain Python, no database. ``AccountModel`` is a sequential reference implementation of the
tokentrack contract for one account (its periods, reports, reservations and steps), written
from docs/API.md and the function headers, not from the SQL bodies.

Concurrent calls are checked the way linearizability checkers (Knossos, Porcupine) do it:
``check_round`` is given the calls of one round, in lanes (one lane per connection, its
calls in program order) with the answers they got, and the database state read afterwards.
For every account it searches for a serial order of the calls touching that account that
respects each lane's order and in which the model gives every call exactly the answer it
got; the round is explained when such an order also ends in exactly the state the database
holds. Accounts are independent (every call locks within one account), so the search runs
per account; the expiry sweep, which spans accounts, is split into per-account parts whose
totals must add up to the sweep's answer.

The sweep is not one atomic step of an account: it selects the due reservations with one
snapshot, then locks and bills them one by one, skipping those billed meanwhile. It is
modelled as START (the set D of due active reservations is fixed), any number of
SWEEP-ONE(r in D, still active), and FINISH (every r in D is no longer active). The batched
procedure (``CALL sweep_expired_reservations(n)``) commits per batch: before its last batch
it may bill any due reservation, then behaves as above.

No answer is predicted that the model cannot know: ids (reservation, step, period, budget)
are adopted from the first answer that carries them and compared from then on.

Budgets (Part 2): an account's budgets (``set_budget``), each in calendar windows of its time
zone or in total, and ``reserve`` with subjects and cost estimates. The model cannot read the
clock, so a window is what the answer says it is, provided it is possible: each call carries
the interval of the database clock its round ran in (``Call.at``), and a window a call names
must be the window of one moment of that interval for every budget at once (every calendar
window starts on a whole minute, so the interval's whole minutes split it into the only
moments that differ). A total budget's window starts when the budget was created, which the
model adopts from the first answer (or database row) that shows it. A reservation holds, while
it is active and unexpired, its tokens in every tokens budget and its cost estimate (none: 0)
in every cost budget of the windows it was granted in (``holds``); billing (finalize, finish,
the sweep, a late step) adds the billed tokens or cost to those windows. With that, reserve is
granted exactly when the estimate fits the period and every budget that applies, and refused
by the first budget (in id order) that cannot hold it; extend_reservation raises a hold when
the extra fits the account's active period and every window it holds; a step's answer carries
over_reservation once the report's recorded tokens pass its reservation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from itertools import product
from typing import Any
from zoneinfo import ZoneInfo

FINAL_STATUSES = frozenset({"complete", "failed", "cancelled"})
SEARCH_BUDGET = 400_000  # DFS nodes per account per round; rounds are kept far below it
# The prices a harness with budgets installs (micros per token: input, output); the dearest
# class prices a reservation's {"model": ...} estimate. Cached input and cache writes default
# to the input price, reasoning to the output price.
PRICED_MODEL = "model-x"
PRICES: Mapping[str, tuple[int, int]] = {PRICED_MODEL: (1, 3)}
# Steps of one report recorded at once share its reservation (FOR SHARE) and each sums the
# report's recorded tokens before the others commit, so two racing steps can each miss the
# other and neither answer carry over_reservation although together they pass the
# reservation (tests/invariants/test_budget_races.py::test_racing_steps_that_pass_the_
# reservation_together_are_flagged fails on it). Until the SQL serialises that sum, the oracle
# accepts an answer's recorded_tokens anywhere from what it must have seen (the steps recorded
# before the round, and itself) to what a serial order puts before it; True: exactly the latter.
STRICT_OVERRUN = False

# --------------------------------------------------------------------------------------------
# Operations (labels, not uuids: the harness maps labels to ids)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reserve:
    """``try_reserve_tokens`` (``subjects`` None), else ``reserve`` with these subjects, an
    estimate of ``estimate`` tokens and ``cost`` micros (or, ``priced``, the tokens priced at
    PRICED_MODEL's dearest class) and the report's mode."""

    account: str
    report: str
    estimate: int
    subjects: tuple[str, ...] | None = None
    cost: int | None = None
    priced: bool = False
    mode: str = "standard"

    def cost_estimate(self, prices: Mapping[str, tuple[int, int]]) -> int | None:
        return _cost_estimate(self.estimate, self.cost, self.priced, prices)


def _cost_estimate(
    tokens: int, cost: int | None, priced: bool, prices: Mapping[str, tuple[int, int]]
) -> int | None:
    if not priced:
        return cost
    price = prices.get(PRICED_MODEL)
    return None if price is None else tokens * max(price)


@dataclass(frozen=True)
class Extend:
    """``extend_reservation``: ``tokens`` more, and ``cost`` micros (or ``priced``) more."""

    report: str
    account: str
    tokens: int
    cost: int | None = None
    priced: bool = False

    def cost_estimate(self, prices: Mapping[str, tuple[int, int]]) -> int | None:
        return _cost_estimate(self.tokens, self.cost, self.priced, prices)


@dataclass(frozen=True)
class SetBudget:
    """``set_budget``: create the account's budget of that kind, or change its limit."""

    account: str
    subject: str | None
    unit: str
    window: str
    limit: int
    timezone: str | None = None


@dataclass(frozen=True)
class Persist:
    report: str
    account: str
    step: str
    input_tokens: int
    output_tokens: int
    total_tokens: int | None = None
    model: str | None = None
    record: bool = False  # record_step (its answer carries cost_micros), else persist_step_usage

    @property
    def total(self) -> int:
        if self.total_tokens is None:
            return self.input_tokens + self.output_tokens
        return self.total_tokens


@dataclass(frozen=True)
class Finalize:
    report: str
    account: str


@dataclass(frozen=True)
class Finish:
    report: str
    account: str
    status: str
    error_message: str | None = None


@dataclass(frozen=True)
class Increment:
    account: str
    tokens: int
    is_report: bool = False
    is_chat: bool = False


@dataclass(frozen=True)
class Expire:
    """Move a report's reservation into the past (created_at and expires_at)."""

    report: str


@dataclass(frozen=True)
class Sweep:
    """``cleanup_expired_reservations()`` (batch None), else
    ``CALL sweep_expired_reservations(batch)``."""

    batch: int | None = None


@dataclass(frozen=True)
class OpenPeriod:
    account: str
    limit: int


Op = (
    Reserve
    | Persist
    | Finalize
    | Finish
    | Increment
    | Expire
    | Sweep
    | OpenPeriod
    | Extend
    | SetBudget
)


@dataclass(frozen=True)
class World:
    """What never changes during an example: which accounts exist and who owns each report."""

    accounts: frozenset[str]  # labels of the accounts that exist (with or without a period)
    owners: Mapping[str, str]  # report label -> the account label that reserves it
    prices: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # model -> prices

    def account_of(self, op: Op) -> str | None:
        """The account whose state decides the answer of ``op`` (None: every account)."""
        if isinstance(op, Sweep):
            return None
        if isinstance(op, Increment | OpenPeriod | SetBudget):
            return op.account
        if isinstance(op, Expire):
            return self.owners.get(op.report, "")
        owner = self.owners.get(op.report)
        return owner if owner is not None else op.account


@dataclass
class Call:
    """One call made in a round, and what it answered (None: it raised, see ``error``)."""

    op: Op
    answer: dict[str, Any] | None
    lane: int = 0
    index: int = 0
    error: str | None = None
    at: tuple[datetime, datetime] | None = None  # the database clock around the call's round


# --------------------------------------------------------------------------------------------
# Budget windows
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=65536)
def window_start(window: str, timezone: str, moment: datetime) -> datetime:
    """Where the calendar window (minute, hour, day, week from Monday, month) of ``timezone``
    that holds ``moment`` starts, in UTC: what date_trunc(window, moment, timezone) says."""
    local = moment.astimezone(ZoneInfo(timezone))
    if window == "minute":
        start = local.replace(second=0, microsecond=0)
    elif window == "hour":
        start = local.replace(minute=0, second=0, microsecond=0)
    elif window == "day":
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    elif window == "week":
        monday = local - timedelta(days=local.weekday())
        start = monday.replace(hour=0, minute=0, second=0, microsecond=0)
    elif window == "month":
        start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    else:
        raise ValueError(f"not a calendar window: {window}")
    return start.astimezone(UTC)


def moments(at: tuple[datetime, datetime] | None) -> list[datetime | None]:
    """Moments of ``at`` (lo, hi) that stand for all of it: lo and every whole minute after it
    up to hi. Every calendar window of every time zone starts on a whole minute, so any moment
    of the interval has the windows of one of these (None: the interval is not known)."""
    if at is None:
        return [None]
    lo, hi = at
    found: list[datetime | None] = [lo]
    boundary = lo.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while boundary <= hi:
        found.append(boundary)
        boundary += timedelta(minutes=1)
    return found


def parse_time(value: Any) -> datetime | None:
    """A timestamp of an answer (ISO text, any offset) in UTC; None when it is not one."""
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).astimezone(UTC)
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# State of one account
# --------------------------------------------------------------------------------------------


@dataclass
class PeriodM:
    id: str
    limit: int
    used: int = 0
    reports: int = 0
    active: bool = True

    def key(self) -> tuple[Any, ...]:
        return (self.id, self.active, self.limit, self.used, self.reports)


@dataclass
class BudgetM:
    id: str
    subject: str | None
    unit: str
    window: str
    limit: int
    timezone: str = "UTC"
    changes: int = 1  # rows of budget_changes
    start: datetime | None = None  # a total budget's one window start (its created_at), once known

    def key(self) -> tuple[Any, ...]:
        return (
            self.id,
            self.subject,
            self.unit,
            self.window,
            self.limit,
            self.timezone,
            self.changes,
        )

    def window_at(self, moment: datetime | None) -> datetime | None:
        """The start of the window that holds ``moment`` (None: not known)."""
        if self.window == "total":
            return self.start
        if moment is None:
            return None
        return window_start(self.window, self.timezone, moment)

    def amount(self, tokens: int, cost: int | None) -> int:
        """What tokens and a cost (None: none) count in this budget."""
        return tokens if self.unit == "tokens" else (cost or 0)


Hold = tuple[str, datetime]  # (budget id, window start)


@dataclass
class StepM:
    id: str
    input: int
    output: int
    total: int
    late: bool = False
    billed_period: str | None = None
    cost: int | None = None

    def key(self) -> tuple[Any, ...]:
        return (
            self.id,
            self.input,
            self.output,
            self.total,
            self.late,
            self.billed_period,
            self.cost,
        )


@dataclass
class ReservationM:
    id: str
    reserved: int
    period: str
    status: str = "active"
    expired: bool = False  # moved into the past
    billed: int | None = None
    holds: tuple[Hold, ...] = ()  # in budget id order
    cost: int | None = None  # reserved_cost_micros

    def key(self) -> tuple[Any, ...]:
        return (
            self.id,
            self.reserved,
            self.period,
            self.status,
            self.expired,
            self.billed,
            self.holds,
            self.cost,
        )

    @property
    def holding(self) -> bool:
        """Active and unexpired: it holds its estimate in its period and its windows."""
        return self.status == "active" and not self.expired


@dataclass
class ReportM:
    status: str
    reservation: ReservationM | None
    steps: dict[str, StepM] = field(default_factory=dict)
    token_total: int | None = None
    mode: str = "standard"
    cost_total: int | None = None  # token_usage.costMicros
    seen: frozenset[str] = frozenset()  # its steps recorded before the round (not state)

    def key(self) -> tuple[Any, ...]:
        return (
            self.status,
            self.mode,
            self.token_total,
            self.cost_total,
            self.reservation.key() if self.reservation else None,
            tuple(sorted((name, s.key()) for name, s in self.steps.items())),
        )


def _refusal(code: str, **extra: Any) -> dict[str, Any]:
    return {"success": False, "error": code, **extra}


def _matches(answer: dict[str, Any] | None, expected: dict[str, Any]) -> bool:
    """Every expected key is in the answer with that value (the answer may carry more)."""
    if answer is None:
        return False
    return all(key in answer and answer[key] == value for key, value in expected.items())


def _entries_match(listed: Any, expected: Sequence[Mapping[str, Any]]) -> bool:
    """An answer's "budgets" list is exactly these entries, in this order (window_start as
    timestamps)."""
    if not isinstance(listed, list) or len(listed) != len(expected):
        return False
    for got, want in zip(listed, expected, strict=True):
        if not isinstance(got, dict):
            return False
        for key, value in want.items():
            if key == "window_start":
                if parse_time(got.get(key)) != value:
                    return False
            elif key not in got or got[key] != value:
                return False
    return True


BudgetKind = tuple[str | None, str, str]  # (subject, unit, window)


@dataclass
class AccountModel:
    """The contract, sequentially, for one account."""

    label: str
    exists: bool
    periods: list[PeriodM] = field(default_factory=list)
    reports: dict[str, ReportM] = field(default_factory=dict)
    budgets: dict[BudgetKind, BudgetM] = field(default_factory=dict)
    windows: dict[Hold, int] = field(default_factory=dict)  # budget window -> used

    # -- plumbing ---------------------------------------------------------------------------

    def clone(self) -> AccountModel:
        return AccountModel(
            self.label,
            self.exists,
            [PeriodM(p.id, p.limit, p.used, p.reports, p.active) for p in self.periods],
            {
                label: ReportM(
                    r.status,
                    ReservationM(
                        r.reservation.id,
                        r.reservation.reserved,
                        r.reservation.period,
                        r.reservation.status,
                        r.reservation.expired,
                        r.reservation.billed,
                        r.reservation.holds,
                        r.reservation.cost,
                    )
                    if r.reservation
                    else None,
                    {
                        n: StepM(s.id, s.input, s.output, s.total, s.late, s.billed_period, s.cost)
                        for n, s in r.steps.items()
                    },
                    r.token_total,
                    r.mode,
                    r.cost_total,
                    r.seen,
                )
                for label, r in self.reports.items()
            },
            {
                kind: BudgetM(
                    b.id, b.subject, b.unit, b.window, b.limit, b.timezone, b.changes, b.start
                )
                for kind, b in self.budgets.items()
            },
            dict(self.windows),
        )

    def key(self) -> tuple[Any, ...]:
        return (
            self.exists,
            tuple(sorted(p.key() for p in self.periods)),
            tuple(sorted((label, r.key()) for label, r in self.reports.items())),
            tuple(sorted(b.key() for b in self.budgets.values())),
            tuple(sorted(self.windows.items())),
        )

    def adopt_starts(self, db: AccountModel) -> None:
        """Total budgets' window starts that no answer showed yet, from the database."""
        for kind, budget in self.budgets.items():
            if budget.start is None and kind in db.budgets:
                budget.start = db.budgets[kind].start

    def active_period(self) -> PeriodM | None:
        for p in self.periods:
            if p.active:
                return p
        return None

    def period(self, period_id: str) -> PeriodM:
        for p in self.periods:
            if p.id == period_id:
                return p
        raise KeyError(period_id)

    def budget(self, budget_id: str) -> BudgetM:
        for b in self.budgets.values():
            if b.id == budget_id:
                return b
        raise KeyError(budget_id)

    def applicable(self, subjects: Sequence[str] | None) -> list[BudgetM]:
        """The budgets a reservation with these subjects must fit, in id order."""
        chosen = set(subjects or ())
        return sorted(
            (b for b in self.budgets.values() if b.subject is None or b.subject in chosen),
            key=lambda b: b.id,
        )

    def held(self) -> int:
        """What the account's active, unexpired reservations hold."""
        return sum(
            r.reservation.reserved
            for r in self.reports.values()
            if r.reservation and r.reservation.holding
        )

    def held_in(self, budget: BudgetM, start: datetime | None) -> int:
        """What the account's active, unexpired reservations hold in one window of a budget."""
        if start is None:
            return 0
        return sum(
            budget.amount(r.reservation.reserved, r.reservation.cost)
            for r in self.reports.values()
            if r.reservation and r.reservation.holding and (budget.id, start) in r.reservation.holds
        )

    def available_in(self, budget: BudgetM, start: datetime | None) -> int:
        """limit - used - held in one window (None: a window nothing was granted in yet)."""
        used = self.windows.get((budget.id, start), 0) if start is not None else 0
        return budget.limit - used - self.held_in(budget, start)

    def due(self) -> frozenset[str]:
        """Reports whose reservation is active and past its expiry (what the sweep bills)."""
        return frozenset(
            label
            for label, r in self.reports.items()
            if r.reservation and r.reservation.status == "active" and r.reservation.expired
        )

    def _ids(self) -> set[str]:
        ids = {p.id for p in self.periods} | {b.id for b in self.budgets.values()}
        for r in self.reports.values():
            if r.reservation:
                ids.add(r.reservation.id)
            ids.update(s.id for s in r.steps.values())
        return ids

    # -- billing ----------------------------------------------------------------------------

    def bill_windows(self, res: ReservationM, tokens: int, cost: int) -> None:
        """Billing adds tokens (tokens budgets) or cost (cost budgets) to the held windows."""
        for budget_id, start in res.holds:
            self.windows[(budget_id, start)] += self.budget(budget_id).amount(tokens, cost)

    def settle(self, report: ReportM, final_status: str) -> tuple[dict[str, Any], int, int]:
        """finalize_reservation: the answer, the tokens and the steps it billed now."""
        res = report.reservation
        assert res is not None
        period = self.period(res.period)
        if res.status != "active":
            return (
                {
                    "success": True,
                    "already_finalized": True,
                    "reservation_status": res.status,
                    "billed_tokens": res.billed,
                    "steps": sum(1 for s in report.steps.values() if not s.late),
                    "tokens_used": period.used,
                    "tokens_limit": period.limit,
                },
                0,
                0,
            )
        unbilled = [s for s in report.steps.values() if s.billed_period is None]
        tokens = sum(s.total for s in unbilled)
        cost = sum(s.cost or 0 for s in unbilled)
        for s in unbilled:
            s.billed_period = period.id
        period.used += tokens
        if report.status == "complete":
            period.reports += 1
        res.status = final_status
        res.billed = tokens
        report.token_total = tokens
        report.cost_total = cost
        self.bill_windows(res, tokens, cost)
        return (
            {
                "success": True,
                "already_finalized": False,
                "reservation_status": final_status,
                "billed_tokens": tokens,
                "steps": len(unbilled),
                "tokens_used": period.used,
                "tokens_limit": period.limit,
            },
            tokens,
            len(unbilled),
        )

    # -- the calls --------------------------------------------------------------------------
    # Each apply_* checks the answer against the contract at this point of a serial order
    # and, when it fits, applies the call's effect. False: this answer is impossible here.

    def apply(self, world: World, call: Call) -> bool:
        op, answer = call.op, call.answer
        if answer is None:
            return False
        if isinstance(op, Reserve):
            return self._reserve(world, op, answer, call.at)
        if isinstance(op, Persist):
            return self._persist(world, op, answer)
        if isinstance(op, Finalize):
            return self._finalize(world, op, answer)
        if isinstance(op, Finish):
            return self._finish(world, op, answer)
        if isinstance(op, Increment):
            return self._increment(world, op, answer)
        if isinstance(op, Expire):
            return self._expire(op, answer)
        if isinstance(op, OpenPeriod):
            return self._open_period(op, answer)
        if isinstance(op, Extend):
            return self._extend(world, op, answer)
        if isinstance(op, SetBudget):
            return self._set_budget(world, op, answer)
        raise TypeError(f"apply() does not take {op!r}")

    def _reserve(
        self,
        world: World,
        op: Reserve,
        answer: dict[str, Any],
        at: tuple[datetime, datetime] | None,
    ) -> bool:
        if op.account not in world.accounts:
            return _matches(answer, _refusal("account_not_found"))
        report = self.reports.get(op.report)
        if report is not None and world.owners.get(op.report) != op.account:
            return _matches(answer, _refusal("report_account_mismatch"))
        if op.account != self.label:
            # The report does not exist yet: a reservation would create it for another
            # account, which this projection cannot see. The harness never sends this.
            return False
        period = self.active_period()
        if period is None:
            return _matches(answer, _refusal("no_active_period"))
        available = period.limit - period.used - self.held()
        if report is not None:
            res = report.reservation
            if res is not None and res.holding:
                # A retry: what it holds, in every window it was granted in.
                holds = []
                for budget_id, start in res.holds:
                    budget = self.budget(budget_id)
                    holds.append(
                        {
                            "budget_id": budget_id,
                            "subject": budget.subject,
                            "window": budget.window,
                            "unit": budget.unit,
                            "window_start": start,
                            "held": budget.amount(res.reserved, res.cost),
                        }
                    )
                return _matches(
                    answer,
                    {
                        "success": True,
                        "existing": True,
                        "reservation_id": res.id,
                        "reserved_tokens": res.reserved,
                        "available_tokens": max(available, 0),
                        "period_id": res.period,
                    },
                ) and _entries_match(answer.get("budgets"), holds)
            return _matches(answer, _refusal("report_finalized"))
        if op.estimate > available:
            return _matches(
                answer,
                _refusal(
                    "insufficient_tokens",
                    available_tokens=max(available, 0),
                    requested_tokens=op.estimate,
                    period_id=period.id,
                ),
            )
        applicable = self.applicable(op.subjects)
        cost = op.cost_estimate(world.prices)
        if answer.get("success") is not True:
            return self._refused_by_budget(applicable, op.estimate, cost, answer, at)
        starts = self._granted_windows(applicable, answer.get("budgets"), at)
        if starts is None:
            return False
        entries = []
        for budget, start in zip(applicable, starts, strict=True):
            left = self.available_in(budget, start)
            wanted = budget.amount(op.estimate, cost)
            if wanted > left or left <= 0:
                return False
            entries.append(
                {
                    "budget_id": budget.id,
                    "subject": budget.subject,
                    "window": budget.window,
                    "unit": budget.unit,
                    "window_start": start,
                    "held": wanted,
                    "available": left - wanted,
                }
            )
        if not _matches(
            answer,
            {
                "success": True,
                "existing": False,
                "reserved_tokens": op.estimate,
                "available_tokens": available - op.estimate,
                "period_id": period.id,
            },
        ) or not _entries_match(answer.get("budgets"), entries):
            return False
        reservation_id = answer.get("reservation_id")
        if not isinstance(reservation_id, str) or reservation_id in self._ids():
            return False
        holds = tuple((b.id, start) for b, start in zip(applicable, starts, strict=True))
        for budget, start in zip(applicable, starts, strict=True):
            if budget.window == "total" and budget.start is None:
                budget.start = start
            self.windows.setdefault((budget.id, start), 0)
        mode = op.mode if op.subjects is not None else "standard"
        self.reports[op.report] = ReportM(
            "processing",
            ReservationM(reservation_id, op.estimate, period.id, holds=holds, cost=cost),
            mode=mode,
        )
        return True

    @staticmethod
    def _granted_windows(
        applicable: Sequence[BudgetM], listed: Any, at: tuple[datetime, datetime] | None
    ) -> list[datetime] | None:
        """The windows a grant names for its budgets, when they are the windows of one moment
        of the call's interval (None: they are not, or the list does not name them all)."""
        if not isinstance(listed, list) or len(listed) != len(applicable):
            return None
        starts = [
            parse_time(e.get("window_start")) if isinstance(e, dict) else None for e in listed
        ]
        if any(start is None for start in starts):
            return None
        known = [start for start in starts if start is not None]
        for moment in moments(at):
            if all(
                b.window_at(moment) in (None, start)
                for b, start in zip(applicable, known, strict=True)
            ):
                return known
        return None

    def _refused_by_budget(
        self,
        applicable: Sequence[BudgetM],
        tokens: int,
        cost: int | None,
        answer: dict[str, Any],
        at: tuple[datetime, datetime] | None,
    ) -> bool:
        """insufficient_budget: at one moment of the call's interval, the budget it names is
        the first (in id order) whose window cannot hold the estimate."""
        if answer.get("error") != "insufficient_budget":
            return False
        named, named_start = answer.get("budget_id"), parse_time(answer.get("window_start"))
        for moment in moments(at):
            for budget in applicable:
                start = budget.window_at(moment)
                if budget.id == named and start is None:
                    start = named_start  # a total budget no answer showed yet
                left = self.available_in(budget, start)
                wanted = budget.amount(tokens, cost)
                if wanted <= left and left > 0:
                    continue
                if (
                    budget.id == named
                    and start == named_start
                    and _matches(
                        answer,
                        _refusal(
                            "insufficient_budget",
                            subject=budget.subject,
                            window=budget.window,
                            unit=budget.unit,
                            available=max(left, 0),
                            requested=wanted,
                        ),
                    )
                ):
                    if budget.window == "total" and budget.start is None:
                        budget.start = start
                    return True
                break
        return False

    def _refuse_foreign(self, world: World, report_label: str, account: str) -> dict[str, Any]:
        """reservation_refusal(): the report has no reservation for this account."""
        report = self.reports.get(report_label)
        if report is not None and world.owners.get(report_label) != account:
            return _refusal("report_account_mismatch")
        return _refusal("reservation_not_found")

    def _overrun(self, report: ReportM, answer: dict[str, Any], step: str) -> bool:
        """A successful step answer carries over_reservation exactly when the report's
        recorded tokens (every step, late ones included) pass what it reserved (see
        STRICT_OVERRUN for which recorded tokens)."""
        res = report.reservation
        assert res is not None
        upper = sum(s.total for s in report.steps.values())
        lower = upper
        if not STRICT_OVERRUN:
            lower = sum(report.steps[name].total for name in report.seen | {step})
        if "over_reservation" not in answer:
            return lower <= res.reserved
        recorded = answer.get("recorded_tokens")
        return (
            isinstance(recorded, int)
            and lower <= recorded <= upper
            and recorded > res.reserved
            and _matches(
                answer,
                {
                    "over_reservation": True,
                    "over_by": recorded - res.reserved,
                    "reserved_tokens": res.reserved,
                },
            )
        )

    def _persist(self, world: World, op: Persist, answer: dict[str, Any]) -> bool:
        if not op.record and "cost_micros" in answer:
            return False  # persist_step_usage answers as in Part 1
        report = self.reports.get(op.report)
        if report is None or report.reservation is None:
            return _matches(answer, _refusal("reservation_not_found"))
        if world.owners.get(op.report) != op.account:
            return _matches(answer, _refusal("report_account_mismatch"))
        res = report.reservation
        outcome = report.status if report.status in FINAL_STATUSES else None
        if ("report_status" in answer) != (outcome is not None) or (
            outcome is not None and answer["report_status"] != outcome
        ):
            return False
        step = report.steps.get(op.step)
        if step is not None:
            if (step.input, step.output, step.total) == (
                op.input_tokens,
                op.output_tokens,
                op.total,
            ):
                return (
                    _matches(
                        answer,
                        {
                            "success": True,
                            "step_id": step.id,
                            "total_tokens": step.total,
                            "duplicate": True,
                            "late": step.late,
                        },
                    )
                    and (not op.record or _matches(answer, {"cost_micros": step.cost}))
                    and self._overrun(report, answer, op.step)
                )
            return (
                _matches(answer, _refusal("step_conflict", step_id=step.id))
                and "over_reservation" not in answer
            )
        late = res.status != "active"
        price = world.prices.get(op.model) if op.model is not None else None
        cost = None if price is None else op.input_tokens * price[0] + op.output_tokens * price[1]
        expected: dict[str, Any] = {
            "success": True,
            "total_tokens": op.total,
            "duplicate": False,
            "late": late,
        }
        if op.record:
            expected["cost_micros"] = cost
        if not _matches(answer, expected):
            return False
        step_id = answer.get("step_id")
        if not isinstance(step_id, str) or step_id in self._ids():
            return False
        new = StepM(step_id, op.input_tokens, op.output_tokens, op.total, late, cost=cost)
        if late:
            new.billed_period = res.period
            self.period(res.period).used += op.total
            report.token_total = (report.token_total or 0) + op.total
            report.cost_total = (report.cost_total or 0) + (cost or 0)
            self.bill_windows(res, op.total, cost or 0)
        report.steps[op.step] = new
        return self._overrun(report, answer, op.step)

    def _finalize(self, world: World, op: Finalize, answer: dict[str, Any]) -> bool:
        report = self.reports.get(op.report)
        if report is None or report.reservation is None or world.owners[op.report] != op.account:
            return _matches(answer, self._refuse_foreign(world, op.report, op.account))
        expected, _, _ = self.settle(report, "completed")
        return _matches(answer, expected)

    def _finish(self, world: World, op: Finish, answer: dict[str, Any]) -> bool:
        report = self.reports.get(op.report)
        if report is None or report.reservation is None or world.owners[op.report] != op.account:
            return _matches(answer, self._refuse_foreign(world, op.report, op.account))
        res = report.reservation
        if report.status in FINAL_STATUSES:
            if report.status != op.status:
                return _matches(answer, _refusal("report_finalized", report_status=report.status))
            expected, _, _ = self.settle(report, "completed")
            return _matches(answer, {**expected, "report_status": op.status})
        count_now = op.status == "complete" and res.status != "active"
        report.status = op.status
        expected, _, _ = self.settle(report, "completed")
        if count_now:
            self.period(res.period).reports += 1
        return _matches(answer, {**expected, "report_status": op.status})

    def _increment(self, world: World, op: Increment, answer: dict[str, Any]) -> bool:
        if op.account not in world.accounts:
            return _matches(answer, _refusal("account_not_found"))
        period = self.active_period()
        if period is None:
            return _matches(answer, _refusal("no_active_period"))
        period.used += op.tokens
        period.reports += 1 if op.is_report else 0
        return _matches(
            answer,
            {
                "success": True,
                "period_id": period.id,
                "tokens_used": period.used,
                "tokens_limit": period.limit,
                "reports_count": period.reports,
            },
        )

    def _expire(self, op: Expire, answer: dict[str, Any]) -> bool:
        report = self.reports.get(op.report)
        res = report.reservation if report else None
        if not _matches(answer, {"updated": 1 if res else 0}):
            return False
        if res is not None:
            res.expired = True
        return True

    def _open_period(self, op: OpenPeriod, answer: dict[str, Any]) -> bool:
        old = self.active_period()
        if not _matches(
            answer,
            {
                "success": True,
                "tokens_limit": op.limit,
                "previous_period_id": old.id if old else None,
            },
        ):
            return False
        period_id = answer.get("period_id")
        if not isinstance(period_id, str) or period_id in self._ids():
            return False
        if old is not None:
            old.active = False
        self.periods.append(PeriodM(period_id, op.limit))
        self.exists = True
        return True

    def _extend(self, world: World, op: Extend, answer: dict[str, Any]) -> bool:
        report = self.reports.get(op.report)
        if report is None or report.reservation is None or world.owners[op.report] != op.account:
            return _matches(answer, self._refuse_foreign(world, op.report, op.account))
        res = report.reservation
        if not res.holding:
            return _matches(answer, _refusal("report_finalized"))
        # The account's active period, as reserve checks it (the reservation may be of one a
        # period switch closed since), against every active unexpired reservation (its own too).
        period = self.active_period()
        if period is None:
            return _matches(answer, _refusal("no_active_period"))
        available = period.limit - period.used - self.held()
        if op.tokens > available:
            return _matches(
                answer,
                _refusal(
                    "insufficient_tokens",
                    available_tokens=max(available, 0),
                    requested_tokens=op.tokens,
                    period_id=period.id,
                ),
            )
        cost = op.cost_estimate(world.prices)
        entries = []
        for budget_id, start in res.holds:
            budget = self.budget(budget_id)
            left = self.available_in(budget, start)
            wanted = budget.amount(op.tokens, cost)
            if wanted > left or left <= 0:
                return parse_time(answer.get("window_start")) == start and _matches(
                    answer,
                    _refusal(
                        "insufficient_budget",
                        budget_id=budget.id,
                        subject=budget.subject,
                        window=budget.window,
                        unit=budget.unit,
                        available=max(left, 0),
                        requested=wanted,
                    ),
                )
            entries.append(
                {
                    "budget_id": budget.id,
                    "subject": budget.subject,
                    "window": budget.window,
                    "unit": budget.unit,
                    "window_start": start,
                    "held": budget.amount(res.reserved, res.cost) + wanted,
                    "available": left - wanted,
                }
            )
        res.reserved += op.tokens
        if cost is not None:
            res.cost = (res.cost or 0) + cost
        return _matches(
            answer,
            {
                "success": True,
                "reservation_id": res.id,
                "reserved_tokens": res.reserved,
                "reserved_cost_micros": res.cost,
                "available_tokens": available - op.tokens,
                "period_id": res.period,
            },
        ) and _entries_match(answer.get("budgets"), entries)

    def _set_budget(self, world: World, op: SetBudget, answer: dict[str, Any]) -> bool:
        if op.account not in world.accounts:
            return _matches(answer, _refusal("account_not_found"))
        kind = (op.subject, op.unit, op.window)
        budget = self.budgets.get(kind)
        shape = {"success": True, "subject": op.subject, "unit": op.unit, "window": op.window}
        if budget is None:
            timezone = op.timezone or "UTC"
            if not _matches(
                answer,
                {
                    **shape,
                    "created": True,
                    "changed": True,
                    "limit": op.limit,
                    "timezone": timezone,
                    "thresholds": [80, 100],
                },
            ):
                return False
            budget_id = answer.get("budget_id")
            if not isinstance(budget_id, str) or budget_id in self._ids():
                return False
            self.budgets[kind] = BudgetM(
                budget_id, op.subject, op.unit, op.window, op.limit, timezone
            )
            return True
        timezone = op.timezone or budget.timezone
        changed = (op.limit, timezone) != (budget.limit, budget.timezone)
        if changed:
            budget.limit, budget.timezone = op.limit, timezone
            budget.changes += 1
        return _matches(
            answer,
            {
                **shape,
                "budget_id": budget.id,
                "created": False,
                "changed": changed,
                "limit": budget.limit,
                "timezone": budget.timezone,
            },
        )

    def sweep_one(self, report_label: str) -> tuple[int, int]:
        """The sweep bills one due reservation: (tokens, steps) billed."""
        _, tokens, steps = self.settle(self.reports[report_label], "expired")
        return tokens, steps


# --------------------------------------------------------------------------------------------
# The search for a serial order
# --------------------------------------------------------------------------------------------

Contrib = tuple[tuple[int, int, int, int], ...]  # (call index, reservations, tokens, steps)


def _add(contrib: Contrib, index: int, tokens: int, steps: int) -> Contrib:
    table = {c[0]: c for c in contrib}
    _, n, t, s = table.get(index, (index, 0, 0, 0))
    table[index] = (index, n + 1, t + tokens, s + steps)
    return tuple(sorted(table.values()))


class SearchTooLarge(Exception):
    """The round has too many calls on one account for the search budget."""


@dataclass
class Leaf:
    state: AccountModel
    contrib: Contrib


def explore(
    world: World, start: AccountModel, lanes: Sequence[Sequence[Call]], budget: int = SEARCH_BUDGET
) -> list[Leaf]:
    """Every (end state, sweep contributions) reachable by a serial order that explains the
    answers of ``lanes`` (each lane in program order), from ``start``."""
    leaves: dict[tuple[Any, ...], Leaf] = {}
    seen: set[tuple[Any, ...]] = set()
    Progress = tuple[frozenset[str] | None, ...]
    stack: list[tuple[tuple[int, ...], Progress, AccountModel, Contrib]] = [
        (tuple(0 for _ in lanes), tuple(None for _ in lanes), start, ())
    ]
    while stack:
        pos, prog, state, contrib = stack.pop()
        node = (pos, prog, state.key(), contrib)
        if node in seen:
            continue
        seen.add(node)
        if len(seen) > budget:
            raise SearchTooLarge(f"account {start.label}: more than {budget} search nodes")
        if all(p == len(lane) for p, lane in zip(pos, lanes, strict=True)):
            leaves.setdefault((node[2], contrib), Leaf(state, contrib))
            continue
        for i, lane in enumerate(lanes):
            if pos[i] == len(lane):
                continue
            call = lane[pos[i]]
            advanced = (*pos[:i], pos[i] + 1, *pos[i + 1 :])
            if not isinstance(call.op, Sweep):
                nxt = state.clone()
                if nxt.apply(world, call):
                    stack.append((advanced, prog, nxt, contrib))
                continue
            chosen = prog[i]
            # SWEEP-ONE: a reservation of D (or, before the batched sweep's last batch,
            # any due one).
            candidates: Iterable[str]
            if chosen is None:
                candidates = state.due() if call.op.batch is not None else ()
            else:
                candidates = chosen & state.due()
            for label in sorted(candidates):
                nxt = state.clone()
                tokens, steps = nxt.sweep_one(label)
                stack.append((pos, prog, nxt, _add(contrib, call.index, tokens, steps)))
            if chosen is None:
                # START: the snapshot that fixes D.
                started = (*prog[:i], state.due(), *prog[i + 1 :])
                stack.append((pos, started, state, contrib))
            elif not (chosen & state.due()):
                # FINISH: every reservation of D was billed, by this sweep or another call.
                done = (*prog[:i], None, *prog[i + 1 :])
                stack.append((advanced, done, state, contrib))
    return list(leaves.values())


def _project(world: World, label: str, lanes: Sequence[Sequence[Call]]) -> list[list[Call]]:
    projected = []
    for lane in lanes:
        mine = [c for c in lane if world.account_of(c.op) in (None, label)]
        if mine:
            projected.append(mine)
    return projected


def _sweep_totals(contribs: Iterable[Contrib]) -> dict[int, tuple[int, int, int]]:
    totals: dict[int, tuple[int, int, int]] = {}
    for contrib in contribs:
        for index, n, t, s in contrib:
            a, b, c = totals.get(index, (0, 0, 0))
            totals[index] = (a + n, b + t, c + s)
    return totals


def _sweeps_agree(sweeps: Sequence[Call], totals: Mapping[int, tuple[int, int, int]]) -> bool:
    for call in sweeps:
        n, tokens, steps = totals.get(call.index, (0, 0, 0))
        answer = call.answer or {}
        if answer.get("expired") != n or answer.get("billed_tokens") != tokens:
            return False
        if "steps" in answer and answer["steps"] != steps:
            return False
    return True


def describe_round(lanes: Sequence[Sequence[Call]]) -> str:
    lines = []
    for lane in lanes:
        for call in lane:
            shown = call.answer if call.error is None else f"raised {call.error}"
            lines.append(f"  lane {call.lane} #{call.index}: {call.op!r} -> {shown}")
    return "\n".join(lines)


def _diff(model: AccountModel, db: AccountModel) -> str:
    out = []
    m, d = model.key(), db.key()
    if m[0] != d[0]:
        out.append(f"exists: model {m[0]} db {d[0]}")
    if m[1] != d[1]:
        out.append(f"periods: model {m[1]} db {d[1]}")
    mr, dr = dict(m[2]), dict(d[2])
    for label in sorted(set(mr) | set(dr)):
        if mr.get(label) != dr.get(label):
            out.append(f"report {label}: model {mr.get(label)} db {dr.get(label)}")
    if m[3] != d[3]:
        out.append(f"budgets: model {m[3]} db {d[3]}")
    mw, dw = dict(m[4]), dict(d[4])
    for hold in sorted(set(mw) | set(dw)):
        if mw.get(hold) != dw.get(hold):
            out.append(f"budget window {hold}: used model {mw.get(hold)} db {dw.get(hold)}")
    return "; ".join(out)


def check_round(
    world: World,
    models: Mapping[str, AccountModel],
    lanes: Sequence[Sequence[Call]],
    db: Mapping[str, AccountModel],
) -> tuple[dict[str, AccountModel], list[str]]:
    """Explain one concurrent round: the new per-account models, and what could not be
    explained (empty when the answers and the database agree with a serial order)."""
    violations: list[str] = []
    for lane in lanes:
        for call in lane:
            if call.error is not None:
                violations.append(f"#{call.index} {call.op!r} raised {call.error}")
    if violations:
        return dict(db), [*violations, describe_round(lanes)]

    candidates: dict[str, list[Leaf]] = {}
    for label, start in models.items():
        for report in start.reports.values():
            report.seen = frozenset(report.steps)
        mine = _project(world, label, lanes)
        try:
            leaves = explore(world, start, mine)
        except SearchTooLarge as exc:
            violations.append(str(exc))
            continue
        target = db[label].key()
        fitting = [leaf for leaf in leaves if leaf.state.key() == target]
        if not leaves:
            violations.append(
                f"account {label}: no serial order of its calls explains their answers"
            )
        elif not fitting:
            violations.append(
                f"account {label}: the answers are explained, but not the database: "
                + _diff(leaves[0].state, db[label])
            )
        candidates[label] = fitting
    if violations:
        return dict(db), [*violations, describe_round(lanes)]

    sweeps = [c for lane in lanes for c in lane if isinstance(c.op, Sweep)]
    labels = sorted(candidates)
    for choice in _choices([candidates[label] for label in labels]):
        if _sweeps_agree(sweeps, _sweep_totals(leaf.contrib for leaf in choice)):
            for label, leaf in zip(labels, choice, strict=True):
                leaf.state.adopt_starts(db[label])
            return {label: leaf.state for label, leaf in zip(labels, choice, strict=True)}, []
    return dict(db), [
        "the sweeps' answers do not add up to what the accounts' serial orders billed",
        describe_round(lanes),
    ]


def _choices(options: Sequence[Sequence[Leaf]]) -> Iterator[tuple[Leaf, ...]]:
    yield from product(*options)
