"""Stress: the concurrent workload with faults, for as long as asked, then every invariant.

    python tests/support/stress.py --duration 60 --seed 1 [--workers 6] [--crash-every 20]
    make stress DURATION=600 SEED=42 [STRESS_ARGS="--crash-every 30"]

Starts its own PostgreSQL (``tokentrack_client.testing.PostgresServer``, with fsync,
synchronous_commit and full_page_writes on, so that an acknowledged commit is durable),
installs tokentrack with the migrator and the grant probe of tests/support/invariants.py, then runs
for ``--duration`` seconds:

- workers (two connections each) that reserve reports on a few accounts with tight limits
  (refusals are frequent; a refused worker sometimes opens a new period, racing the others),
  record steps (some retried, some sent twice at once, some with conflicting numbers),
  end reports with finish_report or finalize (sometimes both at once, sometimes twice),
  record late steps, call increment_usage, and abandon a quarter of their reports;
- budgets (``--no-budgets`` leaves them out): every account has a month, teams' days, keys'
  minutes, users' hours and a total in cost; most reservations go through reserve() with a
  team, a key and sometimes a user, and a cost estimate (explicit or priced by a model); a
  running report is sometimes extended (extend_reservation, racing the others' reservations);
  steps sometimes name a priced model; a worker refused by a budget sometimes raises its limit
  (set_budget, racing the others);
- a sweeper that moves the abandoned reservations into the past and runs
  ``cleanup_expired_reservations()`` or ``CALL sweep_expired_reservations(n)``, sometimes
  racing a finalize of the same report;
- faults: a killer that ``pg_terminate_backend``s a random busy worker or the sweeper; a
  locker that holds a random account's period lock while half the workers run with
  ``lock_timeout`` and the sweeper with ``statement_timeout``; with ``--crash-every N``, the
  whole server killed with SIGKILL every N seconds and restarted (crash recovery);
- a checker that runs the invariant checks every few seconds while all this goes on.

An interrupted call is retried when it is idempotent (reserve, persist, finalize, finish;
the retry may then find that the first attempt committed: existing, duplicate,
already_finalized) and counted as an unknown outcome otherwise (increment_usage). Every
answer is checked on the spot (codes, duplicate flags, billed_tokens = the report's
acknowledged steps; a grant's and an extension's budgets each hold what was asked and leave
nothing negative; an over_reservation answer's numbers add up). An interrupted extension is
not retried (it is not idempotent): an unknown outcome. At the end every reservation is
expired and swept, and: every step whose persist call was acknowledged is there with its
numbers, every acknowledged billing matches its reservation, increments are between the
acknowledged and the possible, and every invariant holds (7 included: the grant probe saw
every grant and extension within every budget window it holds, and every window's used is what
its reports were billed). One summary line, with the throughput; exit status 1 on any
violation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import traceback
import uuid
from collections.abc import Awaitable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from invariants import check_invariants, install_grant_probe
from tokentrack_client import migrate
from tokentrack_client.testing import DURABLE_SETTINGS, PostgresServer

TRANSIENT_SQLSTATES = {"57P01", "57P02", "57P03", "55P03", "57014"}
LIMIT = 3_000  # per period: a few reports fit, then reservations are refused
ESTIMATES = (50, 100, 200, 400)
# Every account's budgets: (subject, unit, window, limit). A refused worker raises a limit by
# RAISE (the day's, month's and total's fill up for good otherwise).
TEAMS = ("team:t0", "team:t1")
KEYS = ("key:k0", "key:k1", "key:k2")
USERS = ("user:u0", "user:u1")
BUDGETS: tuple[tuple[str | None, str, str, int], ...] = (
    (None, "tokens", "month", 15_000),
    (None, "cost_micros", "total", 60_000),
    *((team, "tokens", "day", 8_000) for team in TEAMS),
    *((key, "tokens", "minute", 4_000) for key in KEYS),
    *((user, "tokens", "hour", 6_000) for user in USERS),
)
RAISE = {"tokens": 5_000, "cost_micros": 20_000}
PRICED_MODEL = "model-x"  # 1 micro per input token, 3 per output token
EXTRAS = (25, 100, 300)
BUDGET_ESTIMATES = (300, 800, 1_500)  # reserve()'s: overrun stays the exception
STATUSES = ("complete", "failed", "cancelled")
CHECK_EVERY = 4.0


def transient(exc: BaseException) -> bool:
    """An interruption (fault) rather than an answer: the call may be retried."""
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        return state in TRANSIENT_SQLSTATES or state.startswith("08")
    # InternalClientError: asyncpg met the FATAL of a terminated idle backend mid-protocol
    # ("cannot switch to state 12; another operation (2) is in progress"); the connection
    # is closed by then.
    return isinstance(
        exc, asyncpg.InterfaceError | asyncpg.InternalClientError | OSError | TimeoutError
    )


@dataclass
class Config:
    duration: float
    seed: int
    workers: int = 6
    accounts: int = 4
    crash_every: float = 0.0  # 0: the server is never killed
    # Instead of a clock: crash after every ``crash_after_steps`` acknowledged steps, this
    # many times, then stop once as many more steps were acknowledged (duration: a bound).
    crashes: int = 0
    crash_after_steps: int = 150
    kill_backends: bool = True
    lock_faults: bool = True
    budgets: bool = True


@dataclass
class Stats:
    reports: int = 0
    granted: int = 0
    refused: int = 0
    periods_opened: int = 0
    steps: int = 0
    late_steps: int = 0
    duplicates: int = 0
    conflicts: int = 0
    retries: int = 0
    unknown: int = 0
    backends_killed: int = 0
    lock_timeouts: int = 0
    statement_timeouts: int = 0
    crashes: int = 0
    sweeps: int = 0
    checks: int = 0
    calls: int = 0
    budget_refused: int = 0
    refused_by_window: dict[str, int] = field(default_factory=dict)
    budget_raises: int = 0
    extensions: int = 0
    extensions_refused: int = 0
    over_reservations: int = 0

    @property
    def faults(self) -> int:
        return self.backends_killed + self.lock_timeouts + self.statement_timeouts + self.crashes


@dataclass
class Summary:
    seed: int
    duration: float
    stats: Stats
    violations: list[str]
    server_settings: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        s = self.stats
        return (
            f"stress seed={self.seed} duration={self.duration:.0f}s reports={s.reports}"
            f" steps={s.steps} late_steps={s.late_steps} duplicate_steps={s.duplicates}"
            f" step_conflicts={s.conflicts} reservations_granted={s.granted}"
            f" reservations_refused={s.refused} periods_opened={s.periods_opened}"
            f" retries={s.retries} unknown_outcomes={s.unknown} faults_injected={s.faults}"
            f" (backends_killed={s.backends_killed} lock_timeouts={s.lock_timeouts}"
            f" statement_timeouts={s.statement_timeouts} server_crashes={s.crashes})"
            f" sweeps={s.sweeps} checks={s.checks}"
            f" budget_refusals={s.budget_refused} ("
            + " ".join(f"{w}={n}" for w, n in sorted(s.refused_by_window.items()))
            + f") budget_raises={s.budget_raises}"
            f" extensions={s.extensions} extensions_refused={s.extensions_refused}"
            f" over_reservation_answers={s.over_reservations}"
            f" calls={s.calls} calls_per_s={s.calls / max(self.duration, 1e-9):.0f}"
            f" reports_per_s={s.reports / max(self.duration, 1e-9):.1f}"
            f" invariant_violations={len(self.violations)}"
        )


@dataclass
class Run:
    """Everything the tasks share: the server, the ledger of acknowledged answers, counters."""

    config: Config
    server: PostgresServer
    dsn: str
    accounts: list[uuid.UUID]
    stats: Stats = field(default_factory=Stats)
    violations: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    server_up: asyncio.Event = field(default_factory=asyncio.Event)
    step_done: asyncio.Event = field(default_factory=asyncio.Event)  # set at each acked step
    acked_steps: dict[tuple[uuid.UUID, str], tuple[int, int, int]] = field(default_factory=dict)
    acked_billing: dict[uuid.UUID, int] = field(default_factory=dict)
    grants: list[dict[str, Any]] = field(default_factory=list)
    extensions: list[dict[str, Any]] = field(default_factory=list)  # granted extensions
    limits: dict[tuple[uuid.UUID, str | None, str, str], int] = field(default_factory=dict)
    increments: list[int] = field(default_factory=list)  # acknowledged tokens
    unknown_increments: list[int] = field(default_factory=list)
    abandoned: list[tuple[uuid.UUID, uuid.UUID]] = field(default_factory=list)

    def violation(self, text: str) -> None:
        self.violations.append(text)

    async def connect(self, name: str, **settings: str) -> asyncpg.Connection:
        """A connection, waiting for the server to come back when it was killed."""
        for attempt in range(200):
            await self.server_up.wait()
            try:
                return await asyncpg.connect(
                    self.dsn, timeout=10, server_settings={"application_name": name, **settings}
                )
            except Exception as exc:
                if not transient(exc) and not isinstance(exc, asyncpg.CannotConnectNowError):
                    raise
                # The crasher may not have cleared server_up yet, or recovery is finishing.
                await asyncio.sleep(0.01 * min(attempt + 1, 20))
        raise RuntimeError(f"{name}: could not reconnect")


class Link:
    """One connection that comes back after a fault, and calls that retry through faults."""

    def __init__(self, run: Run, name: str, **settings: str) -> None:
        self.run, self.name, self.settings = run, name, settings
        self.conn: asyncpg.Connection | None = None

    async def get(self) -> asyncpg.Connection:
        if self.conn is None or self.conn.is_closed():
            self.conn = await self.run.connect(self.name, **self.settings)
        return self.conn

    def note(self, exc: BaseException) -> None:
        state = getattr(exc, "sqlstate", "")
        if state == "55P03":
            self.run.stats.lock_timeouts += 1
        elif state == "57014":
            self.run.stats.statement_timeouts += 1
        if self.conn is not None and (state not in {"55P03", "57014"}):
            self.conn.terminate()
            self.conn = None

    async def call(
        self, function: str, *args: Any, retry: bool = True
    ) -> tuple[dict[str, Any] | None, bool]:
        """(answer, uncertain): uncertain when an earlier attempt may have committed.
        Without ``retry``, an interrupted call answers (None, True)."""
        placeholders = ", ".join(f"${i}" for i in range(1, len(args) + 1))
        sql = f"SELECT tokentrack.{function}({placeholders})::text"
        uncertain = False
        while True:
            try:
                conn = await self.get()
                answer = json.loads(await conn.fetchval(sql, *args))
                self.run.stats.calls += 1
                return answer, uncertain
            except Exception as exc:
                if not transient(exc):
                    raise
                self.note(exc)
                if not retry:
                    return None, True
                uncertain = uncertain or getattr(exc, "sqlstate", "") not in {"55P03"}
                self.run.stats.retries += 1

    async def execute(self, sql: str, *args: Any) -> bool:
        """Run a statement once; False when a fault interrupted it."""
        try:
            conn = await self.get()
            await conn.execute(sql, *args)
            return True
        except Exception as exc:
            if not transient(exc):
                raise
            self.note(exc)
            return False

    async def close(self) -> None:
        if self.conn is not None and not self.conn.is_closed():
            with suppress(Exception):
                await asyncio.wait_for(self.conn.close(), 5)


def new_uuid(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


class Worker:
    def __init__(self, run: Run, number: int) -> None:
        self.run = run
        self.rng = random.Random(run.config.seed * 1_000 + number)
        timeouts = {"lock_timeout": "30ms"} if run.config.lock_faults and number % 2 else {}
        self.main = Link(run, f"tt-stress-worker-{number}", **timeouts)
        self.side = Link(run, f"tt-stress-worker-{number}-side")

    def expect(self, ok: bool, what: str, answer: Any) -> None:
        if not ok:
            self.run.violation(f"{what}: {answer}")

    async def loop(self) -> None:
        try:
            while not self.run.stop.is_set():
                await self.one_report()
        finally:
            await self.main.close()
            await self.side.close()

    async def reserve(
        self, account: uuid.UUID, report: uuid.UUID, estimate: int
    ) -> tuple[dict[str, Any] | None, bool]:
        """try_reserve_tokens, or (with budgets, mostly) reserve with subjects, a cost
        estimate and a mode."""
        rng = self.rng
        if not self.run.config.budgets or rng.random() < 0.2:
            return await self.main.call("try_reserve_tokens", account, report, estimate)
        estimate = rng.choice(BUDGET_ESTIMATES)
        subjects = [rng.choice(TEAMS), rng.choice(KEYS)]
        if rng.random() < 0.3:
            subjects.append(rng.choice(USERS))
        return await self.main.call(
            "reserve",
            account,
            report,
            json.dumps({"tokens": estimate, **self.cost_estimate()}),
            subjects,
            rng.choice(("standard", "dd", "discovery", "hybrid")),
        )

    def cost_estimate(self) -> dict[str, Any]:
        dice = self.rng.random()
        if dice < 0.3:
            return {}
        if dice < 0.6:
            return {"model": PRICED_MODEL}
        return {"cost_micros": self.rng.randint(0, 900)}

    def check_budgets(self, what: str, answer: dict[str, Any]) -> None:
        """A grant's or an extension's budgets: each keeps something, none overcommitted."""
        for entry in answer.get("budgets") or ():
            self.expect(entry["available"] >= 0 and entry["held"] >= 0, what, answer)

    async def refused_by_budget(self, account: uuid.UUID, answer: dict[str, Any]) -> None:
        """Sometimes raise the budget that refused (racing the other workers)."""
        run = self.run
        run.stats.budget_refused += 1
        window = run.stats.refused_by_window
        window[answer["window"]] = window.get(answer["window"], 0) + 1
        self.expect(
            answer["available"] < answer["requested"] or answer["available"] == 0,
            "budget refusal",
            answer,
        )
        if self.rng.random() >= 0.3:
            return
        kind = (account, answer["subject"], answer["unit"], answer["window"])
        run.limits[kind] += RAISE[answer["unit"]]
        raised, _ = await self.main.call(
            "set_budget", account, kind[1], kind[2], kind[3], run.limits[kind], "{}"
        )
        self.expect(bool(raised and raised["success"]), "set_budget", raised)
        run.stats.budget_raises += 1

    async def one_report(self) -> None:
        run, rng = self.run, self.rng
        account = rng.choice(run.accounts)
        report = new_uuid(rng)
        estimate = rng.choice(ESTIMATES)
        answer, uncertain = await self.reserve(account, report, estimate)
        assert answer is not None
        if not answer["success"]:
            # Every account always has an active period: only a budget may refuse.
            error = answer["error"]
            self.expect(error in ("insufficient_tokens", "insufficient_budget"), "refused", answer)
            run.stats.refused += 1
            if error == "insufficient_budget":
                await self.refused_by_budget(account, answer)
            elif rng.random() < 0.3:
                opened, _ = await self.main.call("open_usage_period", account, LIMIT, None)
                self.expect(bool(opened and opened["success"]), "open_usage_period", opened)
                run.stats.periods_opened += 1
            await self.maybe_increment(account)
            return
        self.expect(answer["available_tokens"] >= 0, "grant overcommits", answer)
        self.expect(uncertain or not answer["existing"], "new report answered existing", answer)
        if not answer["existing"]:
            run.grants.append(answer)
            self.check_budgets("grant", answer)
        run.stats.granted += 1
        run.stats.reports += 1

        totals = 0
        steps = rng.randint(0, 4)
        extend_after = rng.randint(0, steps) if run.config.budgets and rng.random() < 0.3 else -1
        for n in range(steps + 1):
            if n == extend_after:
                await self.extend(report, account)
            if n < steps:
                totals += await self.persist(report, account, f"step-{n}", late=False)
        ending = rng.random()
        if ending < 0.25:
            run.abandoned.append((report, account))
        else:
            await self.end(report, account, totals, use_finish=ending > 0.4)
            if rng.random() < 0.2:
                await self.persist(report, account, "late-step", late=True)
        await self.maybe_increment(account)

    async def extend(self, report: uuid.UUID, account: uuid.UUID) -> None:
        """Raise the running report's reservation (not retried: not idempotent)."""
        run = self.run
        more = {"tokens": self.rng.choice(EXTRAS), **self.cost_estimate()}
        answer, _ = await self.main.call(
            "extend_reservation", report, account, json.dumps(more), retry=False
        )
        if answer is None:
            run.stats.unknown += 1
        elif answer["success"]:
            self.expect(answer["available_tokens"] >= 0, "extension overcommits", answer)
            self.check_budgets("extension", answer)
            run.extensions.append(answer)
            run.stats.extensions += 1
        else:
            error = answer["error"]
            self.expect(error in ("insufficient_tokens", "insufficient_budget"), "extend", answer)
            run.stats.extensions_refused += 1
            if error == "insufficient_budget":
                await self.refused_by_budget(account, answer)

    async def persist(self, report: uuid.UUID, account: uuid.UUID, name: str, late: bool) -> int:
        run, rng = self.run, self.rng
        inp, out = rng.randint(0, 400), rng.randint(0, 200)
        total = None if rng.random() < 0.7 else inp + out + rng.randint(0, 50)
        numbers = (inp, out, inp + out if total is None else total)
        model = PRICED_MODEL if run.config.budgets and rng.random() < 0.5 else None
        args = (report, account, name, inp, out, total, model)
        if rng.random() < 0.15:  # the same step sent twice at once (a racing retry)
            (first, u1), (second, u2) = await asyncio.gather(
                self.main.call("persist_step_usage", *args),
                self.side.call("persist_step_usage", *args),
            )
            answers = [first, second]
            if not (u1 or u2):
                flags = sorted(bool(a and a["duplicate"]) for a in answers)
                self.expect(flags == [False, True], "racing duplicates", answers)
            run.stats.duplicates += 1
        else:
            first, u1 = await self.main.call("persist_step_usage", *args)
            answers = [first]
            self.expect(bool(first) and (u1 or not first["duplicate"]), "first persist", first)
        for answer in answers:
            ok = bool(answer and answer["success"] and answer["total_tokens"] == numbers[2])
            self.expect(ok and answer is not None and answer["late"] is late, "persist", answer)
            self.check_overrun(answer)
        run.acked_steps[(report, name)] = numbers
        run.stats.steps += 1
        run.step_done.set()
        run.stats.late_steps += int(late)
        if rng.random() < 0.1:  # a retry with the same numbers
            again, _ = await self.main.call("persist_step_usage", *args)
            self.expect(bool(again and again["duplicate"]), "retried persist", again)
            run.stats.duplicates += 1
        if rng.random() < 0.05:  # a retry with other numbers: refused, the first stands
            clash, _ = await self.main.call(
                "persist_step_usage", report, account, name, inp + 1, out, None, None
            )
            self.expect(bool(clash and clash.get("error") == "step_conflict"), "conflict", clash)
            run.stats.conflicts += 1
        return numbers[2]

    def check_overrun(self, answer: dict[str, Any] | None) -> None:
        """An over_reservation answer's numbers add up."""
        if answer and answer.get("over_reservation"):
            self.run.stats.over_reservations += 1
            over, recorded = answer["over_by"], answer["recorded_tokens"]
            ok = over > 0 and over == recorded - answer["reserved_tokens"]
            self.expect(ok, "over_reservation", answer)

    async def end(
        self, report: uuid.UUID, account: uuid.UUID, totals: int, use_finish: bool
    ) -> None:
        """End the report (finish_report or finalize), sometimes twice at once, sometimes while
        one more step is still being recorded (it is then billed with the report or late)."""
        run, rng = self.run, self.rng
        status = rng.choice(STATUSES)
        calls: list[Awaitable[tuple[dict[str, Any] | None, bool]]] = []
        if use_finish:
            calls.append(self.main.call("finish_report", report, account, status, None))
        else:
            calls.append(self.main.call("finalize_report_usage", report, account))
        racing_step = None
        dice = rng.random()
        if dice < 0.25:  # a step in flight while the report is ended (a cancel button)
            inp, out = rng.randint(0, 400), rng.randint(0, 200)
            racing_step = (report, account, "in-flight", inp, out, None, None)
            calls.append(self.side.call("persist_step_usage", *racing_step))
        elif dice < 0.45:  # finalize racing the end (a second process finishing it)
            calls.append(self.side.call("finalize_report_usage", report, account))
        results = list(await asyncio.gather(*calls))
        if racing_step is not None:
            (step, _), inp, out = results.pop(), racing_step[3], racing_step[4]
            ok = bool(step and step["success"] and step["total_tokens"] == inp + out)
            self.expect(ok, "step racing the end of its report", step)
            if step and ok:
                run.acked_steps[(report, "in-flight")] = (inp, out, inp + out)
                run.stats.steps += 1
                run.step_done.set()
                run.stats.late_steps += int(step["late"])
                self.check_overrun(step)
                if not step["late"]:  # recorded before the billing: billed with the report
                    totals += inp + out
        if rng.random() < 0.15:  # a plain retry of the end
            results.append(await self.main.call("finalize_report_usage", report, account))
        firsts = 0
        for answer, _ in results:
            ok = bool(answer and answer["success"] and answer["billed_tokens"] == totals)
            self.expect(ok, f"billing of a report whose steps total {totals}", answer)
            firsts += int(bool(answer) and not answer["already_finalized"])  # type: ignore[index]
        if not any(uncertain for _, uncertain in results):
            self.expect(firsts == 1, "billed by exactly one call", results)
        run.acked_billing[report] = totals

    async def maybe_increment(self, account: uuid.UUID) -> None:
        if self.rng.random() < 0.1:
            tokens = self.rng.randint(0, 300)
            answer, _ = await self.main.call(
                "increment_usage", account, tokens, self.rng.random() < 0.5, False, retry=False
            )
            if answer is None:
                self.run.unknown_increments.append(tokens)
                self.run.stats.unknown += 1
            elif answer["success"]:
                self.run.increments.append(tokens)
            else:
                self.expect(False, "increment_usage", answer)


async def sweeper(run: Run) -> None:
    rng = random.Random(run.config.seed * 7 + 1)
    timeouts = {"statement_timeout": "80ms"} if run.config.lock_faults else {}
    link = Link(run, "tt-stress-sweeper", **timeouts)
    finisher = Link(run, "tt-stress-sweeper-finisher")
    try:
        while not run.stop.is_set():
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            due, run.abandoned = run.abandoned, []
            if due:
                moved = await link.execute(
                    "UPDATE tokentrack.report_reservations"
                    " SET created_at = now() - interval '3 hours',"
                    " expires_at = now() - interval '1 hour' WHERE report_id = ANY($1::uuid[])",
                    [report for report, _ in due],
                )
                if not moved:
                    run.abandoned.extend(due)
                    continue
            work: list[Awaitable[Any]] = []
            if rng.random() < 0.5:
                work.append(link.call("cleanup_expired_reservations", retry=False))
            else:
                work.append(
                    link.execute(
                        f"CALL tokentrack.sweep_expired_reservations({rng.randint(1, 20)})"
                    )
                )
            if due and rng.random() < 0.3:  # a late finalize racing the sweep
                report, account = rng.choice(due)
                work.append(finisher.call("finalize_report_usage", report, account))
            await asyncio.gather(*work)
            run.stats.sweeps += 1
    finally:
        await link.close()
        await finisher.close()


async def killer(run: Run) -> None:
    rng = random.Random(run.config.seed * 7 + 2)
    link = Link(run, "tt-stress-killer")
    try:
        while not run.stop.is_set():
            await asyncio.sleep(rng.uniform(0.02, 0.25))
            try:
                conn = await link.get()
                pids = await conn.fetch(
                    "SELECT pid FROM pg_stat_activity"
                    " WHERE application_name LIKE 'tt-stress-worker%'"
                    "    OR application_name = 'tt-stress-sweeper'"
                    " ORDER BY state = 'active' DESC, pid"
                )
                if not pids:
                    continue
                busy = pids[: max(1, len(pids) // 2)]
                pid = rng.choice(busy)["pid"]
                if await conn.fetchval("SELECT pg_terminate_backend($1)", pid):
                    run.stats.backends_killed += 1
            except Exception as exc:
                if not transient(exc):
                    raise
                link.note(exc)
    finally:
        await link.close()


async def locker(run: Run) -> None:
    """Holds a random account's period lock for a moment: lock_timeout / statement_timeout."""
    rng = random.Random(run.config.seed * 7 + 3)
    link = Link(run, "tt-stress-locker")
    try:
        while not run.stop.is_set():
            await asyncio.sleep(rng.uniform(0.05, 0.4))
            try:
                conn = await link.get()
                async with conn.transaction():
                    await conn.execute(
                        "SELECT FROM tokentrack.usage_periods"
                        " WHERE account_id = $1 AND status = 'active' FOR UPDATE",
                        rng.choice(run.accounts),
                    )
                    await asyncio.sleep(rng.uniform(0.05, 0.15))
            except Exception as exc:
                if not transient(exc):
                    raise
                link.note(exc)
    finally:
        await link.close()


async def crash(run: Run) -> None:
    """SIGKILL every server process, restart the server (crash recovery), reconnect."""
    run.server_up.clear()
    await asyncio.to_thread(run.server.kill)
    run.stats.crashes += 1
    await asyncio.to_thread(run.server.restart)
    run.server_up.set()


async def crasher(run: Run) -> None:
    """Crash every ``crash_every`` seconds."""
    while not run.stop.is_set():
        with suppress(TimeoutError):
            await asyncio.wait_for(run.stop.wait(), run.config.crash_every)
        if run.stop.is_set():
            return
        await crash(run)


async def counted_crasher(run: Run) -> None:
    """Crash ``crashes`` times, each after ``crash_after_steps`` more acknowledged steps
    (progress, not time), then end the run after as many steps again."""

    async def progress() -> None:
        target = run.stats.steps + run.config.crash_after_steps
        while run.stats.steps < target and not run.stop.is_set():
            run.step_done.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(run.step_done.wait(), 1.0)

    for _ in range(run.config.crashes):
        await progress()
        if run.stop.is_set():
            return
        await crash(run)
    await progress()
    run.stop.set()


async def checker(run: Run) -> None:
    link = Link(run, "tt-stress-checker")
    try:
        while not run.stop.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(run.stop.wait(), CHECK_EVERY)
            try:
                found = await check_invariants(
                    await link.get(), grants=list(run.grants), extensions=list(run.extensions)
                )
            except Exception as exc:
                if not transient(exc):
                    raise
                link.note(exc)
                continue
            run.stats.checks += 1
            for text in found:
                run.violation(f"during the run: {text}")
    finally:
        await link.close()


async def settle_and_verify(run: Run) -> None:
    """After the workload: bill everything, then compare the database with what was acked."""
    conn = await run.connect("tt-stress-final")
    try:
        await conn.execute(
            "UPDATE tokentrack.report_reservations SET created_at = now() - interval '3 hours',"
            " expires_at = now() - interval '1 hour' WHERE status = 'active'"
        )
        await conn.execute("CALL tokentrack.sweep_expired_reservations(100)")
        await conn.fetchval("SELECT tokentrack.cleanup_expired_reservations()")

        rows = await conn.fetch(
            "SELECT report_id, step_name, input_tokens, output_tokens, total_tokens"
            " FROM tokentrack.report_step_usage"
        )
        stored = {(r["report_id"], r["step_name"]): tuple(r)[2:] for r in rows}
        lost = [key for key, numbers in run.acked_steps.items() if stored.get(key) != numbers]
        if lost:
            run.violation(f"{len(lost)} acknowledged step(s) missing or changed: {lost[:5]}")

        billed = dict(
            await conn.fetch(
                "SELECT report_id, billed_tokens FROM tokentrack.report_reservations"
                " WHERE status = 'completed'"
            )
        )
        wrong = [
            (report, tokens, billed.get(report))
            for report, tokens in run.acked_billing.items()
            if billed.get(report) != tokens
        ]
        if wrong:
            run.violation(f"{len(wrong)} acknowledged billing(s) differ: {wrong[:5]}")

        count, total = await conn.fetchrow(
            "SELECT count(*), COALESCE(sum(tokens), 0) FROM tokentrack.usage_ledger"
            " WHERE kind = 'increment'"
        )
        low, high = len(run.increments), len(run.increments) + len(run.unknown_increments)
        if not low <= count <= high:
            run.violation(f"increment_usage rows {count} not within [{low}, {high}]")
        low_t = sum(run.increments)
        if not low_t <= total <= low_t + sum(run.unknown_increments):
            run.violation(f"increment_usage tokens {total} not within the acknowledged range")

        for text in await check_invariants(
            conn, settled=True, swept=True, grants=run.grants, extensions=run.extensions
        ):
            run.violation(text)
    finally:
        await conn.close()


async def run_stress(config: Config, server: PostgresServer) -> Summary:
    """The whole stress run against ``server`` (killed and restarted when crash_every)."""
    dsn = await server.create_database(f"tt_stress_{uuid.uuid4().hex[:8]}")
    await migrate.install(dsn)
    rng = random.Random(config.seed)
    accounts = [new_uuid(rng) for _ in range(config.accounts)]
    conn = await asyncpg.connect(dsn)
    try:
        await install_grant_probe(conn)
        server_settings = dict(
            await conn.fetch(
                "SELECT name, setting FROM pg_settings"
                " WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes')"
            )
        )
        for account in accounts:
            await conn.fetchval("SELECT tokentrack.open_usage_period($1, $2, NULL)", account, LIMIT)
        limits: dict[tuple[uuid.UUID, str | None, str, str], int] = {}
        if config.budgets:
            await conn.fetchval(
                "SELECT tokentrack.set_model_price($1, $2)",
                PRICED_MODEL,
                json.dumps({"input": 1_000_000, "output": 3_000_000}),
            )
            for account in accounts:
                for subject, unit, window, limit in BUDGETS:
                    await conn.fetchval(
                        "SELECT tokentrack.set_budget($1, $2, $3, $4, $5, '{}')",
                        account,
                        subject,
                        unit,
                        window,
                        limit,
                    )
                    limits[(account, subject, unit, window)] = limit
    finally:
        await conn.close()

    run = Run(config, server, dsn, accounts, limits=limits)
    run.server_up.set()
    started = time.monotonic()
    workers = [asyncio.create_task(Worker(run, n).loop()) for n in range(config.workers)]
    helpers = [asyncio.create_task(sweeper(run)), asyncio.create_task(checker(run))]
    faults: list[asyncio.Task[None]] = []
    if config.kill_backends:
        faults.append(asyncio.create_task(killer(run)))
    if config.lock_faults:
        faults.append(asyncio.create_task(locker(run)))
    if config.crash_every > 0:
        faults.append(asyncio.create_task(crasher(run)))
    if config.crashes > 0:
        faults.append(asyncio.create_task(counted_crasher(run)))
    try:
        with suppress(TimeoutError):
            await asyncio.wait_for(run.stop.wait(), config.duration)
    finally:
        run.stop.set()
        errors = await asyncio.gather(*faults, *workers, *helpers, return_exceptions=True)
    for error in errors:
        if isinstance(error, BaseException):
            where = "".join(f for f in traceback.format_exception(error) if "tests/" in f)
            run.violation(f"a task failed: {type(error).__name__}: {error}\n{where}")
    run.server_up.set()
    await settle_and_verify(run)
    return Summary(
        config.seed, time.monotonic() - started, run.stats, run.violations, server_settings
    )


def run_with_own_server(config: Config) -> Summary:
    with PostgresServer(settings=DURABLE_SETTINGS) as server:
        return asyncio.run(run_stress(config, server))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of workload")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--accounts", type=int, default=4)
    parser.add_argument(
        "--crash-every", type=float, default=0.0, help="SIGKILL the server every N seconds"
    )
    parser.add_argument("--no-backend-kills", action="store_true")
    parser.add_argument("--no-lock-faults", action="store_true")
    parser.add_argument("--no-budgets", action="store_true", help="Part 1's workload alone")
    args = parser.parse_args(argv)
    config = Config(
        duration=args.duration,
        seed=args.seed,
        workers=args.workers,
        accounts=args.accounts,
        crash_every=args.crash_every,
        kill_backends=not args.no_backend_kills,
        lock_faults=not args.no_lock_faults,
        budgets=not args.no_budgets,
    )
    summary = run_with_own_server(config)
    print(summary.line(), flush=True)
    for text in summary.violations[:50]:
        print(f"  violation: {text}", flush=True)
    return 1 if summary.violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
