"""The benchmark's PostgreSQL server, its settings, the machine it runs on, and the session
every phase shares: the control connections, pgbench's command line, the databases."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg

from tokentrack_client import migrate
from tokentrack_client.testing import DURABLE_SETTINGS, PostgresServer

BENCH_DIR = Path(__file__).resolve().parent
LIMIT = 10**15  # every account's budget: never the limit of a benchmark

# The server: PostgreSQL's defaults (the test settings turned back), pg_stat_statements.
SERVER_SETTINGS = {
    **DURABLE_SETTINGS,
    "max_connections": "100",
    "shared_buffers": "128MB",
    "shared_preload_libraries": "pg_stat_statements",
    "track_wal_io_timing": "on",  # pg_stat_wal.wal_sync_time: how long commits wait for fsync
    "log_min_messages": "warning",
}


def log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", flush=True)


@contextmanager
def benchmark_server(args: argparse.Namespace) -> Iterator[PostgresServer]:
    # On disk (--data-root), not in RAM: commit flushes are real.
    bindir = Path(args.pg_bindir) if args.pg_bindir else None
    with PostgresServer(
        settings=SERVER_SETTINGS, bindir=bindir, data_root=Path(args.data_root)
    ) as server:
        yield server


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


async def reconcile_ok(conn: asyncpg.Connection) -> bool:
    answer = json.loads(await conn.fetchval("SELECT tokentrack.reconcile()::text"))
    if not answer.get("ok"):
        log(f"reconcile found discrepancies: {answer['discrepancies'][:5]}")
    return bool(answer.get("ok"))


class Session:
    """The server during one benchmark: ``control`` (database postgres) runs checkpoints and
    reads statistics, ``control_sampler`` samples pg_stat_activity while a run goes on."""

    control: asyncpg.Connection
    control_sampler: asyncpg.Connection

    def __init__(self, args: argparse.Namespace, server: PostgresServer) -> None:
        self.args = args
        self.server = server
        self.pgbench = str(Path(server.bindir) / "pgbench")
        self.data_dir = ""
        self.postmaster_pid = 0

    async def open(self) -> None:
        self.control = await asyncpg.connect(self.dsn("postgres"))
        self.control_sampler = await asyncpg.connect(self.dsn("postgres"))
        await self.control.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        self.data_dir = await self.control.fetchval("SHOW data_directory")
        pid_file = Path(self.data_dir) / "postmaster.pid"
        self.postmaster_pid = int(pid_file.read_text().split()[0])

    async def close(self) -> None:
        await self.control_sampler.close()
        await self.control.close()

    def dsn(self, dbname: str) -> str:
        return self.server.dsn(dbname)

    def pg_args(self) -> list[str]:
        """pgbench and the options that connect it to the server."""
        s = self.server
        return [self.pgbench, "-h", s.host, "-p", str(s.port), "-U", s.user]

    def pg_env(self, options: str | None = None) -> dict[str, str]:
        """pgbench's environment: the password, and PGOPTIONS when ``options`` are given."""
        env = dict(os.environ)
        if self.server.password:
            env["PGPASSWORD"] = self.server.password
        if options:
            env["PGOPTIONS"] = options
        return env

    async def environment(self) -> dict[str, Any]:
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
            "machine": machine_info(self.data_dir),
            "postgresql": {
                "version": await self.control.fetchval("SELECT version()"),
                "pgbench": pgbench_version(self.pgbench),
                "settings": {
                    r["name"]: f"{r['setting']}{r['unit'] or ''} ({r['source']})" for r in settings
                },
            },
        }

    async def create_database(
        self, name: str, *, rollback_to: str | None = None
    ) -> asyncpg.Connection:
        """A database with tokentrack, bench_schema.sql and pg_stat_statements installed, and
        accounts 0..--accounts, each with a period and (1..--accounts) one live reservation.
        ``rollback_to``: tokentrack as it was at that version (installed, then rolled back to
        it by the migrator, which restores the function texts of that version), to measure
        the SQL of before a change in the same run as the SQL after it."""
        await self.control.execute(f'CREATE DATABASE "{name}"')
        await migrate.install(self.dsn(name), wait_notice=lambda _: None)
        if rollback_to is not None:
            await migrate.rollback(self.dsn(name), to=rollback_to, wait_notice=lambda _: None)
        conn = await asyncpg.connect(self.dsn(name))
        await conn.execute((BENCH_DIR / "bench_schema.sql").read_text())
        await conn.execute("CREATE EXTENSION pg_stat_statements")
        await conn.execute("SELECT bench.seed_accounts($1, $2)", self.args.accounts, LIMIT)
        await conn.execute("SELECT bench.seed_long_lived(1, $1, 1)", self.args.accounts)
        return conn
