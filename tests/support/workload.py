"""Runs model operations against a real database, concurrently, and checks every round.

``Harness`` owns a few asyncpg connections to one database (one per lane), the label-to-id
mapping, the oracle's per-account models (tests/support/model.py) and the grant answers. ``round()``
runs the lanes of one round at once (``asyncio.gather``, one connection per lane, each lane
in order), reads the database back, asks the oracle to explain the answers and the state,
and checks the invariants (tests/support/invariants.py). ``settle()`` moves every active
reservation into the past and runs the sweep, after which invariants 2 and 4 hold in full.

With budgets (``Harness.create(..., budgets=[SetBudget(...), ...])``), the harness also
installs PRICED_MODEL's price, creates the budgets in a first round the oracle checks, and
gives every call the database clock's interval around its round (the oracle's windows).
Moving a reservation that holds budget windows into the past takes the locks a reservation
check reads it under (the account's periods, then the budgets it holds, as a reservation of
the same account would): expiry is a moment in time, so no reservation check may see it
half-way (the period's sum before it, a budget's sum after it).

``fresh_database()`` clones the tokentrack template database for one example (about 40 ms
on the test server) and drops it afterwards. The hypothesis strategies for workloads are at
the end of this module.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from hypothesis import strategies as st

from invariants import check_invariants, install_grant_probe
from model import (
    PRICED_MODEL,
    PRICES,
    AccountModel,
    BudgetM,
    Call,
    Expire,
    Extend,
    Finalize,
    Finish,
    Increment,
    Op,
    OpenPeriod,
    PeriodM,
    Persist,
    ReportM,
    ReservationM,
    Reserve,
    SetBudget,
    StepM,
    Sweep,
    World,
    check_round,
    parse_time,
)
from sqlkit import call
from tokentrack_client.testing import PostgresServer

NO_PERIOD = "nop"  # an account that exists without an active period
GHOST = "ghost"  # an account id that does not exist
SWEEP_NOTICE = re.compile(r"(\d+) reservations expired, (\d+) tokens billed")


DatabaseFactory = Callable[[], AbstractAsyncContextManager[str]]


def database_factory(server: PostgresServer, template: str) -> DatabaseFactory:
    """``async with factory() as dsn``: a fresh database cloned from ``template`` on
    ``server``, dropped on exit."""

    def factory() -> AbstractAsyncContextManager[str]:
        return fresh_database(server, template)

    return factory


@asynccontextmanager
async def fresh_database(server: PostgresServer, template: str) -> AsyncIterator[str]:
    """A new database cloned from ``template`` on ``server``; dropped on exit."""
    name = f"tt_inv_{uuid.uuid4().hex[:12]}"
    dsn = await server.create_database(name, template=template)
    try:
        yield dsn
    finally:
        await server.drop_database(name)


class Names:
    """Stable uuids for the labels of one example (accounts, reports)."""

    def __init__(self) -> None:
        self._ids: dict[str, uuid.UUID] = {}
        self._labels: dict[uuid.UUID, str] = {}

    def __getitem__(self, label: str) -> uuid.UUID:
        if label not in self._ids:
            value = uuid.uuid4()
            self._ids[label] = value
            self._labels[value] = label
        return self._ids[label]

    def label(self, value: uuid.UUID) -> str:
        return self._labels.get(value, str(value))


def estimate_json(tokens: int, cost: int | None, priced: bool) -> str:
    """reserve's p_estimate (extend_reservation's p_more)."""
    estimate: dict[str, Any] = {"tokens": tokens}
    if priced:
        estimate["model"] = PRICED_MODEL
    elif cost is not None:
        estimate["cost_micros"] = cost
    return json.dumps(estimate)


async def expire(conn: asyncpg.Connection, report_id: uuid.UUID, budgets: bool) -> int:
    """Move a report's reservation into the past; how many rows moved (0 or 1). With
    ``budgets``, a reservation that holds windows is moved under the locks a reservation check
    reads it under (see the module docstring): its row, the account's periods (ascending),
    then the budgets it holds (in id order), the global lock order."""
    move = (
        "UPDATE tokentrack.report_reservations"
        " SET created_at = now() - interval '3 hours', expires_at = now() - interval '1 hour'"
        " WHERE report_id = $1"
    )
    if not budgets:
        return int((await conn.execute(move, report_id)).split()[-1])
    async with conn.transaction():
        row = await conn.fetchrow(
            "SELECT account_id, holds::text AS holds FROM tokentrack.report_reservations"
            " WHERE report_id = $1 FOR UPDATE",
            report_id,
        )
        if row is None:
            return 0
        if row["holds"] is not None:
            await conn.execute(
                "SELECT FROM tokentrack.usage_periods WHERE account_id = $1 ORDER BY id FOR UPDATE",
                row["account_id"],
            )
            await conn.execute(
                "SELECT FROM tokentrack.budgets WHERE account_id = $1 AND id IN"
                " (SELECT h.budget_id FROM jsonb_to_recordset($2::jsonb) AS h (budget_id uuid))"
                " ORDER BY id FOR UPDATE",
                row["account_id"],
                row["holds"],
            )
        return int((await conn.execute(move, report_id)).split()[-1])


async def execute(
    conn: asyncpg.Connection, names: Names, op: Op, budgets: bool = False
) -> dict[str, Any]:
    """Run one operation; its answer as a dict (the jsonb answer, or what a statement said)."""
    if isinstance(op, Reserve):
        if op.subjects is None:
            return await call(
                conn, "try_reserve_tokens", names[op.account], names[op.report], op.estimate
            )
        return await call(
            conn,
            "reserve",
            names[op.account],
            names[op.report],
            estimate_json(op.estimate, op.cost, op.priced),
            list(op.subjects),
            op.mode,
        )
    if isinstance(op, Extend):
        return await call(
            conn,
            "extend_reservation",
            names[op.report],
            names[op.account],
            estimate_json(op.tokens, op.cost, op.priced),
        )
    if isinstance(op, SetBudget):
        options = {} if op.timezone is None else {"timezone": op.timezone}
        return await call(
            conn,
            "set_budget",
            names[op.account],
            op.subject,
            op.unit,
            op.window,
            op.limit,
            json.dumps(options),
        )
    if isinstance(op, Persist) and op.record:
        usage: dict[str, int] = {"input_tokens": op.input_tokens, "output_tokens": op.output_tokens}
        if op.total_tokens is not None:
            usage["total_tokens"] = op.total_tokens
        return await call(
            conn,
            "record_step",
            names[op.report],
            names[op.account],
            op.step,
            json.dumps(usage),
            op.model,
        )
    if isinstance(op, Persist):
        return await call(
            conn,
            "persist_step_usage",
            names[op.report],
            names[op.account],
            op.step,
            op.input_tokens,
            op.output_tokens,
            op.total_tokens,
            op.model,
        )
    if isinstance(op, Finalize):
        return await call(conn, "finalize_report_usage", names[op.report], names[op.account])
    if isinstance(op, Finish):
        return await call(
            conn,
            "finish_report",
            names[op.report],
            names[op.account],
            op.status,
            op.error_message,
        )
    if isinstance(op, Increment):
        return await call(
            conn, "increment_usage", names[op.account], op.tokens, op.is_report, op.is_chat
        )
    if isinstance(op, Expire):
        return {"updated": await expire(conn, names[op.report], budgets)}
    if isinstance(op, Sweep):
        if op.batch is None:
            return await call(conn, "cleanup_expired_reservations")
        return await call_batched_sweep(conn, op.batch)
    if isinstance(op, OpenPeriod):
        return await call(conn, "open_usage_period", names[op.account], op.limit, None)
    raise TypeError(op)


async def call_batched_sweep(conn: asyncpg.Connection, batch: int) -> dict[str, Any]:
    """CALL tokentrack.sweep_expired_reservations(batch); its totals come as a NOTICE."""
    notices: list[str] = []

    def listener(_conn: object, message: Any) -> None:
        notices.append(str(message.message))

    conn.add_log_listener(listener)
    try:
        await conn.execute(f"CALL tokentrack.sweep_expired_reservations({int(batch)})")
        for _ in range(100):  # log listeners run through call_soon
            if notices:
                break
            await asyncio.sleep(0)
    finally:
        conn.remove_log_listener(listener)
    for text in notices:
        found = SWEEP_NOTICE.search(text)
        if found:
            return {"expired": int(found.group(1)), "billed_tokens": int(found.group(2))}
    raise AssertionError(f"sweep_expired_reservations said no totals: {notices}")


async def read_models(
    conn: asyncpg.Connection, names: Names, labels: Sequence[str], budgets: bool = False
) -> dict[str, AccountModel]:
    """The database's state of the given accounts, in the oracle's terms (``budgets``: the
    database has the budgets version, whose rows are read too)."""
    ids = [names[label] for label in labels]
    by_id = {names[label]: label for label in labels}
    models = {label: AccountModel(label, exists=False) for label in labels}
    for row in await conn.fetch("SELECT id FROM tokentrack.accounts WHERE id = ANY($1)", ids):
        models[by_id[row["id"]]].exists = True
    for row in await conn.fetch(
        "SELECT account_id, id::text AS id, status, tokens_limit, tokens_used, reports_count"
        " FROM tokentrack.usage_periods WHERE account_id = ANY($1)",
        ids,
    ):
        models[by_id[row["account_id"]]].periods.append(
            PeriodM(
                row["id"],
                row["tokens_limit"],
                row["tokens_used"],
                row["reports_count"],
                row["status"] == "active",
            )
        )
    holds = "rr.holds::text" if budgets else "NULL::text"
    reserved_cost = "rr.reserved_cost_micros" if budgets else "NULL::bigint"
    for row in await conn.fetch(
        "SELECT r.id, r.account_id, r.status, r.mode,"
        " (r.token_usage ->> 'totalTokens')::bigint AS total,"
        " (r.token_usage ->> 'costMicros')::bigint AS cost_total,"
        " rr.id::text AS rid, rr.reserved_tokens, rr.period_id::text AS period,"
        " rr.status AS rstatus, rr.expires_at <= now() AS expired, rr.billed_tokens,"
        f" {holds} AS holds, {reserved_cost} AS reserved_cost"
        " FROM tokentrack.reports AS r"
        " LEFT JOIN tokentrack.report_reservations AS rr ON rr.report_id = r.id"
        " WHERE r.account_id = ANY($1)",
        ids,
    ):
        reservation = None
        if row["rid"] is not None:
            reservation = ReservationM(
                row["rid"],
                row["reserved_tokens"],
                row["period"],
                row["rstatus"],
                row["expired"],
                row["billed_tokens"],
                _holds(row["holds"]),
                row["reserved_cost"],
            )
        models[by_id[row["account_id"]]].reports[names.label(row["id"])] = ReportM(
            row["status"], reservation, {}, row["total"], row["mode"], row["cost_total"]
        )
    for row in await conn.fetch(
        "SELECT r.account_id, s.report_id, s.step_name, s.id::text AS id, s.input_tokens,"
        " s.output_tokens, s.total_tokens, s.late, s.billed_period_id::text AS billed,"
        " s.cost_micros"
        " FROM tokentrack.report_step_usage AS s"
        " JOIN tokentrack.reports AS r ON r.id = s.report_id"
        " WHERE r.account_id = ANY($1)",
        ids,
    ):
        report = models[by_id[row["account_id"]]].reports[names.label(row["report_id"])]
        report.steps[row["step_name"]] = StepM(
            row["id"],
            row["input_tokens"],
            row["output_tokens"],
            row["total_tokens"],
            row["late"],
            row["billed"],
            row["cost_micros"],
        )
    if budgets:
        await _read_budgets(conn, models, by_id, ids)
    return models


def _holds(text: str | None) -> tuple[tuple[str, datetime], ...]:
    """report_reservations.holds as the oracle's (budget id, window start) pairs, in its order."""
    found = []
    for hold in json.loads(text or "[]"):
        start = parse_time(hold["window_start"])
        assert start is not None, hold
        found.append((str(hold["budget_id"]), start))
    return tuple(found)


async def _read_budgets(
    conn: asyncpg.Connection,
    models: dict[str, AccountModel],
    by_id: dict[uuid.UUID, str],
    ids: list[uuid.UUID],
) -> None:
    for row in await conn.fetch(
        "SELECT b.account_id, b.id::text AS id, b.subject, b.unit, b.budget_window,"
        " b.limit_amount, b.timezone, b.created_at,"
        " (SELECT count(*) FROM tokentrack.budget_changes AS c"
        "  WHERE c.account_id = b.account_id AND c.budget_id = b.id) AS changes"
        " FROM tokentrack.budgets AS b WHERE b.account_id = ANY($1)",
        ids,
    ):
        window = row["budget_window"]
        models[by_id[row["account_id"]]].budgets[(row["subject"], row["unit"], window)] = BudgetM(
            row["id"],
            row["subject"],
            row["unit"],
            window,
            row["limit_amount"],
            row["timezone"],
            row["changes"],
            parse_time(row["created_at"]) if window == "total" else None,
        )
    for row in await conn.fetch(
        "SELECT account_id, budget_id::text AS budget_id, window_start, used"
        " FROM tokentrack.budget_windows WHERE account_id = ANY($1)",
        ids,
    ):
        start = parse_time(row["window_start"])
        assert start is not None
        models[by_id[row["account_id"]]].windows[(row["budget_id"], start)] = row["used"]


@dataclass
class Workload:
    """One example: account limits and the rounds of concurrent lanes."""

    limits: list[int]
    reports: int
    rounds: list[list[list[Op]]]
    final_sweep: int | None = None  # the settling sweep: None cleanup(), else CALL (batch)
    budgets: list[SetBudget] = field(default_factory=list)  # created before the first round


@dataclass
class Harness:
    conns: list[asyncpg.Connection]
    world: World
    names: Names
    models: dict[str, AccountModel]
    grants: list[dict[str, Any]] = field(default_factory=list)
    extensions: list[dict[str, Any]] = field(default_factory=list)
    calls: int = 0
    history: list[str] = field(default_factory=list)
    budgets: bool = False  # the database has the budgets version

    @classmethod
    async def create(
        cls,
        dsn: str,
        limits: Sequence[int],
        reports: int,
        lanes: int,
        budgets: Sequence[SetBudget] = (),
    ) -> Harness:
        """Accounts a0, a1, ... with these period limits, ``reports`` report labels, ``lanes``
        connections; with ``budgets``, PRICED_MODEL's price and these budgets (created in a
        first round, checked by the oracle)."""
        conns = [await asyncpg.connect(dsn) for _ in range(max(lanes, 1))]
        conn = conns[0]
        await install_grant_probe(conn)
        has_budgets = bool(
            await conn.fetchval("SELECT to_regclass('tokentrack.budgets') IS NOT NULL")
        )
        names = Names()
        accounts = [f"a{i}" for i in range(len(limits))]
        for label, limit in zip(accounts, limits, strict=True):
            answer = await call(conn, "open_usage_period", names[label], limit, None)
            assert answer["success"] is True, answer
        await conn.execute("INSERT INTO tokentrack.accounts (id) VALUES ($1)", names[NO_PERIOD])
        _ = names[GHOST]  # a stable id that never becomes an account
        prices: dict[str, tuple[int, int]] = {}
        if budgets:
            for model, (per_input, per_output) in PRICES.items():
                answer = await call(
                    conn,
                    "set_model_price",
                    model,
                    json.dumps({"input": per_input * 1_000_000, "output": per_output * 1_000_000}),
                )
                assert answer["success"] is True, answer
            prices = dict(PRICES)
        world = World(accounts=frozenset([*accounts, NO_PERIOD]), owners={}, prices=prices)
        models = await read_models(conn, names, [*accounts, NO_PERIOD, GHOST], has_budgets)
        harness = cls(conns, world, names, models, budgets=has_budgets)
        harness.add_reports(reports)
        if budgets:
            violations = await harness.round([list(budgets)])
            assert not violations, "\n".join(violations)
        return harness

    @property
    def accounts(self) -> int:
        return len(self.world.accounts) - 1

    @property
    def reports(self) -> int:
        return len(self.world.owners)

    def add_reports(self, count: int) -> list[str]:
        """``count`` more report labels, owned round-robin by the accounts."""
        owners = dict(self.world.owners)
        added = []
        for number in range(self.reports, self.reports + count):
            owners[f"r{number}"] = f"a{number % self.accounts}"
            added.append(f"r{number}")
        self.world = World(self.world.accounts, owners, self.world.prices)
        return added

    async def close(self) -> None:
        for conn in self.conns:
            if not conn.is_closed():
                await conn.close()

    def _allowed(self, op: Op) -> bool:
        """A reservation for another account's report is sent only once that report exists
        (before, it would create the report for the wrong account: a different story)."""
        if isinstance(op, Reserve):
            owner = self.world.owners.get(op.report)
            if owner is not None and owner != op.account:
                return op.report in self.models[owner].reports
        return True

    async def round(self, lanes: Sequence[Sequence[Op]], check: bool = True) -> list[str]:
        """Run the lanes concurrently, then explain and check everything."""
        todo = [[op for op in lane if self._allowed(op)] for lane in lanes]
        todo = [lane for lane in todo if lane][: len(self.conns)]
        if not todo:
            return []

        async def run_lane(number: int, ops: list[Op], first: int) -> list[Call]:
            done = []
            for offset, op in enumerate(ops):
                try:
                    answer = await execute(self.conns[number], self.names, op, self.budgets)
                    done.append(Call(op, answer, number, first + offset))
                except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    error = f"{type(exc).__name__} {getattr(exc, 'sqlstate', '')}: {exc}"
                    done.append(Call(op, None, number, first + offset, error=error))
            return done

        firsts = []
        for lane in todo:
            firsts.append(self.calls)
            self.calls += len(lane)
        clock = "SELECT clock_timestamp()"
        started = await self.conns[0].fetchval(clock)
        calls = await asyncio.gather(*(run_lane(i, lane, firsts[i]) for i, lane in enumerate(todo)))
        ended = await self.conns[0].fetchval(clock)
        for done in calls:
            for c in done:
                c.at = (started, ended)
        db = await read_models(self.conns[0], self.names, list(self.models), self.budgets)
        self.models, violations = check_round(self.world, self.models, calls, db)
        for done in calls:
            for c in done:
                self.history.append(f"lane {c.lane} #{c.index}: {c.op!r} -> {c.answer or c.error}")
                if not (c.answer and c.answer.get("success")):
                    continue
                if isinstance(c.op, Reserve) and not c.answer.get("existing"):
                    self.grants.append(c.answer)
                elif isinstance(c.op, Extend):
                    self.extensions.append(c.answer)
        if check:
            violations += await self.invariants()
        return violations

    async def invariants(self, *, settled: bool = False, swept: bool = False) -> list[str]:
        return await check_invariants(
            self.conns[0],
            settled=settled,
            swept=swept,
            grants=self.grants,
            extensions=self.extensions,
        )

    async def settle(self, batch: int | None = None) -> list[str]:
        """Expire every active reservation, run the sweep: afterwards everything is billed."""
        active = sorted(
            label
            for model in self.models.values()
            for label, report in model.reports.items()
            if report.reservation and report.reservation.status == "active"
        )
        expiries = [[Expire(label) for label in active]] if active else []
        violations = await self.round(expiries, check=False) if active else []
        violations += await self.round([[Sweep(batch)]], check=False)
        violations += await self.invariants(settled=True, swept=True)
        return violations

    def story(self) -> str:
        return "\n".join(self.history[-200:])


async def run_workload(dsn: str, workload: Workload) -> None:
    """One hypothesis example: every round, then the settling sweep; fails on a violation."""
    lanes = max((len(r) for r in workload.rounds), default=1)
    harness = await Harness.create(dsn, workload.limits, workload.reports, lanes, workload.budgets)
    try:
        for number, lanes_of_round in enumerate(workload.rounds):
            violations = await harness.round(lanes_of_round)
            if violations:
                raise AssertionError(_report(f"round {number}", violations, harness))
        violations = await harness.settle(workload.final_sweep)
        if violations:
            raise AssertionError(_report("settle", violations, harness))
    finally:
        await harness.close()


def _report(where: str, violations: list[str], harness: Harness) -> str:
    return f"{where}: " + "\n".join(violations) + "\nhistory:\n" + harness.story()


# --------------------------------------------------------------------------------------------
# Hypothesis strategies
# --------------------------------------------------------------------------------------------

STEP_NAMES = ("plan", "search", "write", "AN1.5 ✓ 'x'; --")
STATUSES = ("complete", "failed", "cancelled")
LIMITS = (60, 100, 150, 250)
ESTIMATES = (10, 25, 40, 60, 90)
INCREMENTS = (0, 5, 20, 45)


def step_numbers(report: str, step: str, variant: int) -> tuple[int, int, int | None]:
    """The numbers of a step: variant 0 as first sent, 1 the same numbers spelled with an
    explicit total (a retry), 2 other numbers (a conflicting retry)."""
    h = zlib.crc32(f"{report}/{step}".encode())
    inp, out = 2 + h % 17, (h >> 8) % 13
    total = None if h & 1 else inp + out + (h >> 16) % 5
    if variant == 1:
        return inp, out, inp + out if total is None else total
    if variant == 2:
        return inp + 1, out, None
    return inp, out, total


def persist_op(report: str, account: str, step: str, variant: int, record: bool = False) -> Persist:
    """A step of ``report`` (see step_numbers); ``record``: through record_step."""
    inp, out, total = step_numbers(report, step, variant)
    return Persist(
        report, account, step, inp, out, total, PRICED_MODEL if variant else None, record
    )


@st.composite
def operations(draw: st.DrawFn, accounts: int, reports: int, storm: bool = False) -> Op:
    """One operation of a random mix (``storm``: mostly reservations and what frees them)."""
    r = draw(st.integers(0, reports - 1))
    report, owner = f"r{r}", f"a{r % accounts}"
    other = f"a{(r + draw(st.integers(1, max(accounts - 1, 1)))) % accounts}"
    kinds = (
        ["reserve"] * 6 + ["finalize", "finish", "increment", "expire", "sweep", "persist"]
        if storm
        else ["reserve"] * 3
        + ["persist"] * 5
        + ["finalize", "finish"] * 2
        + ["increment", "expire", "sweep", "open_period", "foreign", "stranger"]
    )
    kind = draw(st.sampled_from(kinds))
    if kind == "reserve":
        return Reserve(owner, report, draw(st.sampled_from(ESTIMATES)))
    if kind == "persist":
        step = draw(st.sampled_from(STEP_NAMES))
        return persist_op(report, owner, step, draw(st.sampled_from((0, 0, 0, 1, 2))))
    if kind == "finalize":
        return Finalize(report, owner)
    if kind == "finish":
        status = draw(st.sampled_from(STATUSES))
        return Finish(report, owner, status, "boom" if status == "failed" else None)
    if kind == "increment":
        return Increment(
            f"a{draw(st.integers(0, accounts - 1))}",
            draw(st.sampled_from(INCREMENTS)),
            draw(st.booleans()),
            draw(st.booleans()),
        )
    if kind == "expire":
        return Expire(report)
    if kind == "sweep":
        return Sweep(draw(st.sampled_from((None, None, 1, 2))))
    if kind == "open_period":
        return OpenPeriod(f"a{draw(st.integers(0, accounts - 1))}", draw(st.sampled_from(LIMITS)))
    if kind == "foreign":  # the right report, the wrong account
        if accounts == 1:
            return Finalize(report, owner)
        which = draw(st.sampled_from(("reserve", "persist", "finalize", "finish")))
        if which == "reserve":
            return Reserve(other, report, 10)
        if which == "persist":
            return persist_op(report, other, "plan", 0)
        if which == "finalize":
            return Finalize(report, other)
        return Finish(report, other, "cancelled")
    # stranger: unknown accounts and reports
    x = f"x{draw(st.integers(0, 3))}"
    which = draw(st.sampled_from(("nop", "ghost", "unknown_report", "ghost_increment")))
    if which == "nop":
        return Reserve(NO_PERIOD, x, 10)
    if which == "ghost":
        return Reserve(GHOST, x, 10)
    if which == "ghost_increment":
        return Increment(draw(st.sampled_from((GHOST, NO_PERIOD))), 5)
    return persist_op(x, owner, "plan", 0)


def lanes_of(accounts: int, reports: int, storm: bool = False, lanes: int = 5) -> Any:
    """One round: up to ``lanes`` lanes of 1 to 3 operations."""
    op = operations(accounts, reports, storm)
    return st.lists(st.lists(op, min_size=1, max_size=3), min_size=1, max_size=lanes)


@st.composite
def workloads(draw: st.DrawFn, storm: bool = False, max_rounds: int = 6) -> Workload:
    accounts = 1 if storm else draw(st.integers(1, 3))
    reports = 8 if storm else draw(st.integers(2, 6))
    lanes = 6 if storm else 5
    limits = [draw(st.sampled_from(LIMITS)) for _ in range(accounts)]
    # The first round reserves every report at once (a reservation race), so that the
    # random rounds after it mostly meet reports that exist.
    opening: list[list[Op]] = [[] for _ in range(min(lanes, reports))]
    for r in range(reports):
        estimate = draw(st.sampled_from(ESTIMATES))
        opening[r % len(opening)].append(Reserve(f"a{r % accounts}", f"r{r}", estimate))
    rounds = draw(
        st.lists(lanes_of(accounts, reports, storm, lanes), min_size=1, max_size=max_rounds)
    )
    return Workload(limits, reports, [opening, *rounds], draw(st.sampled_from((None, 1, 3))))


# Budget mixes: every account has some of these budgets (limits drawn per example), reports
# reserve with subjects that share them, so that racing reservations meet several tight budgets
# at once, in minute, hour, day, week, month and total windows, in tokens and in cost.
BUDGET_KINDS: tuple[tuple[str | None, str, str, str | None, tuple[int, ...]], ...] = (
    (None, "tokens", "month", None, (120, 200, 320)),
    ("team:red", "tokens", "day", None, (60, 100, 150)),
    ("team:blue", "tokens", "day", None, (50, 90)),
    ("key:k1", "tokens", "minute", None, (40, 60, 90)),
    ("key:k2", "tokens", "minute", None, (30, 70)),
    ("user:u1", "tokens", "hour", None, (50, 100)),
    (None, "cost_micros", "total", None, (150, 300)),
    ("team:red", "cost_micros", "week", "Europe/Berlin", (80, 200)),
)
# Created only by a set_budget of a round, racing the reservations that it then applies to.
LATE_BUDGET = ("key:k3", "tokens", "minute", None, (25, 60))
SUBJECT_SETS: tuple[tuple[str, ...], ...] = (
    (),
    ("team:red",),
    ("team:red", "key:k1"),
    ("team:red", "key:k2"),
    ("team:blue", "key:k1", "user:u1"),
    ("team:blue", "key:k3"),
    ("key:k2", "user:u1"),
    ("team:red", "key:k1", "key:k3", "user:u1"),
)
BUDGET_LIMITS = (150, 250, 400, 1000)  # the periods': budgets bind first, mostly
COSTS = (None, None, 0, 15, 40)  # explicit cost estimates (None: none)
EXTRAS = (5, 15, 30, 60)
MODES = ("standard", "dd", "discovery", "hybrid")


def budget_op(
    kind: tuple[str | None, str, str, str | None, tuple[int, ...]], account: str, limit: int
) -> SetBudget:
    subject, unit, window, timezone, _ = kind
    return SetBudget(account, subject, unit, window, limit, timezone)


@st.composite
def budget_sets(draw: st.DrawFn, accounts: int) -> list[SetBudget]:
    """Every account's budgets: the account's month and a random choice of the others."""
    chosen = []
    for a in range(accounts):
        kinds = [BUDGET_KINDS[0]] + [k for k in BUDGET_KINDS[1:] if draw(st.booleans())]
        for kind in kinds:
            chosen.append(budget_op(kind, f"a{a}", draw(st.sampled_from(kind[4]))))
    return chosen


@st.composite
def reserve_ops(draw: st.DrawFn, account: str, report: str) -> Reserve:
    """A reservation with subjects and a cost estimate (or, a sixth of them, try_reserve_tokens)."""
    estimate = draw(st.sampled_from(ESTIMATES))
    if draw(st.integers(0, 5)) == 0:
        return Reserve(account, report, estimate)
    priced = draw(st.integers(0, 3)) == 0
    return Reserve(
        account,
        report,
        estimate,
        draw(st.sampled_from(SUBJECT_SETS)),
        None if priced else draw(st.sampled_from(COSTS)),
        priced,
        draw(st.sampled_from(MODES)),
    )


@st.composite
def budget_operations(draw: st.DrawFn, accounts: int, reports: int, storm: bool = False) -> Op:
    """One operation of a budget mix (``storm``: mostly reservations, extensions and what
    frees them)."""
    r = draw(st.integers(0, reports - 1))
    report, owner = f"r{r}", f"a{r % accounts}"
    kinds = (
        ["reserve"] * 6 + ["extend"] * 3 + ["finalize", "expire", "sweep", "set_budget", "persist"]
        if storm
        else ["reserve"] * 4
        + ["extend"] * 3
        + ["persist"] * 4
        + ["finalize", "finish", "expire", "sweep", "set_budget", "increment", "foreign"]
        + ["open_period"]
    )
    kind = draw(st.sampled_from(kinds))
    if kind == "reserve":
        return draw(reserve_ops(owner, report))
    if kind == "open_period":  # reservations of the old period stay (and may be extended)
        return OpenPeriod(owner, draw(st.sampled_from(BUDGET_LIMITS)))
    if kind == "extend":
        priced = draw(st.integers(0, 3)) == 0
        cost = None if priced else draw(st.sampled_from(COSTS))
        return Extend(report, owner, draw(st.sampled_from(EXTRAS)), cost, priced)
    if kind == "persist":
        step = draw(st.sampled_from(STEP_NAMES))
        return persist_op(
            report, owner, step, draw(st.sampled_from((0, 0, 1, 1, 2))), draw(st.booleans())
        )
    if kind == "finalize":
        return Finalize(report, owner)
    if kind == "finish":
        status = draw(st.sampled_from(STATUSES))
        return Finish(report, owner, status, "boom" if status == "failed" else None)
    if kind == "expire":
        return Expire(report)
    if kind == "sweep":
        return Sweep(draw(st.sampled_from((None, 1, 2))))
    if kind == "set_budget":
        budget = draw(st.sampled_from((*BUDGET_KINDS, LATE_BUDGET)))
        limit = draw(st.sampled_from((0, *budget[4], 10 * budget[4][-1])))
        return budget_op(budget, f"a{draw(st.integers(0, accounts - 1))}", limit)
    if kind == "increment":
        return Increment(owner, draw(st.sampled_from(INCREMENTS)))
    # foreign: the right report, the wrong account, or a report nobody reserved
    other = f"a{(r + 1) % accounts}" if accounts > 1 else NO_PERIOD
    if draw(st.booleans()):
        return Extend(report, other, 5)
    return Extend(f"x{draw(st.integers(0, 3))}", owner, 5)


@st.composite
def budget_workloads(draw: st.DrawFn, storm: bool = False, max_rounds: int = 5) -> Workload:
    """Accounts with several tight budgets each; the first round reserves every report at
    once with its subjects (a race on budgets they share), the random rounds after it mix
    reservations, extensions, steps (late ones too), endings, expiry, sweeps and limit
    changes."""
    accounts = 1 if storm else draw(st.integers(1, 2))
    reports = 8 if storm else draw(st.integers(3, 6))
    lanes = 6 if storm else 5
    limits = [draw(st.sampled_from(BUDGET_LIMITS)) for _ in range(accounts)]
    budgets = draw(budget_sets(accounts))
    opening: list[list[Op]] = [[] for _ in range(min(lanes, reports))]
    for r in range(reports):
        opening[r % len(opening)].append(draw(reserve_ops(f"a{r % accounts}", f"r{r}")))
    op = budget_operations(accounts, reports, storm)
    # Storms: two calls a lane, so that six lanes' interleavings stay within the oracle's search.
    per_lane = 2 if storm else 3
    lanes_of_round = st.lists(
        st.lists(op, min_size=1, max_size=per_lane), min_size=1, max_size=lanes
    )
    rounds = draw(st.lists(lanes_of_round, min_size=1, max_size=max_rounds))
    return Workload(
        limits, reports, [opening, *rounds], draw(st.sampled_from((None, 1, 3))), budgets
    )
