"""``tokentrack demo``: the four report types on several accounts at once, end to end.

Without a database URL it starts a throwaway PostgreSQL in a temporary directory
(:class:`tokentrack_client.testing.PostgresServer`), installs the tokentrack SQL with the
migrator, runs the reports, prints what the database billed and reconcile's verdict, then
stops the server and removes its directory, also on Ctrl-C or SIGTERM. ``DATABASE_URL`` is
ignored (operators export it for the other commands; the demo must not write test accounts
into that database's append-only ledger), and said so. Only a URL given on its command line
(``--database-url``) makes it use another database: it installs the SQL when it is missing,
and refuses (:class:`DemoError`) a database whose ``tokentrack.accounts`` holds any account
other than the demo's own four, :data:`ACCOUNT_IDS` (fixed uuids, the same on every run).

The scenario: eight reports on four accounts run concurrently through one pool. One is
cancelled from outside (``cancel_report`` over a connection of its own, as a web
application's cancel button does) while its generator is in the middle of a step; one fails
(its LLM call raises); two race for a budget that holds only one of them. A fake LLM answers
with seeded, realistic token counts after a short delay, by class (a :class:`Usage`): the
long gpt-4o steps read part of their prompt from the provider's cache, the o3-mini step
spends part of its output reasoning.

Costs: at its start the demo sets a price for each of its models (:data:`PRICES`, through
``tokentrack.set_model_price``, which only the schema owner may call: the demo's own server
makes it the owner; on a database given by ``--database-url`` whose role is not the owner,
the prices are left as they are and unpriced steps cost nothing). Each step is priced once,
when it is recorded; the table shows each report's ``costMicros``. Prices and costs are in
micros of one currency per installation (10^-6 of its unit); the demo's prices are US
dollars, so the table prints micros as ``$0.001234``.

Budgets (after the table): acme's ``team:research`` gets a daily budget of
:data:`TEAM_DAY_LIMIT` tokens (``set_budget``). A standard report for the team (research-1)
is refused by it (``insufficient_budget`` naming that budget) although acme's month would
allow it: the same reservation without the team's subject is granted, in a transaction the
demo rolls back. Then research-2 reserves for its first two steps only, decides mid-report to
add a third (``extend_reservation``, granted within the team's day), and bills more than its
first estimate without any step answering ``over_reservation``. ``reserve``, ``set_budget``
and ``extend_reservation`` are called as SQL; the steps and the outcome go through the client.
On a database given by ``--database-url`` that an earlier run used the same day, the team's
day already holds that run's usage, and the refusals say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

import asyncpg

from tokentrack_client import connection, migrate
from tokentrack_client.client import TokenTracker
from tokentrack_client.errors import InsufficientTokens, ReportFinalized, TokenTrackError
from tokentrack_client.testing import PostgresServer, PostgresServerError
from tokentrack_client.tracking import ReportCancelled
from tokentrack_client.usage import Usage

__all__ = [
    "ACCOUNT_IDS",
    "PRICES",
    "TEAM_DAY_LIMIT",
    "DemoError",
    "PostgresServerError",
    "main",
    "run_demo",
]

# The demo's server: the throwaway defaults, with few connections (one pool of the demo's).
SERVER_SETTINGS: Final = {"max_connections": "50"}

# Step profiles: model, (min, max) input tokens, (min, max) output tokens shown, max reasoning
# tokens (spent on top of the output shown; part of output_tokens), max cached input tokens
# (read from the provider's prompt cache; part of input_tokens).
PROFILES: Final[dict[str, tuple[str, tuple[int, int], tuple[int, int], int, int]]] = {
    "AN0": ("gpt-4o-mini", (1_800, 2_600), (250, 450), 0, 0),
    "AN1.5": ("gpt-4o", (6_000, 9_000), (900, 1_400), 0, 0),
    "AN1.7": ("gpt-4o-mini", (3_500, 5_000), (600, 900), 0, 0),
    "AN2": ("gpt-4o", (12_000, 18_000), (1_800, 2_600), 0, 8_192),
    "AN3": ("o3-mini", (7_000, 10_000), (1_000, 1_600), 4_000, 0),
    "AN4": ("gpt-4o", (9_000, 14_000), (1_200, 2_000), 0, 6_144),
    "AN5": ("gpt-4o", (4_000, 7_000), (2_500, 4_000), 0, 0),
}

# The prices the demo sets (set_model_price): micros of the installation's currency (here US
# dollars) per million tokens of each class; reasoning is priced as output (the default).
PRICES: Final[dict[str, dict[str, int]]] = {
    "gpt-4o-mini": {"input": 150_000, "cached_input": 75_000, "output": 600_000},
    "gpt-4o": {"input": 2_500_000, "cached_input": 1_250_000, "output": 10_000_000},
    "o3-mini": {"input": 1_100_000, "cached_input": 550_000, "output": 4_400_000},
}


def _format_micros(micros: int) -> str:
    """A cost in micros as dollars with 6 decimals, exactly: 1234 -> ``$0.001234``."""
    whole, fraction = divmod(micros, 1_000_000)
    return f"${whole:,}.{fraction:06d}"


MODES: Final[dict[str, tuple[str, ...]]] = {
    "standard": ("AN0", "AN2", "AN4", "AN5"),
    "dd": ("AN0", "AN1.5", "AN1.7", "AN2", "AN3", "AN4", "AN5"),
    "discovery": ("AN0", "AN1.5", "AN1.7", "AN5"),
    "hybrid": ("AN0", "AN1.5", "AN2", "AN3", "AN5"),
}


def worst_case(steps: Sequence[str]) -> int:
    """The most tokens these steps can use (their profiles' maxima)."""
    return sum(PROFILES[s][1][1] + PROFILES[s][2][1] + PROFILES[s][3] for s in steps)


def estimate(mode: str) -> int:
    """What a report of ``mode`` reserves: the worst case of each of its steps."""
    return worst_case(MODES[mode])


# Four accounts; initech's budget holds one standard report, not two.
ACCOUNTS: Final[dict[str, int]] = {
    "acme": 400_000,
    "globex": 400_000,
    "initech": estimate("standard") + estimate("standard") // 2,
    "umbrella": 400_000,
}

# The demo's accounts are always these uuids (uuid5 of a name under the reserved .invalid
# domain): a database whose accounts are all among them holds only the demo's own data.
ACCOUNT_IDS: Final[dict[str, uuid.UUID]] = {
    name: uuid.uuid5(uuid.NAMESPACE_DNS, f"{name}.demo.tokentrack.invalid") for name in ACCOUNTS
}


# The budget story: acme's research team has a daily token budget smaller than one standard
# report, larger than research-2's first estimate and its extension together.
TEAM: Final = "team:research"
TEAM_DAY_LIMIT: Final = 20_000
RESEARCH_PLAN: Final = ("AN0", "AN1.7")  # research-2's first estimate covers these
RESEARCH_EXTRA: Final = "AN1.5"  # and mid-report it adds this one (extend_reservation)


@dataclass
class DemoReport:
    """One report of the scenario and what became of it."""

    name: str
    account: str
    mode: str
    seed: int
    fail_at: str | None = None  # the fake LLM raises at this step
    cancel_after: int | None = None  # cancel_report once this many steps are recorded
    report_id: uuid.UUID = field(default_factory=uuid.uuid4)
    outcome: str = "running"
    note: str = ""


def scenario() -> list[DemoReport]:
    """The eight reports of the demo."""
    return [
        DemoReport("acme-1", "acme", "standard", seed=11),
        DemoReport("acme-2", "acme", "dd", seed=12),
        DemoReport("umbrella-1", "umbrella", "hybrid", seed=21),
        DemoReport("umbrella-2", "umbrella", "discovery", seed=22),
        DemoReport("globex-1", "globex", "discovery", seed=31, cancel_after=2),
        DemoReport("globex-2", "globex", "hybrid", seed=32, fail_at="AN3"),
        DemoReport("initech-1", "initech", "standard", seed=41),
        DemoReport("initech-2", "initech", "standard", seed=42),
    ]


class LLMError(RuntimeError):
    """The fake provider failed."""


class FakeLLM:
    """Seeded token counts per (seed, step), after a short seeded delay."""

    def __init__(self, seed: int, latency: float, fail_at: str | None = None) -> None:
        self.seed = seed
        self.latency = latency
        self.fail_at = fail_at

    async def complete(self, step: str) -> tuple[str, Usage]:
        """Answer one step: (model, its usage by token class)."""
        model, inputs, outputs, reasoning, cached = PROFILES[step]
        rng = random.Random(f"{self.seed}:{step}")
        await asyncio.sleep(self.latency * rng.uniform(0.6, 1.4))
        if step == self.fail_at:
            raise LLMError(f"{model} timed out during {step}")
        i, o = rng.randint(*inputs), rng.randint(*outputs)
        thought = rng.randint(0, reasoning)
        return model, Usage(
            input_tokens=i,
            cached_input_tokens=rng.randint(cached // 2, cached) if cached else 0,
            output_tokens=o + thought,
            reasoning_tokens=thought,
        )


class Progress:
    """The progress line: rewritten in place on a terminal, one line per finished report
    otherwise."""

    def __init__(self, out: TextIO, total: int) -> None:
        self.out = out
        self.total = total
        self.done = 0
        self.steps = 0
        self.tokens = 0
        self.tty = out.isatty()

    def line(self) -> str:
        return (
            f"progress: {self.done}/{self.total} reports done | {self.steps} steps | "
            f"{self.tokens:,} tokens recorded"
        )

    def step(self, tokens: int) -> None:
        self.steps += 1
        self.tokens += tokens

    def report_done(self) -> None:
        self.done += 1
        if not self.tty:
            print(self.line(), file=self.out, flush=True)

    async def animate(self) -> None:
        """Rewrite the line on a terminal until cancelled."""
        if not self.tty:
            return
        spinner = "|/-\\"
        tick = 0
        while True:
            self.out.write(f"\r{spinner[tick % 4]} {self.line()} ")
            self.out.flush()
            tick += 1
            await asyncio.sleep(0.1)

    def finish(self) -> None:
        if self.tty:
            self.out.write(f"\r  {self.line()} \n")
            self.out.flush()


class DemoError(Exception):
    """The demo could not run (no PostgreSQL, no database, SQL install failed)."""


async def _generate(
    tracker: TokenTracker,
    report: DemoReport,
    account_id: uuid.UUID,
    progress: Progress,
    on_step: Callable[[DemoReport, int], None],
    latency: float,
) -> None:
    """One report generator: reserve, run the mode's steps, end the report."""
    llm = FakeLLM(report.seed, latency, report.fail_at)
    try:
        async with tracker.track_report(
            account_id, report.report_id, estimate(report.mode)
        ) as tracked:
            for name in MODES[report.mode]:
                model, usage = await llm.complete(name)
                total = usage.input_tokens + usage.output_tokens
                try:
                    await tracked.step(name, usage=usage, model=model)
                except ReportCancelled:
                    progress.step(total)  # recorded (billed late), then it raised
                    raise
                progress.step(total)
                on_step(report, len(tracked.steps))
        report.outcome = "complete"
    except InsufficientTokens as refused:
        report.outcome = "refused"
        report.note = f"insufficient_tokens: {refused.available_tokens:,} available"
    except ReportCancelled:
        report.outcome = "cancelled"
        report.note = "cancelled from outside; the step in flight was billed late"
    except LLMError as failed:
        report.outcome = "failed"
        report.note = f"LLM error: {failed}"
    except asyncio.CancelledError:
        report.outcome = "interrupted"  # track_report marked it cancelled and billed it
        raise
    progress.report_done()


async def _refuse_other_accounts(dsn: str) -> None:
    """Refuse a database whose tokentrack.accounts holds an account that is not the demo's
    (every table with account data refers to tokentrack.accounts). Connection failures are
    :class:`~tokentrack_client.connection.ConnectionFailed`, one line each."""
    target = connection.describe_target(dsn)
    conn = await connection.connect(dsn, "tokentrack demo")
    try:
        others = 0
        if await conn.fetchval("SELECT to_regclass('tokentrack.accounts') IS NOT NULL"):
            others = await conn.fetchval(
                "SELECT count(*) FROM tokentrack.accounts WHERE id <> ALL($1::uuid[])",
                list(ACCOUNT_IDS.values()),
            )
    except connection.DATABASE_ERRORS as exc:
        raise DemoError(f"{target}: {connection.failure_line(exc)}") from exc
    finally:
        await connection.close(conn)
    if others:
        raise DemoError(
            f"refusing {target}: tokentrack.accounts holds {others} account(s) that are not "
            "the demo's; the demo writes test accounts into the append-only ledger, so it runs "
            "only on its own throwaway server or a database without other accounts"
        )


async def _install(dsn: str, out: TextIO) -> None:
    try:
        print(*(f"  {line}" for line in (await migrate.install(dsn)).lines()), sep="\n", file=out)
    except migrate.MigrationError as exc:
        raise DemoError(f"installing the tokentrack SQL failed: {exc}") from exc


async def _set_prices(pool: asyncpg.Pool[Any], out: TextIO) -> None:
    """Set :data:`PRICES` (set_model_price: the same prices again add nothing). Only the
    schema owner may: for another role (a database given by --database-url) say so and go on
    with the prices as they are."""
    try:
        for model, prices in PRICES.items():
            await pool.fetchval(
                "SELECT tokentrack.set_model_price($1, $2::jsonb)", model, json.dumps(prices)
            )
    except asyncpg.InsufficientPrivilegeError:
        print(
            "prices: not set (only the schema owner may call set_model_price); steps of a "
            "model without a price are recorded unpriced",
            file=out,
        )
        return
    print(
        "prices set (micros of one currency per installation, per million tokens; the demo's "
        "currency is US dollars; reasoning is priced as output):",
        file=out,
    )
    for model, p in PRICES.items():
        print(
            f"  {model:<12} input {p['input']:>9,}  cached input {p['cached_input']:>9,}  "
            f"output {p['output']:>10,}",
            file=out,
        )


async def _label_reports(
    pool: asyncpg.Pool[Any], reports: Sequence[DemoReport], ids: dict[str, uuid.UUID]
) -> None:
    """Create the report rows with their mode (the application's side; try_reserve_tokens
    creates missing rows as mode standard). Skipped when the role may not insert."""
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
        await pool.executemany(
            "INSERT INTO tokentrack.reports (id, account_id, mode) VALUES ($1, $2, $3)",
            [(r.report_id, ids[r.account], r.mode) for r in reports],
        )


async def _table(pool: asyncpg.Pool[Any], reports: Sequence[DemoReport]) -> list[list[str]]:
    rows = await pool.fetch(
        """
        SELECT r.id, r.mode, r.status, rr.reserved_tokens,
               COALESCE((r.token_usage ->> 'totalTokens')::bigint, 0) AS billed,
               (r.token_usage ->> 'costMicros')::bigint AS cost,
               COALESCE((r.token_usage ->> 'unpricedSteps')::bigint, 0) AS unpriced,
               (SELECT count(*) FROM tokentrack.report_step_usage AS s WHERE s.report_id = r.id)
                   AS steps,
               (SELECT count(*) FROM tokentrack.report_step_usage AS s
                WHERE s.report_id = r.id AND s.late) AS late
        FROM tokentrack.reports AS r
        LEFT JOIN tokentrack.report_reservations AS rr ON rr.report_id = r.id
        WHERE r.id = ANY($1::uuid[])
        """,
        [r.report_id for r in reports],
    )
    by_id = {row["id"]: row for row in rows}
    table = [["report", "mode", "outcome", "reserved", "billed", "cost", "steps", ""]]
    for report in reports:
        row = by_id.get(report.report_id)
        if row is None or row["reserved_tokens"] is None:
            outcome, reserved, billed, cost, steps = report.outcome, "-", "0", "-", "0"
        else:
            outcome = row["status"]
            reserved = f"{row['reserved_tokens']:,}"
            billed = f"{row['billed']:,}"
            # costMicros: the sum of the billed steps' priced costs (not billed yet: none);
            # * marks a report with unpriced steps, whose cost is not in it
            cost = "-" if row["cost"] is None else _format_micros(row["cost"])
            if row["unpriced"]:
                cost += "*"
            steps = str(row["steps"]) + (f" ({row['late']} late)" if row["late"] else "")
        table.append(
            [report.name, report.mode, outcome, reserved, billed, cost, steps, report.note]
        )
    return table


async def _sql(pool: asyncpg.Pool[Any], function: str, *args: Any) -> dict[str, Any]:
    """``SELECT tokentrack.<function>(args)``, its jsonb answer decoded."""
    placeholders = ", ".join(f"${i}" for i in range(1, len(args) + 1))
    answer = json.loads(await pool.fetchval(f"SELECT tokentrack.{function}({placeholders})", *args))
    assert isinstance(answer, dict)
    return answer


def _refusal(answer: dict[str, Any]) -> str:
    """A refusal of reserve or extend_reservation, naming the budget that refused."""
    if answer.get("error") == "insufficient_budget":
        return (
            f"insufficient_budget: {answer['subject']}'s {answer['window']} budget has "
            f"{answer['available']:,} {answer['unit']} available, {answer['requested']:,} "
            "requested"
        )
    return str(answer.get("error"))


def _team_window(answer: dict[str, Any], budget_id: str) -> dict[str, Any]:
    """The team budget's entry in a grant's "budgets"."""
    entry = next(b for b in answer["budgets"] if b["budget_id"] == budget_id)
    assert isinstance(entry, dict)
    return entry


async def _budget_story(
    pool: asyncpg.Pool[Any], tracker: TokenTracker, out: TextIO, latency: float
) -> None:
    """A team's daily budget refusing what the account's month would allow, and an extension
    mid-report (see the module's docstring)."""
    account = ACCOUNT_IDS["acme"]
    budget = await _sql(pool, "set_budget", account, TEAM, "tokens", "day", TEAM_DAY_LIMIT)
    budget_id = str(budget["budget_id"])
    print(
        f"budgets: acme's {TEAM} gets a daily budget of {TEAM_DAY_LIMIT:,} tokens "
        f"(set_budget, days in {budget['timezone']})",
        file=out,
    )

    # research-1: a standard report for the team, more than the team's day allows.
    wanted = json.dumps({"tokens": estimate("standard")})
    refused = await _sql(pool, "reserve", account, uuid.uuid4(), wanted, [TEAM], "standard")
    if refused["success"]:  # pragma: no cover - the limit is below one standard report
        raise DemoError(f"the team's day granted research-1: {refused}")
    print(
        f"  research-1 (standard, subjects {TEAM}): reserve {estimate('standard'):,} tokens: "
        f"refused, {_refusal(refused)}",
        file=out,
    )
    async with pool.acquire() as conn:
        probe = conn.transaction()
        await probe.start()
        try:
            month = json.loads(
                await conn.fetchval(
                    "SELECT tokentrack.reserve($1, $2, $3::jsonb, '{}', 'standard')",
                    account,
                    uuid.uuid4(),
                    wanted,
                )
            )
        finally:
            await probe.rollback()
    if month["success"]:
        print(
            "  acme's month would allow it: the same reservation without the team's subject "
            f"is granted, {month['available_tokens']:,} tokens of the month to spare (rolled "
            "back)",
            file=out,
        )
    else:
        print(f"  acme's month would refuse it too: {_refusal(month)}", file=out)

    # research-2: reserves for its first steps, then extends mid-report for one more.
    report = uuid.uuid4()
    first = worst_case(RESEARCH_PLAN)
    granted = await _sql(
        pool, "reserve", account, report, json.dumps({"tokens": first}), [TEAM], "discovery"
    )
    if not granted["success"]:
        print(
            f"  research-2 (discovery, subjects {TEAM}): reserve {first:,} tokens: refused, "
            f"{_refusal(granted)} (earlier runs used the team's day)",
            file=out,
            flush=True,
        )
        return
    team = _team_window(granted, budget_id)
    print(
        f"  research-2 (discovery, subjects {TEAM}): reserve {first:,} tokens (the worst case "
        f"of {' and '.join(RESEARCH_PLAN)}): granted; the team's day has {team['available']:,} "
        "left",
        file=out,
        flush=True,
    )
    llm = FakeLLM(51, latency)
    overrun = []

    async def step(name: str) -> None:
        model, usage = await llm.complete(name)
        record = await tracker.record_step(report, account, name, usage, model)
        if record.answer.get("over_reservation"):
            overrun.append(name)

    for name in RESEARCH_PLAN:
        await step(name)
    more = worst_case((RESEARCH_EXTRA,))
    extended = await _sql(pool, "extend_reservation", report, account, json.dumps({"tokens": more}))
    if extended["success"]:
        team = _team_window(extended, budget_id)
        print(
            f"  mid-report research-2 adds {RESEARCH_EXTRA}: extend_reservation +{more:,} "
            f"tokens: granted, {extended['reserved_tokens']:,} reserved; the team's day has "
            f"{team['available']:,} left",
            file=out,
            flush=True,
        )
        await step(RESEARCH_EXTRA)
    else:
        print(
            f"  mid-report research-2 would add {RESEARCH_EXTRA}: extend_reservation +{more:,} "
            f"tokens: refused, {_refusal(extended)}; it completes without it",
            file=out,
            flush=True,
        )
    settled = await tracker.finish_report(report, account, "complete")
    verdict = (
        f"step {', '.join(overrun)} answered over_reservation"
        if overrun
        else "no step answered over_reservation"
    )
    print(
        f"  research-2 complete: billed {settled.billed_tokens:,} tokens, more than its first "
        f"estimate of {first:,}; {verdict}",
        file=out,
    )
    used = await pool.fetchval(
        "SELECT used FROM tokentrack.budget_windows"
        " WHERE account_id = $1 AND budget_id = $2 AND window_start = $3::text::timestamptz",
        account,
        uuid.UUID(budget_id),
        team["window_start"],
    )
    print(
        f"  {TEAM}'s day (from {team['window_start']}): {used:,} of {TEAM_DAY_LIMIT:,} tokens used",
        file=out,
        flush=True,
    )


def _print_table(table: list[list[str]], out: TextIO, right: set[int]) -> None:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        print("  ".join(cells).rstrip(), file=out)


async def run_demo(dsn: str, out: TextIO = sys.stdout, *, latency: float = 0.25) -> bool:
    """Run the scenario against ``dsn`` (installing the SQL when needed); print the table and
    reconcile's verdict; return whether reconcile is ok. Refuses (:class:`DemoError`) a
    database that holds accounts other than :data:`ACCOUNT_IDS`."""
    await _refuse_other_accounts(dsn)
    await _install(dsn, out)
    reports = scenario()
    try:
        pool = await asyncpg.create_pool(
            dsn, min_size=2, max_size=10, timeout=connection.connect_timeout()
        )
    except connection.DATABASE_ERRORS as exc:
        raise DemoError(f"cannot connect: {connection.failure_line(exc)}") from exc
    try:
        tracker = TokenTracker(pool)
        ids = ACCOUNT_IDS
        for name, limit in ACCOUNTS.items():
            await tracker.open_usage_period(ids[name], limit)
        await _set_prices(pool, out)
        await _label_reports(pool, reports, ids)
        budget = ", ".join(f"{name} {limit:,}" for name, limit in ACCOUNTS.items())
        print(f"accounts (token budgets): {budget}", file=out)
        print(
            f"running {len(reports)} reports on {len(ACCOUNTS)} accounts at once: globex-1 is "
            "cancelled from outside mid-run, globex-2 fails, initech-1 and initech-2 race for "
            "a budget that holds one",
            file=out,
            flush=True,
        )

        # The cancel button: another task, over a connection of its own.
        button_connection = await asyncpg.connect(dsn, timeout=connection.connect_timeout())
        button = TokenTracker(button_connection)
        cancel_now: dict[uuid.UUID, asyncio.Event] = {
            r.report_id: asyncio.Event() for r in reports if r.cancel_after is not None
        }

        def on_step(report: DemoReport, recorded: int) -> None:
            if report.cancel_after is not None and recorded == report.cancel_after:
                cancel_now[report.report_id].set()

        async def press_cancel(report: DemoReport) -> None:
            await cancel_now[report.report_id].wait()
            with contextlib.suppress(ReportFinalized):  # it ended before the button was pressed
                await button.cancel_report(report.report_id, ids[report.account])

        progress = Progress(out, len(reports))
        animation = asyncio.create_task(progress.animate())
        buttons = {
            asyncio.create_task(press_cancel(r)): r.report_id
            for r in reports
            if r.cancel_after is not None
        }
        interrupted = False
        try:
            # A TaskGroup (unlike gather) waits for every report when it is cancelled, so each
            # one has recorded its outcome before the demo goes on.
            async with asyncio.TaskGroup() as group:
                for r in reports:
                    group.create_task(
                        _generate(tracker, r, ids[r.account], progress, on_step, latency)
                    )
        except asyncio.CancelledError:
            interrupted = True
        finally:
            for task, report_id in buttons.items():  # reports that never got that far
                if not cancel_now[report_id].is_set():
                    task.cancel()
            await asyncio.gather(*buttons, return_exceptions=True)
            animation.cancel()
            await asyncio.gather(animation, return_exceptions=True)
            progress.finish()
            await button_connection.close()
        if interrupted:
            stopped = sum(r.outcome == "interrupted" for r in reports)
            print(
                f"interrupted: {stopped} running report(s) were marked cancelled and billed",
                file=out,
                flush=True,
            )

        print(file=out)
        table = await _table(pool, reports)
        _print_table(table, out, right={3, 4, 5})
        if any(row[5].endswith("*") for row in table[1:]):
            print(
                "*: the report has steps of a model without a price, not counted in its cost",
                file=out,
            )
        print(
            "cost: each report's costMicros, the sum of its steps' costs, each priced once when "
            "recorded (micros of the installation's currency; $ shown with 6 decimals)",
            file=out,
        )
        if not interrupted:
            print(file=out)
            try:
                await _budget_story(pool, tracker, out, latency)
            except connection.DATABASE_ERRORS as exc:
                raise DemoError(f"the budget story failed: {connection.failure_line(exc)}") from exc
        print(file=out)
        verdicts = [await tracker.reconcile(ids[name]) for name in ACCOUNTS]
        ok = all(v.ok for v in verdicts)
        periods = sum(v.periods_checked for v in verdicts)
        found = sum(len(v.discrepancies) for v in verdicts)
        print(
            f"reconcile: {'ok' if ok else 'FAILED'} ({len(ACCOUNTS)} accounts, {periods} periods "
            f"checked, {found} discrepancies)",
            file=out,
            flush=True,
        )
        if interrupted:
            raise asyncio.CancelledError
        return ok
    except TokenTrackError as exc:  # e.g. a role that may not call the functions, an outage
        raise DemoError(f"{type(exc).__name__}: {exc}") from exc
    except ExceptionGroup as group:  # a report's task failed with something it did not expect
        first = group.exceptions[0]
        raise DemoError(f"a report failed: {type(first).__name__}: {first}") from group
    finally:
        await asyncio.wait_for(pool.close(), timeout=10)


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Ctrl-C (even when the shell started us with SIGINT ignored), SIGTERM and SIGHUP all
    interrupt the demo as KeyboardInterrupt, so that its cleanup runs."""
    saved = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        saved[sig] = signal.signal(sig, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def main(database_url: str | None, out: TextIO = sys.stdout) -> int:
    """The ``tokentrack demo`` command: 0 when reconcile is ok, 1 when it is not.

    ``database_url`` is the ``--database-url`` of the command line; ``$DATABASE_URL`` is
    never used (one line says so when it is set)."""
    started = time.monotonic()
    if database_url:
        target = connection.describe_target(database_url)
        print(f"tokentrack demo: using the database given by --database-url ({target})", file=out)
        ok = asyncio.run(run_demo(database_url, out))
        return 0 if ok else 1
    if os.environ.get("DATABASE_URL"):
        print(
            "tokentrack demo: DATABASE_URL is ignored: the demo runs on a throwaway server "
            "(pass --database-url to use a database of your own)",
            file=out,
            flush=True,
        )
    with _terminate_as_interrupt():
        server = PostgresServer(settings=SERVER_SETTINGS, prefix="tokentrack-demo-")
        print(
            f"tokentrack demo: starting a throwaway PostgreSQL ({server.bindir}/postgres)",
            file=out,
            flush=True,
        )
        with server:
            print(
                f"tokentrack demo: PostgreSQL running in {server.base} on "
                f"{server.host}:{server.port}",
                file=out,
                flush=True,
            )
            try:
                ok = asyncio.run(run_demo(server.dsn(), out))
            finally:
                base = server.base
                server.stop()
                print(
                    f"tokentrack demo: stopped PostgreSQL and removed {base} "
                    f"({time.monotonic() - started:.1f} s in all)",
                    file=out,
                    flush=True,
                )
    return 0 if ok else 1
