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

No answer is predicted that the model cannot know: ids (reservation, step, period) are
adopted from the first answer that carries them and compared from then on.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any

FINAL_STATUSES = frozenset({"complete", "failed", "cancelled"})
SEARCH_BUDGET = 400_000  # DFS nodes per account per round; rounds are kept far below it

# --------------------------------------------------------------------------------------------
# Operations (labels, not uuids: the harness maps labels to ids)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reserve:
    account: str
    report: str
    estimate: int


@dataclass(frozen=True)
class Persist:
    report: str
    account: str
    step: str
    input_tokens: int
    output_tokens: int
    total_tokens: int | None = None
    model: str | None = None

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


Op = Reserve | Persist | Finalize | Finish | Increment | Expire | Sweep | OpenPeriod


@dataclass(frozen=True)
class World:
    """What never changes during an example: which accounts exist and who owns each report."""

    accounts: frozenset[str]  # labels of the accounts that exist (with or without a period)
    owners: Mapping[str, str]  # report label -> the account label that reserves it

    def account_of(self, op: Op) -> str | None:
        """The account whose state decides the answer of ``op`` (None: every account)."""
        if isinstance(op, Sweep):
            return None
        if isinstance(op, Increment | OpenPeriod):
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
class StepM:
    id: str
    input: int
    output: int
    total: int
    late: bool = False
    billed_period: str | None = None

    def key(self) -> tuple[Any, ...]:
        return (self.id, self.input, self.output, self.total, self.late, self.billed_period)


@dataclass
class ReservationM:
    id: str
    reserved: int
    period: str
    status: str = "active"
    expired: bool = False  # moved into the past
    billed: int | None = None

    def key(self) -> tuple[Any, ...]:
        return (self.id, self.reserved, self.period, self.status, self.expired, self.billed)


@dataclass
class ReportM:
    status: str
    reservation: ReservationM | None
    steps: dict[str, StepM] = field(default_factory=dict)
    token_total: int | None = None

    def key(self) -> tuple[Any, ...]:
        return (
            self.status,
            self.token_total,
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


@dataclass
class AccountModel:
    """The contract, sequentially, for one account."""

    label: str
    exists: bool
    periods: list[PeriodM] = field(default_factory=list)
    reports: dict[str, ReportM] = field(default_factory=dict)

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
                    )
                    if r.reservation
                    else None,
                    {
                        n: StepM(s.id, s.input, s.output, s.total, s.late, s.billed_period)
                        for n, s in r.steps.items()
                    },
                    r.token_total,
                )
                for label, r in self.reports.items()
            },
        )

    def key(self) -> tuple[Any, ...]:
        return (
            self.exists,
            tuple(sorted(p.key() for p in self.periods)),
            tuple(sorted((label, r.key()) for label, r in self.reports.items())),
        )

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

    def held(self) -> int:
        """What the account's active, unexpired reservations hold."""
        return sum(
            r.reservation.reserved
            for r in self.reports.values()
            if r.reservation and r.reservation.status == "active" and not r.reservation.expired
        )

    def due(self) -> frozenset[str]:
        """Reports whose reservation is active and past its expiry (what the sweep bills)."""
        return frozenset(
            label
            for label, r in self.reports.items()
            if r.reservation and r.reservation.status == "active" and r.reservation.expired
        )

    def _ids(self) -> set[str]:
        ids = {p.id for p in self.periods}
        for r in self.reports.values():
            if r.reservation:
                ids.add(r.reservation.id)
            ids.update(s.id for s in r.steps.values())
        return ids

    # -- billing ----------------------------------------------------------------------------

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
        for s in unbilled:
            s.billed_period = period.id
        period.used += tokens
        if report.status == "complete":
            period.reports += 1
        res.status = final_status
        res.billed = tokens
        report.token_total = tokens
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
            return self._reserve(world, op, answer)
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
        raise TypeError(f"apply() does not take {op!r}")

    def _reserve(self, world: World, op: Reserve, answer: dict[str, Any]) -> bool:
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
            if res is not None and res.status == "active" and not res.expired:
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
                )
            return _matches(answer, _refusal("report_finalized"))
        if op.estimate > available:
            return _matches(
                answer,
                _refusal(
                    "insufficient_tokens",
                    available_tokens=max(available, 0),
                    requested_tokens=op.estimate,
                ),
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
        ):
            return False
        reservation_id = answer.get("reservation_id")
        if not isinstance(reservation_id, str) or reservation_id in self._ids():
            return False
        self.reports[op.report] = ReportM(
            "processing", ReservationM(reservation_id, op.estimate, period.id)
        )
        return True

    def _refuse_foreign(self, world: World, report_label: str, account: str) -> dict[str, Any]:
        """reservation_refusal(): the report has no reservation for this account."""
        report = self.reports.get(report_label)
        if report is not None and world.owners.get(report_label) != account:
            return _refusal("report_account_mismatch")
        return _refusal("reservation_not_found")

    def _persist(self, world: World, op: Persist, answer: dict[str, Any]) -> bool:
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
                return _matches(
                    answer,
                    {
                        "success": True,
                        "step_id": step.id,
                        "total_tokens": step.total,
                        "duplicate": True,
                        "late": step.late,
                    },
                )
            return _matches(answer, _refusal("step_conflict", step_id=step.id))
        late = res.status != "active"
        if not _matches(
            answer,
            {"success": True, "total_tokens": op.total, "duplicate": False, "late": late},
        ):
            return False
        step_id = answer.get("step_id")
        if not isinstance(step_id, str) or step_id in self._ids():
            return False
        new = StepM(step_id, op.input_tokens, op.output_tokens, op.total, late)
        if late:
            new.billed_period = res.period
            self.period(res.period).used += op.total
            report.token_total = (report.token_total or 0) + op.total
        report.steps[op.step] = new
        return True

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
            return {label: leaf.state for label, leaf in zip(labels, choice, strict=True)}, []
    return dict(db), [
        "the sweeps' answers do not add up to what the accounts' serial orders billed",
        describe_round(lanes),
    ]


def _choices(options: Sequence[Sequence[Leaf]]) -> Iterator[tuple[Leaf, ...]]:
    yield from product(*options)
