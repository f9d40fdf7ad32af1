"""The workloads in database bench: what one transaction of each does, how the spread and
the hot accounts are addressed, and one pgbench run with everything measured around it
(and checked: no refusal is counted as throughput)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Collection
from typing import Any

import asyncpg
import measure
from server import BENCH_DIR, LIMIT, Session, log

SCRIPTS = BENCH_DIR / "scripts"
STEPS = (  # one report's steps: name, input tokens, output tokens
    ("AN0", 1800, 420),
    ("AN1.5", 2400, 610),
    ("AN1.7", 2100, 380),
    ("AN2", 3200, 900),
    ("AN3", 2800, 750),
    ("AN4", 1500, 500),
    ("AN5", 900, 1200),
)

# The price the benchmark sets for the model its steps name (micros per million tokens, each
# class given), so that every step workload prices its steps.
MODEL = "gpt-4o"
PRICE = '{"input": 2500000, "cached_input": 1250000, "output": 10000000, "reasoning": 10000000}'

# The version the main branch is at (before budgets): reserve-main runs reserve.sql on a
# database rolled back to it, so that try_reserve_tokens before and after budgets are measured
# in the same run, interleaved.
MAIN_VERSION = "20261203000000"
MAIN_DATABASE = "bench_main"
# The budget accounts (bench.seed_budget_accounts): account BUDGET_ACCOUNTS + n, n as the plain
# accounts (0 hot, 1..--accounts spread), each with three budgets.
BUDGET_ACCOUNTS = 1_000_000
# The version before the refusal counters (20261213000000): reserve-before and refuse-before
# run in database bench_budgets, tokentrack rolled back to it, next to reserve and refuse.
BEFORE_METRICS_VERSION = "20261210000000"
BEFORE_METRICS_DATABASE = "bench_budgets"
# refuse and refuse-before address accounts that do not exist (account_not_found).
MISSING_ACCOUNTS = 900_000_000

# The version before this round's write path (issue #16): each workload of BASELINED also
# runs as "<workload>@baseline" in database bench_baseline, tokentrack rolled back to
# --baseline (this version by default), next to the workload itself in every round, so that
# the table of before and after compares runs seconds apart on one server.
BASELINE_VERSION = "20261213000000"
BASELINE_DATABASE = "bench_baseline"
BASELINE = "@baseline"
BASELINED = ("reserve", "reserve-budgets", "extend", "step", "record-step", "finalize", "lifecycle")

# Run only when --workloads names them: the comparisons with the version before the refusal
# counters (issue #15's question, answered in bench/results/metrics.md).
OPT_IN = ("reserve-before", "refuse-before")

# What one transaction of each workload is: its pgbench script, how many calls it makes, and
# the database it runs in (bench unless said).
WORKLOADS: dict[str, dict[str, Any]] = {
    "simple-update": {"script": None, "calls": 1},
    "reserve": {"script": "reserve.sql", "calls": 2},
    "reserve-budgets": {"script": "reserve_budgets.sql", "calls": 2},
    "reserve-main": {"script": "reserve.sql", "calls": 2, "database": MAIN_DATABASE},
    "reserve-before": {"script": "reserve.sql", "calls": 2, "database": BEFORE_METRICS_DATABASE},
    "refuse": {"script": "refuse.sql", "calls": 1},
    "refuse-before": {"script": "refuse.sql", "calls": 1, "database": BEFORE_METRICS_DATABASE},
    "step": {"script": "step.sql", "calls": 1},
    "record-step": {"script": "record_step.sql", "calls": 1},
    "finalize": {"script": "finalize.sql", "calls": 1},
    "extend": {"script": "extend.sql", "calls": 3},
    "lifecycle": {"script": "lifecycle.sql", "calls": 9},
}
for _name in BASELINED:
    WORKLOADS[_name + BASELINE] = {**WORKLOADS[_name], "database": BASELINE_DATABASE}


def base_name(workload: str) -> str:
    """The workload a "<workload>@baseline" runs (the name itself for the others)."""
    return workload.removesuffix(BASELINE)


# One round: each workload on the spread accounts and on the hot one, after simple-update.
# The workloads of a group run next to each other, so that their ratios compare runs seconds
# apart: step (persist_step_usage) and record-step (record_step); reserve (try_reserve_tokens),
# reserve-budgets (reserve with three budgets) and reserve-main (main's try_reserve_tokens).
# round_order() rotates each group from round to round, so that none always runs first.
ORDER = [
    ("simple-update", "-"),
    ("reserve", "spread"),
    ("reserve-budgets", "spread"),
    ("reserve-main", "spread"),
    ("reserve-before", "spread"),
    ("reserve", "hot"),
    ("reserve-budgets", "hot"),
    ("reserve-main", "hot"),
    ("reserve-before", "hot"),
    ("refuse", "spread"),
    ("refuse-before", "spread"),
    ("refuse", "hot"),
    ("refuse-before", "hot"),
    ("step", "spread"),
    ("record-step", "spread"),
    ("step", "hot"),
    ("record-step", "hot"),
    ("extend", "spread"),
    ("extend", "hot"),
    ("lifecycle", "spread"),
    ("lifecycle", "hot"),
    ("finalize", "spread"),
    ("finalize", "hot"),
]
# Each baselined workload's "@baseline" run right after it (round_order() turns them).
ORDER = [
    entry
    for workload, mode in ORDER
    for entry in (
        [(workload, mode), (workload + BASELINE, mode)]
        if workload in BASELINED
        else [(workload, mode)]
    )
]
GROUPS = (
    ("step", "record-step", "step" + BASELINE, "record-step" + BASELINE),
    (
        "reserve",
        "reserve-budgets",
        "reserve-main",
        "reserve-before",
        "reserve" + BASELINE,
        "reserve-budgets" + BASELINE,
    ),
    ("refuse", "refuse-before"),
    ("extend", "extend" + BASELINE),
    ("lifecycle", "lifecycle" + BASELINE),
    ("finalize", "finalize" + BASELINE),
)


def round_order(round_no: int, only: Collection[str] | None = None) -> list[tuple[str, str]]:
    """ORDER for round ``round_no``, each group rotated by round_no - 1 places: in even rounds
    record-step runs before step (so that neither always runs second, on the reports the other
    has just grown), and each of the reserve group runs first once in three rounds; ``only``
    (the --workloads option) keeps those workloads and simple-update."""
    order = list(ORDER)
    for group in GROUPS:
        shift = (round_no - 1) % len(group)
        turned = group[shift:] + group[:shift]
        for mode in ("spread", "hot"):
            places = sorted(order.index((w, mode)) for w in group)
            for place, workload in zip(places, turned, strict=True):
                order[place] = (workload, mode)
    return [(w, m) for w, m in order if only is None or w == "simple-update" or w in only]


def selected(args: Any, workload: str) -> bool:
    """Whether --workloads (None: all) runs ``workload``."""
    return args.workloads is None or workload in args.workloads


def account(n: int) -> uuid.UUID:
    """bench.account(n): 0 is the hot account, 1..1000 the spread ones."""
    return uuid.UUID(f"00000000-0000-0000-0000-{n:012d}")


class Workloads:
    """Database bench (pgbench's tables and tokentrack's) and the pgbench runs on it."""

    def __init__(
        self, session: Session, bench: asyncpg.Connection, main: asyncpg.Connection | None
    ) -> None:
        self.session = session
        self.args = session.args
        self.bench = bench
        self.main = main
        self.databases = {"bench": bench} | ({MAIN_DATABASE: main} if main else {})
        self.before: asyncpg.Connection | None = None
        self.finalize_next = 1
        self.tps_seen: dict[tuple[str, str], float] = {}

    @classmethod
    async def setup(cls, session: Session) -> Workloads:
        log("setup: database bench, pgbench -i (scale 1), tokentrack, 1,001 accounts")
        bench = await session.create_database("bench")
        init = await asyncio.create_subprocess_exec(
            *session.pg_args(),
            "-i",
            "-q",
            "-s",
            "1",
            "bench",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=session.pg_env(),
        )
        _, err = await init.communicate()
        if init.returncode != 0:
            raise RuntimeError(f"pgbench -i failed: {err.decode()}")
        await cls.seed(session, bench, budgets=selected(session.args, "reserve-budgets"))
        main = None
        if selected(session.args, "reserve-main"):
            log(f"setup: database {MAIN_DATABASE}, tokentrack rolled back to {MAIN_VERSION}")
            main = await session.create_database(MAIN_DATABASE, rollback_to=MAIN_VERSION)
            await main.execute("SELECT bench.seed_long_lived(0, 0, $1)", session.args.hot_reports)
            await main.execute("VACUUM ANALYZE")
        made = cls(session, bench, main)
        if any(selected(session.args, w + BASELINE) for w in BASELINED):
            version = session.args.baseline
            log(f"setup: database {BASELINE_DATABASE}, tokentrack rolled back to {version}")
            baseline = await session.create_database(BASELINE_DATABASE, rollback_to=version)
            budgets = selected(session.args, "reserve-budgets" + BASELINE)
            await cls.seed(session, baseline, budgets=budgets)
            made.databases[BASELINE_DATABASE] = baseline
        if selected(session.args, "reserve-before") or selected(session.args, "refuse-before"):
            log(
                f"setup: database {BEFORE_METRICS_DATABASE}, tokentrack rolled back to "
                f"{BEFORE_METRICS_VERSION} (before the refusal counters)"
            )
            before = await session.create_database(
                BEFORE_METRICS_DATABASE, rollback_to=BEFORE_METRICS_VERSION
            )
            await before.execute("SELECT bench.seed_long_lived(0, 0, $1)", session.args.hot_reports)
            await before.execute("VACUUM ANALYZE")
            made.before = before
            made.databases[BEFORE_METRICS_DATABASE] = before
        return made

    @staticmethod
    async def seed(session: Session, conn: asyncpg.Connection, *, budgets: bool) -> None:
        """The hot account's long-lived reports, the model's price and (``budgets``) the
        budget accounts, in database bench or one that runs its workloads at another
        version (bench_baseline)."""
        await conn.execute("SELECT bench.seed_long_lived(0, 0, $1)", session.args.hot_reports)
        # As the schema owner (the server's superuser): set_model_price is the owner's.
        await conn.execute("SELECT tokentrack.set_model_price($1, $2::jsonb)", MODEL, PRICE)
        if budgets:
            log(f"setup: {session.args.accounts + 1:,} budget accounts, three budgets each")
            await conn.execute(
                "SELECT bench.seed_budget_accounts($1, $2, $3, $4)",
                BUDGET_ACCOUNTS,
                session.args.accounts,
                LIMIT,
                session.args.hot_reports,
            )
        await conn.execute("VACUUM ANALYZE")

    async def close(self) -> None:
        for conn in self.databases.values():
            await conn.close()

    def defines(self, mode: str, workload: str = "") -> dict[str, int]:
        workload = base_name(workload)
        offset = BUDGET_ACCOUNTS if workload == "reserve-budgets" else 0
        if workload in ("refuse", "refuse-before"):
            offset = MISSING_ACCOUNTS
        if mode == "hot":
            return {"lo": offset, "hi": offset, "reports": self.args.hot_reports}
        return {"lo": offset + 1, "hi": offset + self.args.accounts, "reports": 1}

    async def state(self, database: str = "bench") -> dict[str, int]:
        row = await self.databases[database].fetchrow(
            "SELECT"
            " (SELECT count(*) FROM tokentrack.report_reservations) AS reservations,"
            " (SELECT count(*) FROM tokentrack.report_reservations WHERE status = 'active')"
            "   AS active,"
            " (SELECT count(*) FROM tokentrack.report_step_usage) AS steps,"
            " (SELECT count(*) FROM tokentrack.report_step_usage WHERE cost_micros IS NULL)"
            "   AS unpriced,"
            " (SELECT coalesce(max(id), 0) FROM tokentrack.usage_ledger) AS ledger"
        )
        assert row is not None
        return dict(row)

    def check(self, workload: str, n: int, before: dict[str, int], after: dict[str, int]) -> None:
        """Every transaction did what it should: no refusal was counted as throughput.

        When the time is up a client may leave its last script part-way (pgbench does not
        count it), hence up to one more call's effect per client than transactions counted.
        """
        c = self.args.clients
        expected = {  # (low, high) change of each count (unpriced: steps without a cost)
            "reserve": {
                "reservations": (n, n + c),
                "active": (0, c),
                "steps": (0, 0),
                "ledger": (n, n),
            },
            "step": {
                "reservations": (0, 0),
                "active": (0, 0),
                "steps": (n, n + c),
                "ledger": (0, 0),
                "unpriced": (0, 0),
            },
            "record-step": {
                "reservations": (0, 0),
                "active": (0, 0),
                "steps": (n, n + c),
                "ledger": (0, 0),
                "unpriced": (0, 0),
            },
            "reserve-budgets": {
                "reservations": (n, n + c),
                "active": (0, c),
                "steps": (0, 0),
                "ledger": (n, n),
            },
            "reserve-main": {
                "reservations": (n, n + c),
                "active": (0, c),
                "steps": (0, 0),
                "ledger": (n, n),
            },
            "reserve-before": {
                "reservations": (n, n + c),
                "active": (0, c),
                "steps": (0, 0),
                "ledger": (n, n),
            },
            # Refused: nothing written.
            "refuse": {"reservations": (0, 0), "active": (0, 0), "steps": (0, 0), "ledger": (0, 0)},
            "refuse-before": {
                "reservations": (0, 0),
                "active": (0, 0),
                "steps": (0, 0),
                "ledger": (0, 0),
            },
            "finalize": {
                "reservations": (0, 0),
                "active": (-n - c, -n),
                "steps": (0, 0),
                "ledger": (n, n + c),
            },
            "lifecycle": {
                "reservations": (n, n + c),
                "active": (0, c),
                "steps": (7 * n, 7 * n + 7 * c),
                "ledger": (n, n + c),
            },
            "extend": {
                "reservations": (n, n + c),
                "active": (0, c),
                "steps": (0, 0),
                "ledger": (n, n + c),
            },
        }[base_name(workload)]
        problems = [
            f"{key} changed by {after[key] - before[key]} (expected {low}..{high})"
            for key, (low, high) in expected.items()
            if not low <= after[key] - before[key] <= high
        ]
        if problems:
            raise RuntimeError(f"{workload}: {n} transactions but " + "; ".join(problems))

    async def seed_finalize(
        self, mode: str, factor: float = 1.0, database: str = "bench"
    ) -> tuple[int, int]:
        """Seed enough reports for a finalize run in ``database``; returns their number range
        (one range of numbers over all databases)."""
        conn = self.databases[database]
        guess = max(self.tps_seen.get(("finalize", mode), 0.0), self.tps_seen.get(("su", "-"), 0))
        count = int((guess or 3000) * self.args.duration * 1.3 * factor) + 200
        first, last = self.finalize_next, self.finalize_next + count - 1
        d = self.defines(mode)
        async with conn.transaction():
            # Consistent by construction (unbilled rows): skip the per-row foreign key checks.
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(
                "SELECT bench.seed_finalize($1, $2, $3, $4)", first, last, d["lo"], d["hi"]
            )
        await conn.execute("SELECT setval('bench.finalize_seq', $1, false)", first)
        self.finalize_next = last + 1
        return first, last

    def measurement(self, application: str, database: str = "bench") -> measure.Measurement:
        """A measurement of the backends of ``database`` named ``application``."""
        s = self.session
        return measure.Measurement(
            s.control, s.control_sampler, s.postmaster_pid, database, application
        )

    async def run_pgbench(
        self,
        workload: str,
        mode: str,
        *,
        duration: float,
        track_all: bool = False,
    ) -> dict[str, Any]:
        spec = WORKLOADS[workload]
        database = spec.get("database", "bench")
        argv = [*self.session.pg_args(), "-n", "-r", "-c", str(self.args.clients)]
        argv += ["-j", str(self.args.threads), "-T", str(int(duration))]
        if spec["script"] is None:
            argv += ["-b", "simple-update"]
        else:
            argv += ["-f", str(SCRIPTS / spec["script"])]
            for key, value in self.defines(mode, workload).items():
                argv += ["-D", f"{key}={value}"]
        argv.append(database)
        options = "-c pg_stat_statements.track=all" if track_all else None

        for attempt in (1, 2):
            seeded = None
            if base_name(workload) == "finalize":
                seeded = await self.seed_finalize(mode, factor=attempt, database=database)
            before = await self.state(database) if workload != "simple-update" else {}
            measured = await self.measurement("pgbench", database).start()
            try:
                out = await measure.run_pgbench(argv, self.session.pg_env(options))
            finally:
                await measured.stop_sampling()
            await measured.finish(driver="pgbench", statements=25 if track_all else 8)
            after = await self.state(database) if workload != "simple-update" else {}
            if seeded is not None:
                row = await self.databases[database].fetchrow(
                    "SELECT last_value, is_called FROM bench.finalize_seq"
                )
                assert row is not None
                used_to = row["last_value"] if row["is_called"] else seeded[0] - 1
                if used_to > seeded[1]:
                    log(
                        f"finalize {mode}: {used_to - seeded[1]} past the seeded reports;"
                        " again with more"
                    )
                    continue
                await self.databases[database].execute(
                    "SELECT bench.drop_unused_finalize($1, $2)", used_to + 1, seeded[1]
                )
            if workload != "simple-update":
                self.check(workload, out.transactions, before, after)
            break
        else:
            raise RuntimeError(f"finalize {mode}: could not seed enough reports")

        calls = out.transactions * spec["calls"]
        per_call = max(calls, 1)
        cpu, wal = measured.cpu, measured.wal
        return {
            "workload": workload,
            "accounts": mode,
            "tps": out.tps,
            "transactions": out.transactions,
            "calls_per_tx": spec["calls"],
            "calls_per_s": out.tps * spec["calls"],
            "latency_ms": out.latency_ms,
            "failed": out.failed,
            "statements": out.statements,
            "cpu": cpu,
            "server_cpu_ms_per_call": cpu["server_cpu_s"] * 1000 / per_call,
            "wal": wal,
            "wal_bytes_per_call": wal["wal_bytes"] / per_call,
            "wal_syncs_per_call": wal["wal_sync"] / per_call,
            "waits": dict(measured.waits.most_common()),
            "pg_stat_statements": measured.statements,
        }

    async def one(self, workload: str, mode: str, round_no: int) -> dict[str, Any]:
        """One timed run of a round (--duration), logged; its tps sizes later finalize seeds."""
        log(f"round {round_no}: {workload} {mode} ({self.args.duration} s)")
        run = await self.run_pgbench(workload, mode, duration=self.args.duration)
        run["round"] = round_no
        key = ("su", "-") if workload == "simple-update" else (base_name(workload), mode)
        self.tps_seen[key] = max(self.tps_seen.get(key, 0.0), run["tps"])
        log(
            f"  {run['tps']:.0f} tps, {run['calls_per_s']:.0f} calls/s,"
            f" server {run['cpu']['server_cores']:.2f} cores,"
            f" machine {run['cpu']['machine_busy_cores']:.2f} cores busy"
        )
        return run
