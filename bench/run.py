#!/usr/bin/env python3
"""tokentrack's benchmark, side by side with pgbench's built-in simple-update on one server.

    make bench          # the full run (about 15 minutes on 2 cores): bench/results/latest.{md,json}
    make bench-smoke    # about a minute, smaller sizes: bench/results/smoke.{md,json}
    .venv/bin/python bench/run.py --help

It starts its own PostgreSQL (tokentrack_client.testing.PostgresServer, the test suite's
throwaway server, with the server's default settings back: fsync, synchronous_commit and
full_page_writes on, plus pg_stat_statements preloaded) in a temporary directory on disk
(--data-root, /tmp by default, so that commit flushes are real), listening on 127.0.0.1 and
a free port, as the postgres OS user when run as root. The server is stopped and its files
removed at the end, Ctrl-C included.

Phases (--phases picks some):

throughput  pgbench at the same clients, threads and duration for simple-update and for the
            scripts of bench/scripts/ (reserve + release, step, finalize, the whole lifecycle),
            spread over 1,000 accounts and on one hot account, in rounds interleaved with
            simple-update; medians, ratios to simple-update, CPU and WAL per call, waits.
profile     each workload once more with pg_stat_statements.track = all: the statements inside
            the functions, where the time goes.
client      the lifecycle through tokentrack_client (TokenTracker.track_report) with N asyncio
            tasks on a pool of N connections, interleaved with the pgbench lifecycle.
growth      each function and the queries of `tokentrack monitor` timed with 10 thousand and
            with 1 million existing reservations and steps.
sweep       100 thousand expired reservations with steps, swept by expire_reservations(500) one
            transaction per batch (each batch timed, commit included: the bound of how long it
            held its locks); then CALL sweep_expired_reservations(500) on as many; then a
            smaller backlog with smaller batches.

Absolute numbers depend on the machine and on what else runs on it: read the ratios, which
are measured side by side in one run, and the CPU per call.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import measure
import report

from tokentrack_client import TokenTracker, migrate
from tokentrack_client.ops.monitor import MONITOR_QUERIES
from tokentrack_client.testing import DURABLE_SETTINGS, PostgresServer

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent

SCRIPTS = BENCH_DIR / "scripts"
LIMIT = 10**15  # every account's budget: never the limit of a benchmark
STEPS = (
    ("AN0", 1800, 420),
    ("AN1.5", 2400, 610),
    ("AN1.7", 2100, 380),
    ("AN2", 3200, 900),
    ("AN3", 2800, 750),
    ("AN4", 1500, 500),
    ("AN5", 900, 1200),
)
PHASES = ("throughput", "profile", "client", "growth", "sweep")

# The server: PostgreSQL's defaults (the test settings turned back), pg_stat_statements.
SERVER_SETTINGS = {
    **DURABLE_SETTINGS,
    "max_connections": "100",
    "shared_buffers": "128MB",
    "shared_preload_libraries": "pg_stat_statements",
    "track_wal_io_timing": "on",  # pg_stat_wal.wal_sync_time: how long commits wait for fsync
    "log_min_messages": "warning",
}

# What one transaction of each workload is: its pgbench script and how many calls it makes.
WORKLOADS: dict[str, dict[str, Any]] = {
    "simple-update": {"script": None, "calls": 1, "label": "simple-update (built-in)"},
    "reserve": {"script": "reserve.sql", "calls": 2, "label": "reserve + release"},
    "step": {"script": "step.sql", "calls": 1, "label": "persist step"},
    "finalize": {"script": "finalize.sql", "calls": 1, "label": "finalize (7 steps)"},
    "lifecycle": {"script": "lifecycle.sql", "calls": 9, "label": "lifecycle (9 calls)"},
}
ORDER = [
    ("simple-update", "-"),
    ("reserve", "spread"),
    ("reserve", "hot"),
    ("step", "spread"),
    ("step", "hot"),
    ("lifecycle", "spread"),
    ("lifecycle", "hot"),
    ("finalize", "spread"),
    ("finalize", "hot"),
]

MONITOR_HOURS = 24


def account(n: int) -> uuid.UUID:
    """bench.account(n): 0 is the hot account, 1..1000 the spread ones."""
    return uuid.UUID(f"00000000-0000-0000-0000-{n:012d}")


def sweep_batch_query() -> str | None:
    """The sweep's batch SELECT as sql/functions/expire_reservations.sql has it (p_limit: $1)."""
    text = (ROOT / "sql" / "functions" / "expire_reservations.sql").read_text()
    found = re.search(r"FROM \(\s*(SELECT rr\..*?FOR UPDATE)\s*\) AS due", text, re.DOTALL)
    return found.group(1).replace("p_limit", "$1") if found else None


def summary(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": statistics.median(ordered) * 1000,
        "p90_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))] * 1000,
        "min_ms": ordered[0] * 1000,
        "n": len(ordered),
    }


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


def plan_scans(explain_json: Any) -> list[str]:
    """The scans of an EXPLAIN (FORMAT JSON) plan: 'Seq Scan on reports', 'Index Scan using ...'."""
    document = json.loads(explain_json) if isinstance(explain_json, str) else explain_json
    scans = []
    for node in plan_nodes(document[0]["Plan"]):
        kind = node["Node Type"]
        if "Scan" not in kind or kind in ("CTE Scan", "Subquery Scan", "Function Scan"):
            continue
        target = node.get("Index Name") or node.get("Relation Name")
        scans.append(f"{kind} {'using' if node.get('Index Name') else 'on'} {target}")
    return scans


def machine_info(data_dir: str) -> dict[str, Any]:
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    memory_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kb = int(line.split()[1])
    fs = subprocess.run(
        ["stat", "-f", "-c", "%T", data_dir], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "memory_gb": round(memory_kb / 2**20, 1),
        "load_average_start": os.getloadavg(),
        "data_directory": data_dir,
        "data_directory_filesystem": fs,
        "python": platform.python_version(),
        "asyncpg": asyncpg.__version__,
    }


def pgbench_version(pgbench: str) -> str:
    return subprocess.run(
        [pgbench, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()


class Bench:
    def __init__(self, args: argparse.Namespace, server: PostgresServer) -> None:
        self.args = args
        self.server = server
        self.pgbench = str(Path(server.bindir) / "pgbench")
        self.finalize_next = 1
        self.tps_seen: dict[tuple[str, str], float] = {}
        self.control: asyncpg.Connection
        self.control_sampler: asyncpg.Connection
        self.bench: asyncpg.Connection
        self.postmaster_pid = 0

    def dsn(self, dbname: str) -> str:
        return self.server.dsn(dbname)

    def log(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] {message}", flush=True)

    # ----------------------------------------------------------------------------------------
    # Setup and environment
    # ----------------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        self.control = await asyncpg.connect(self.dsn("postgres"))
        self.control_sampler = await asyncpg.connect(self.dsn("postgres"))
        try:
            await self.control.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            data_dir = await self.control.fetchval("SHOW data_directory")
            pid_file = Path(data_dir) / "postmaster.pid"
            self.postmaster_pid = int(pid_file.read_text().split()[0])
            results: dict[str, Any] = {
                "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "config": {k: v for k, v in vars(self.args).items() if k != "func"},
                "environment": await self.environment(data_dir),
            }
            phases = self.args.phases
            if {"throughput", "profile", "client"} & set(phases):
                await self.setup_bench_db()
            if "throughput" in phases:
                results["throughput"] = await self.throughput()
            if "profile" in phases:
                results["profile"] = await self.profile()
            if "client" in phases:
                results["client"] = await self.client_phase()
            if {"throughput", "profile", "client"} & set(phases):
                results["bench_db_reconcile_ok"] = await self.reconcile_ok(self.bench)
                await self.bench.close()
            if "growth" in phases or "sweep" in phases:
                large = await self.setup_growth_db("growth_large")
                try:
                    if "growth" in phases:
                        small = await self.setup_growth_db("growth_small")
                        try:
                            results["growth"] = await self.growth(small, large)
                            results["growth_small_db_reconcile_ok"] = await self.reconcile_ok(small)
                        finally:
                            await small.close()
                    if "sweep" in phases:
                        results["sweep"] = await self.sweep(large)
                    results["growth_large_db_reconcile_ok"] = await self.reconcile_ok(large)
                finally:
                    await large.close()
            results["environment"]["load_average_end"] = os.getloadavg()
            results["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            return results
        finally:
            await self.control_sampler.close()
            await self.control.close()

    async def environment(self, data_dir: str) -> dict[str, Any]:
        settings = await self.control.fetch(
            "SELECT name, setting, unit, source FROM pg_settings"
            " WHERE source NOT IN ('default', 'override', 'client', 'session')"
            " OR name IN ('fsync', 'synchronous_commit', 'full_page_writes', 'wal_sync_method',"
            " 'shared_buffers', 'max_wal_size', 'checkpoint_timeout', 'wal_level', 'work_mem',"
            " 'effective_cache_size', 'autovacuum', 'jit', 'wal_buffers', 'commit_delay',"
            " 'max_connections', 'pg_stat_statements.track', 'random_page_cost')"
            " ORDER BY name"
        )
        return {
            "machine": machine_info(data_dir),
            "postgresql": {
                "version": await self.control.fetchval("SELECT version()"),
                "pgbench": pgbench_version(self.pgbench),
                "settings": {
                    r["name"]: f"{r['setting']}{r['unit'] or ''} ({r['source']})" for r in settings
                },
            },
        }

    async def create_database(self, name: str) -> asyncpg.Connection:
        await self.control.execute(f'CREATE DATABASE "{name}"')
        await migrate.install(self.dsn(name), echo=lambda _: None, wait_notice=lambda _: None)
        conn = await asyncpg.connect(self.dsn(name))
        await conn.execute((BENCH_DIR / "bench_schema.sql").read_text())
        await conn.execute("CREATE EXTENSION pg_stat_statements")
        return conn

    async def setup_bench_db(self) -> None:
        self.log("setup: database bench, pgbench -i (scale 1), tokentrack, 1,001 accounts")
        self.bench = await self.create_database("bench")
        init = await asyncio.create_subprocess_exec(
            *self.pg_args(),
            "-i",
            "-q",
            "-s",
            "1",
            "bench",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.pg_env(),
        )
        _, err = await init.communicate()
        if init.returncode != 0:
            raise RuntimeError(f"pgbench -i failed: {err.decode()}")
        await self.bench.execute("SELECT bench.seed_accounts($1, $2)", self.args.accounts, LIMIT)
        await self.bench.execute("SELECT bench.seed_long_lived(1, $1, 1)", self.args.accounts)
        await self.bench.execute("SELECT bench.seed_long_lived(0, 0, $1)", self.args.hot_reports)
        await self.bench.execute("VACUUM ANALYZE")

    def pg_args(self) -> list[str]:
        s = self.server
        return [self.pgbench, "-h", s.host, "-p", str(s.port), "-U", s.user]

    def pg_env(self, options: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        if self.server.password:
            env["PGPASSWORD"] = self.server.password
        if options:
            env["PGOPTIONS"] = options
        return env

    async def reconcile_ok(self, conn: asyncpg.Connection) -> bool:
        answer = json.loads(await conn.fetchval("SELECT tokentrack.reconcile()::text"))
        if not answer.get("ok"):
            self.log(f"reconcile found discrepancies: {answer['discrepancies'][:5]}")
        return bool(answer.get("ok"))

    # ----------------------------------------------------------------------------------------
    # One pgbench run with everything measured around it
    # ----------------------------------------------------------------------------------------

    def defines(self, mode: str) -> dict[str, int]:
        if mode == "hot":
            return {"lo": 0, "hi": 0, "reports": self.args.hot_reports}
        return {"lo": 1, "hi": self.args.accounts, "reports": 1}

    async def state(self) -> dict[str, int]:
        row = await self.bench.fetchrow(
            "SELECT"
            " (SELECT count(*) FROM tokentrack.report_reservations) AS reservations,"
            " (SELECT count(*) FROM tokentrack.report_reservations WHERE status = 'active')"
            "   AS active,"
            " (SELECT count(*) FROM tokentrack.report_step_usage) AS steps,"
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
        expected = {  # (low, high) change of each count
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
        }[workload]
        problems = [
            f"{key} changed by {after[key] - before[key]} (expected {low}..{high})"
            for key, (low, high) in expected.items()
            if not low <= after[key] - before[key] <= high
        ]
        if problems:
            raise RuntimeError(f"{workload}: {n} transactions but " + "; ".join(problems))

    async def seed_finalize(self, mode: str, factor: float = 1.0) -> tuple[int, int]:
        """Seed enough reports for a finalize run; returns their number range."""
        guess = max(self.tps_seen.get(("finalize", mode), 0.0), self.tps_seen.get(("su", "-"), 0))
        count = int((guess or 3000) * self.args.duration * 1.3 * factor) + 200
        first, last = self.finalize_next, self.finalize_next + count - 1
        d = self.defines(mode)
        async with self.bench.transaction():
            # Consistent by construction (unbilled rows): skip the per-row foreign key checks.
            await self.bench.execute("SET LOCAL session_replication_role = replica")
            await self.bench.execute(
                "SELECT bench.seed_finalize($1, $2, $3, $4)", first, last, d["lo"], d["hi"]
            )
        await self.bench.execute("SELECT setval('bench.finalize_seq', $1, false)", first)
        self.finalize_next = last + 1
        return first, last

    async def pgss_top(self, dbname: str, limit: int = 15) -> list[dict[str, Any]]:
        rows = await self.control.fetch(
            "SELECT s.toplevel, s.calls, s.total_exec_time, s.mean_exec_time, s.rows,"
            " s.shared_blks_hit, s.shared_blks_read, s.shared_blks_dirtied,"
            " s.shared_blks_written, s.wal_records, s.wal_fpi, s.wal_bytes::float8 AS wal_bytes,"
            " regexp_replace(s.query, '\\s+', ' ', 'g') AS query"
            " FROM pg_stat_statements AS s JOIN pg_database AS d ON d.oid = s.dbid"
            " WHERE d.datname = $1 AND s.query !~ '^SELECT \\(\\$\\d+ \\|\\| lpad'"
            " ORDER BY s.total_exec_time DESC LIMIT $2",
            dbname,
            limit,
        )
        return [dict(r) for r in rows]

    async def run_pgbench(
        self,
        workload: str,
        mode: str,
        *,
        duration: float,
        track_all: bool = False,
    ) -> dict[str, Any]:
        spec = WORKLOADS[workload]
        argv = [*self.pg_args(), "-n", "-r", "-c", str(self.args.clients)]
        argv += ["-j", str(self.args.threads), "-T", str(int(duration))]
        if spec["script"] is None:
            argv += ["-b", "simple-update"]
        else:
            argv += ["-f", str(SCRIPTS / spec["script"])]
            for key, value in self.defines(mode).items():
                argv += ["-D", f"{key}={value}"]
        argv.append("bench")
        options = "-c pg_stat_statements.track=all" if track_all else None

        for attempt in (1, 2):
            seeded = None
            if workload == "finalize":
                seeded = await self.seed_finalize(mode, factor=attempt)
            before = await self.state() if workload != "simple-update" else {}
            await self.control.execute("CHECKPOINT")
            await measure.reset_wal_stats(self.control)
            await self.control.execute("SELECT pg_stat_statements_reset()")
            stop = asyncio.Event()
            pids: set[int] = set()
            sampler = asyncio.create_task(
                measure.sample_waits(self.control_sampler, "bench", "pgbench", stop, pids)
            )
            start = measure.CpuSnapshot.take(self.postmaster_pid)
            try:
                out = await measure.run_pgbench(argv, self.pg_env(options))
            finally:
                stop.set()
                waits = await sampler
            await measure.wait_for_backends_gone(self.control, "bench", "pgbench")
            measure.wait_reaped(pids)
            cpu = measure.CpuSnapshot.take(self.postmaster_pid).since(start, driver="pgbench")
            wal = await measure.wal_stats(self.control)
            top = await self.pgss_top("bench", 25 if track_all else 8)
            after = await self.state() if workload != "simple-update" else {}
            if seeded is not None:
                row = await self.bench.fetchrow(
                    "SELECT last_value, is_called FROM bench.finalize_seq"
                )
                assert row is not None
                used_to = row["last_value"] if row["is_called"] else seeded[0] - 1
                if used_to > seeded[1]:
                    self.log(
                        f"finalize {mode}: {used_to - seeded[1]} past the seeded reports;"
                        " again with more"
                    )
                    continue
                await self.bench.execute(
                    "SELECT bench.drop_unused_finalize($1, $2)", used_to + 1, seeded[1]
                )
            if workload != "simple-update":
                self.check(workload, out.transactions, before, after)
            break
        else:
            raise RuntimeError(f"finalize {mode}: could not seed enough reports")

        calls = out.transactions * spec["calls"]
        per_call = max(calls, 1)
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
            "waits": dict(waits.most_common()),
            "pg_stat_statements": top,
        }

    # ----------------------------------------------------------------------------------------
    # Phases
    # ----------------------------------------------------------------------------------------

    async def throughput(self) -> dict[str, Any]:
        runs: list[dict[str, Any]] = []
        for round_no in range(1, self.args.rounds + 1):
            for workload, mode in ORDER:
                runs.append(await self.one(workload, mode, round_no))
        runs.append(await self.one("simple-update", "-", self.args.rounds + 1))
        return {"runs": runs, "summary": report.throughput_summary(runs)}

    async def one(self, workload: str, mode: str, round_no: int) -> dict[str, Any]:
        self.log(f"round {round_no}: {workload} {mode} ({self.args.duration} s)")
        run = await self.run_pgbench(workload, mode, duration=self.args.duration)
        run["round"] = round_no
        key = ("su", "-") if workload == "simple-update" else (workload, mode)
        self.tps_seen[key] = max(self.tps_seen.get(key, 0.0), run["tps"])
        self.log(
            f"  {run['tps']:.0f} tps, {run['calls_per_s']:.0f} calls/s,"
            f" server {run['cpu']['server_cores']:.2f} cores,"
            f" machine {run['cpu']['machine_busy_cores']:.2f} cores busy"
        )
        return run

    async def profile(self) -> dict[str, Any]:
        """Each workload once with pg_stat_statements.track = all: the nested statements."""
        profiles: dict[str, Any] = {}
        for workload, mode in ORDER:
            self.log(f"profile: {workload} {mode} ({self.args.profile_duration} s)")
            run = await self.run_pgbench(
                workload, mode, duration=self.args.profile_duration, track_all=True
            )
            profiles[f"{workload}/{mode}"] = {
                "transactions": run["transactions"],
                "calls": run["transactions"] * run["calls_per_tx"],
                "statements": run["pg_stat_statements"],
            }
        return profiles

    async def client_phase(self) -> dict[str, Any]:
        """The lifecycle through tokentrack_client, interleaved with the pgbench lifecycle."""
        runs: list[dict[str, Any]] = []
        for round_no in range(1, self.args.rounds + 1):
            pg = await self.one("lifecycle", "spread", round_no)
            pg["driver"] = "pgbench"
            runs.append(pg)
            self.log(f"round {round_no}: client lifecycle ({self.args.duration} s)")
            client = await self.client_run()
            client["round"] = round_no
            runs.append(client)
            self.log(
                f"  {client['calls_per_s']:.0f} calls/s,"
                f" client {client['cpu']['driver_cores']:.2f} cores,"
                f" server {client['cpu']['server_cores']:.2f} cores"
            )
        return {"runs": runs, "summary": report.client_summary(runs)}

    async def client_run(self) -> dict[str, Any]:
        tasks = self.args.client_tasks
        app = "tokentrack-bench-client"
        pool = await asyncpg.create_pool(
            self.dsn("bench"),
            min_size=tasks,
            max_size=tasks,
            server_settings={"application_name": app},
        )
        assert pool is not None
        try:
            tracker = TokenTracker(pool)
            before = await self.state()
            await self.control.execute("CHECKPOINT")
            await measure.reset_wal_stats(self.control)
            await self.control.execute("SELECT pg_stat_statements_reset()")
            stop = asyncio.Event()
            pids: set[int] = set()
            sampler = asyncio.create_task(
                measure.sample_waits(self.control_sampler, "bench", app, stop, pids)
            )
            start = measure.CpuSnapshot.take(self.postmaster_pid)
            deadline = time.monotonic() + self.args.duration

            async def worker(seed: int) -> int:
                rng = random.Random(seed)
                done = 0
                while time.monotonic() < deadline:
                    who = account(rng.randint(1, self.args.accounts))
                    async with tracker.track_report(who, uuid.uuid4(), 20_000) as tracked:
                        for name, inputs, outputs in STEPS:
                            await tracked.step(
                                name, input_tokens=inputs, output_tokens=outputs, model="gpt-4o"
                            )
                    done += 1
                return done

            began = time.monotonic()
            try:
                counts = await asyncio.gather(*(worker(i) for i in range(tasks)))
            finally:
                elapsed = time.monotonic() - began
                stop.set()
                waits = await sampler
        finally:
            await pool.close()
        await measure.wait_for_backends_gone(self.control, "bench", app)
        measure.wait_reaped(pids)
        cpu = measure.CpuSnapshot.take(self.postmaster_pid).since(start, driver="python")
        wal = await measure.wal_stats(self.control)
        top = await self.pgss_top("bench", 8)
        lifecycles = sum(counts)
        self.check("lifecycle", lifecycles, before, await self.state())
        calls = lifecycles * 9
        return {
            "driver": "tokentrack_client",
            "workload": "lifecycle",
            "accounts": "spread",
            "tasks": tasks,
            "tps": lifecycles / elapsed,
            "transactions": lifecycles,
            "calls_per_tx": 9,
            "calls_per_s": calls / elapsed,
            "cpu": cpu,
            "server_cpu_ms_per_call": cpu["server_cpu_s"] * 1000 / max(calls, 1),
            "client_cpu_ms_per_call": cpu["driver_cpu_s"] * 1000 / max(calls, 1),
            "wal_bytes_per_call": wal["wal_bytes"] / max(calls, 1),
            "waits": dict(waits.most_common()),
            "pg_stat_statements": top,
        }

    # ----------------------------------------------------------------------------------------
    # Growth
    # ----------------------------------------------------------------------------------------

    async def setup_growth_db(self, name: str) -> asyncpg.Connection:
        self.log(f"setup: database {name} (tokentrack, 1,001 accounts, 1,000 live reservations)")
        conn = await self.create_database(name)
        await conn.execute("SELECT bench.seed_accounts($1, $2)", self.args.accounts, LIMIT)
        await conn.execute("SELECT bench.seed_long_lived(1, $1, 1)", self.args.accounts)
        return conn

    async def seed_history(self, conn: asyncpg.Connection, first: int, last: int) -> float:
        """Seed history reports first..last in chunks. One report every (365 days / the large
        size): the last 24 hours hold the same reports whatever the history's length."""
        every = dt.timedelta(days=365) / max(self.args.growth[-1], 1)
        began = time.monotonic()
        chunk = 100_000
        for start in range(first, last + 1, chunk):
            end = min(last, start + chunk - 1)
            async with conn.transaction():
                # Consistent by construction (bench.seed_history): no per-row FK checks.
                await conn.execute("SET LOCAL session_replication_role = replica")
                await conn.execute("SELECT bench.seed_history($1, $2, $3)", start, end, every)
            if last - first > chunk:
                self.log(f"  history {end:,} / {last:,}")
        await conn.execute(
            "VACUUM ANALYZE tokentrack.reports, tokentrack.report_reservations,"
            " tokentrack.report_step_usage, tokentrack.usage_ledger, tokentrack.usage_periods"
        )
        await self.control.execute("CHECKPOINT")
        return time.monotonic() - began

    async def timed(self, conn: asyncpg.Connection, sql: str, *args: Any) -> tuple[float, Any]:
        """The time of one statement inside its own transaction (BEGIN/COMMIT not timed)."""
        async with conn.transaction():
            began = time.perf_counter()
            value = await conn.fetchval(sql, *args)
            return time.perf_counter() - began, value

    async def lifecycle_calls(
        self,
        conn: asyncpg.Connection,
        rng: random.Random,
        i: int,
        call: Any,
    ) -> None:
        """One report's calls, each through ``call(name, sql, *args)``."""
        who = account(rng.randint(1, self.args.accounts))
        report_id = uuid.uuid4()
        await call(
            "try_reserve_tokens",
            "SELECT tokentrack.try_reserve_tokens($1, $2, 20000)::text",
            who,
            report_id,
        )
        for name, inputs, outputs in STEPS:
            await call(
                "persist_step_usage",
                "SELECT tokentrack.persist_step_usage($1, $2, $3, $4, $5, NULL, 'gpt-4o')::text",
                report_id,
                who,
                name,
                inputs,
                outputs,
            )
        if i % 2:
            await call(
                "finish_report (7 steps)",
                "SELECT tokentrack.finish_report($1, $2, 'complete')::text",
                report_id,
                who,
            )
        else:
            await call(
                "finalize_report_usage (7 steps)",
                "SELECT tokentrack.finalize_report_usage($1, $2)::text",
                report_id,
                who,
            )
        if i % 10 == 0:
            await call(
                "expire_reservations(500), none due",
                "SELECT tokentrack.expire_reservations(500)::text",
            )
            await call("reconcile(one account)", "SELECT tokentrack.reconcile($1)::text", who)

    async def time_functions(
        self, conn: asyncpg.Connection, iterations: int, times: dict[str, list[float]]
    ) -> None:
        """Time ``iterations`` report lifecycles call by call, adding to ``times``."""
        rng = random.Random(len(times.get("try_reserve_tokens", [])))

        async def call(name: str, sql: str, *args: Any) -> None:
            seconds, answer = await self.timed(conn, sql, *args)
            if isinstance(answer, str) and '"success": false' in answer:
                raise RuntimeError(f"{name} refused during the growth measurement: {answer}")
            times.setdefault(name, []).append(seconds)

        for i in range(iterations):
            await self.lifecycle_calls(conn, rng, i, call)

    def monitor_queries(self) -> list[tuple[str, str, tuple[Any, ...]]]:
        return [
            (f"monitor: {name}", sql, (MONITOR_HOURS,) if "$1" in sql else ())
            for name, sql in MONITOR_QUERIES.items()
        ]

    async def time_monitoring(
        self, conn: asyncpg.Connection, repeats: int, times: dict[str, list[float]]
    ) -> None:
        """The queries of ``tokentrack monitor`` (24-hour window), as it runs them."""
        for name, sql, args in self.monitor_queries():
            for _ in range(repeats):
                began = time.perf_counter()
                await conn.fetch(sql, *args)
                times.setdefault(name, []).append(time.perf_counter() - began)

    async def plans(self, conn: asyncpg.Connection) -> dict[str, list[str]]:
        """The scans each function and monitor query really uses (auto_explain with nested
        statements, in a transaction rolled back)."""
        found: dict[str, set[str]] = {}
        blocks: dict[str, list[int]] = {}
        calls: dict[str, str] = {}  # SQL text of each call made -> its name
        current = [""]

        def listener(_: Any, message: Any) -> None:
            text = str(message.message)
            if "plan:" not in text:
                return
            document = json.loads(text.split("plan:", 1)[1])
            name = calls.get(document.get("Query Text", "").strip())
            if name is not None:
                # The call itself, logged when its portal is dropped (during the next call):
                # its buffers include those of every statement it ran.
                top = document["Plan"]
                used = top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0)
                blocks.setdefault(name, []).append(used)
                found.setdefault(name, set()).update(plan_scans([document]))
            elif current[0]:
                found.setdefault(current[0], set()).update(plan_scans([document]))

        async def call(name: str, sql: str, *args: Any) -> None:
            current[0] = name
            calls[sql.strip()] = name
            await conn.fetchval(sql, *args)

        await conn.execute("LOAD 'auto_explain'")
        conn.add_log_listener(listener)
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute(
                "SET LOCAL auto_explain.log_min_duration = 0;"
                " SET LOCAL auto_explain.log_nested_statements = on;"
                " SET LOCAL auto_explain.log_analyze = on;"
                " SET LOCAL auto_explain.log_buffers = on;"
                " SET LOCAL auto_explain.log_timing = off;"
                " SET LOCAL auto_explain.log_format = json;"
                " SET LOCAL client_min_messages = log"
            )
            for i in range(4):
                await self.lifecycle_calls(conn, random.Random(i), 10 * (i % 2) + i % 2, call)
            for name, sql, args in self.monitor_queries():
                await call(name, sql, *args)
            current[0] = ""
            await conn.execute("SELECT 1")  # drops the last call's portal: its plan is logged
        finally:
            await transaction.rollback()
            conn.remove_log_listener(listener)
        return {
            "scans": {name: sorted(scans) for name, scans in found.items()},
            "blocks": {name: statistics.median(used) for name, used in blocks.items()},
        }

    async def growth(self, small: asyncpg.Connection, large: asyncpg.Connection) -> dict[str, Any]:
        """Both sizes side by side on the same server, timed in interleaved rounds."""
        sizes: list[int] = [self.args.growth[0], self.args.growth[-1]]
        dbs = {sizes[0]: small, sizes[1]: large}
        result: dict[str, Any] = {"sizes": sizes, "rows": {}, "seed_seconds": {}}
        for size, conn in dbs.items():
            self.log(f"growth: seeding {size:,} history reports")
            result["seed_seconds"][str(size)] = await self.seed_history(conn, 1, size)
            row = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM tokentrack.report_reservations) AS reservations,"
                " (SELECT count(*) FROM tokentrack.report_step_usage) AS steps,"
                " (SELECT count(*) FROM tokentrack.reports) AS reports,"
                " (SELECT count(*) FROM tokentrack.usage_ledger) AS ledger"
            )
            result["rows"][str(size)] = dict(row) if row else {}
        rounds = 4
        times: dict[int, dict[str, list[float]]] = {size: {} for size in sizes}
        self.log(f"growth: timing as installed, {rounds} interleaved rounds")
        for _ in range(rounds):
            for size, conn in dbs.items():
                await self.time_functions(
                    conn, max(1, self.args.growth_iterations // rounds), times[size]
                )
                await self.time_monitoring(
                    conn, max(1, self.args.monitoring_repeats // rounds), times[size]
                )
        result["as_installed"] = {}
        for size in sizes:
            plans = await self.plans(dbs[size])
            result["as_installed"][str(size)] = {
                "times": {name: summary(values) for name, values in times[size].items()},
                "scans": plans["scans"],
                "blocks": plans["blocks"],
            }
        # The monitor's reconcile() audits every period: it grows with the history by design.
        result["reconcile_all_s"] = {}
        for size, conn in dbs.items():
            began = time.perf_counter()
            await conn.fetchval("SELECT tokentrack.reconcile()::text")
            result["reconcile_all_s"][str(size)] = time.perf_counter() - began
        result["summary"] = report.growth_summary(result)
        return result

    # ----------------------------------------------------------------------------------------
    # Sweep
    # ----------------------------------------------------------------------------------------

    async def seed_expired(self, conn: asyncpg.Connection, first: int, last: int) -> None:
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(
                "SELECT bench.seed_expired($1, $2, $3)", first, last, self.args.sweep_steps
            )
        await conn.execute(
            "VACUUM ANALYZE tokentrack.reports, tokentrack.report_reservations,"
            " tokentrack.report_step_usage"
        )
        await self.control.execute("CHECKPOINT")

    async def sweep_batches(
        self, conn: asyncpg.Connection, rows: int, batch: int, *, profile: bool = False
    ) -> dict[str, Any]:
        """expire_reservations(batch), one transaction per batch, each timed with its COMMIT."""
        query = sweep_batch_query()
        scans = ["(batch query not found in expire_reservations.sql)"]
        if query is not None:
            scans = plan_scans(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {query}", batch))
        await conn.execute("SELECT pg_stat_statements_reset()")
        if profile:  # nested statements too (it slows the batches: not for the timed runs)
            await conn.execute("SET pg_stat_statements.track = 'all'")
        batches: list[dict[str, Any]] = []
        began = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            async with conn.transaction():
                answer = json.loads(
                    await conn.fetchval("SELECT tokentrack.expire_reservations($1)::text", batch)
                )
            batches.append(
                {
                    "ms": (time.perf_counter() - t0) * 1000,
                    "expired": answer["expired"],
                    "steps": answer["steps"],
                }
            )
            if answer["expired"] < batch:
                break
        total = time.perf_counter() - began
        await conn.execute("RESET pg_stat_statements.track")
        expired = sum(b["expired"] for b in batches)
        left = await conn.fetchval(
            "SELECT count(*) FROM tokentrack.report_reservations"
            " WHERE status = 'active' AND expires_at <= now()"
        )
        durations = sorted(b["ms"] for b in batches if b["expired"])
        full = [b["ms"] for b in batches if b["expired"] == batch]
        median = statistics.median(durations) if durations else 0.0
        return {
            "backlog": rows,
            "batch": batch,
            "batches": len(batches),
            "expired": expired,
            "left_due": left,
            "total_s": total,
            "rows_per_s": expired / total if total else 0.0,
            "longest_batch_ms": max(durations) if durations else 0.0,
            "median_batch_ms": median,
            "p95_batch_ms": durations[int(len(durations) * 0.95)] if durations else 0.0,
            "median_ms_per_reservation": median / batch,
            "first_batches_ms": [round(x, 1) for x in full[:5]],
            "last_full_batches_ms": [round(x, 1) for x in full[-5:]],
            "empty_batch_ms": round(batches[-1]["ms"], 1) if not batches[-1]["expired"] else None,
            "batch_scan": scans,
            "batch_ms": [round(b["ms"], 1) for b in batches],
            "pg_stat_statements": await self.pgss_top(
                await conn.fetchval("SELECT current_database()"), 12
            ),
        }

    async def sweep(self, conn: asyncpg.Connection) -> dict[str, Any]:
        rows, batch = self.args.sweep_rows, self.args.sweep_batch
        n = 0
        result: dict[str, Any] = {"steps_per_reservation": self.args.sweep_steps}
        self.log(
            f"sweep: seeding {rows:,} expired reservations ({self.args.sweep_steps} steps each)"
        )
        await self.seed_expired(conn, n + 1, n + rows)
        n += rows
        self.log(f"sweep: expire_reservations({batch}) per transaction")
        result["batched"] = await self.sweep_batches(conn, rows, batch)
        self.log(
            f"  {result['batched']['total_s']:.1f} s, longest batch"
            f" {result['batched']['longest_batch_ms']:.0f} ms"
        )

        self.log(
            f"sweep: seeding {rows:,} more; CALL tokentrack.sweep_expired_reservations({batch})"
        )
        await self.seed_expired(conn, n + 1, n + rows)
        n += rows
        began = time.perf_counter()
        await conn.execute(f"CALL tokentrack.sweep_expired_reservations({int(batch)})")
        total = time.perf_counter() - began
        left = await conn.fetchval(
            "SELECT count(*) FROM tokentrack.report_reservations"
            " WHERE status = 'active' AND expires_at <= now()"
        )
        result["procedure"] = {
            "backlog": rows,
            "batch": batch,
            "total_s": total,
            "rows_per_s": rows / total,
            "left_due": left,
        }
        self.log(f"  {total:.1f} s")

        small_rows = self.args.sweep_small_rows
        if small_rows:
            self.log(f"sweep: profile of {small_rows // 2:,} more with track = all")
            await self.seed_expired(conn, n + 1, n + small_rows // 2)
            n += small_rows // 2
            result["profile"] = await self.sweep_batches(conn, small_rows // 2, batch, profile=True)
        result["smaller_batches"] = []
        for size in self.args.sweep_small_batches:
            if not small_rows:
                break
            self.log(f"sweep: {small_rows:,} more, expire_reservations({size}) per transaction")
            await self.seed_expired(conn, n + 1, n + small_rows)
            n += small_rows
            run = await self.sweep_batches(conn, small_rows, size)
            result["smaller_batches"].append(run)
            self.log(f"  {run['total_s']:.1f} s, longest batch {run['longest_batch_ms']:.0f} ms")
        return result


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _sizes(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="tokentrack benchmark, side by side with pgbench simple-update",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--smoke", action="store_true", help="about a minute, smaller sizes")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--duration", type=int, default=10, help="seconds per pgbench run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each workload")
    parser.add_argument("--profile-duration", type=int, default=4)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument(
        "--hot-reports",
        type=int,
        default=16,
        help="long-lived reports of the hot account (step workload)",
    )
    parser.add_argument("--client-tasks", type=int, default=8)
    parser.add_argument(
        "--growth",
        type=_sizes,
        default=[10_000, 1_000_000],
        help="history sizes (reservations and steps), comma separated",
    )
    parser.add_argument(
        "--growth-iterations", type=int, default=200, help="report lifecycles timed per size"
    )
    parser.add_argument("--monitoring-repeats", type=int, default=16)
    parser.add_argument("--sweep-rows", type=int, default=100_000)
    parser.add_argument("--sweep-steps", type=int, default=3, help="steps per expired reservation")
    parser.add_argument("--sweep-batch", type=int, default=500)
    parser.add_argument("--sweep-small-rows", type=int, default=10_000)
    parser.add_argument(
        "--sweep-small-batches",
        type=_sizes,
        default=[100, 50],
        help="batch sizes tried on smaller backlogs (--sweep-small-rows each)",
    )
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}"
    )
    parser.add_argument(
        "--data-root",
        default="/tmp",
        help="where the server's data directory goes (on disk: real fsync)",
    )
    parser.add_argument("--pg-bindir", default=None, help="PostgreSQL server binaries")
    parser.add_argument("--out", default=str(BENCH_DIR / "results"))
    parser.add_argument("--name", default=None, help="output file name (latest; smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.duration, args.rounds, args.profile_duration = 2, 1, 1
        args.growth, args.growth_iterations, args.monitoring_repeats = [5_000, 20_000], 20, 4
        args.sweep_rows, args.sweep_small_rows = 3_000, 1_000
    args.phases = [p for p in args.phases.split(",") if p]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    args.name = args.name or ("smoke" if args.smoke else "latest")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def benchmark_server(args: argparse.Namespace) -> Iterator[PostgresServer]:
    # On disk (--data-root), not in RAM: commit flushes are real.
    bindir = Path(args.pg_bindir) if args.pg_bindir else None
    with PostgresServer(
        settings=SERVER_SETTINGS, bindir=bindir, data_root=Path(args.data_root)
    ) as server:
        yield server


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("stat") is None:
        raise SystemExit("bench: needs coreutils' stat")
    signal.signal(signal.SIGTERM, _interrupt)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    try:
        with benchmark_server(args) as server:
            print(
                f"bench: PostgreSQL on {server.host}:{server.port}, phases {args.phases}",
                flush=True,
            )
            results = asyncio.run(Bench(args, server).run())
    except KeyboardInterrupt:
        print("bench: interrupted; the server was stopped", file=sys.stderr)
        return 130
    results["wall_seconds"] = time.monotonic() - began
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    markdown = report.render(results)
    (out / f"{args.name}.md").write_text(markdown)
    print(markdown)
    print(f"bench: wrote {out / args.name}.md and .json in {results['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
