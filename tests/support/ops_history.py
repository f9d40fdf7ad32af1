"""A realistic tokentrack history for the operations tests (audit, verify, monitor, cleanup).

:func:`build_history` drives the SQL functions the way report generators and the legacy path
do: several accounts, each with a completed period and an active one, legacy
``increment_usage`` calls, and a few hundred reports of the four modes that complete (most),
fail, are cancelled (one with a late step), expire and are swept, or are still running; with
retried steps. Report times are then spread over the last 30 hours, so that the last-24-hours
figures see most but not all of them. Everything billed goes through the functions, so
``reconcile()`` is ok and ``tokentrack monitor`` raises no alert on the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import subprocess
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tokentrack_client import cli
from tokentrack_client.testing import PostgresServer, find_bindir, run_in_thread
from tokentrack_client.testing.pytest_plugin import TemplateDatabase

MODES = ("standard", "dd", "discovery", "hybrid")
OUTCOMES = ("complete", "failed", "cancelled", "expired", "running")
WEIGHTS = (93, 2, 2, 2, 1)
WINDOW_HOURS = 30


@dataclass
class History:
    """What :func:`build_history` created."""

    accounts: list[uuid.UUID] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    reports: int = 0
    steps: int = 0


async def call(conn: asyncpg.Connection, function: str, *args: Any) -> dict[str, Any]:
    """``SELECT tokentrack.<function>(args)`` decoded."""
    placeholders = ", ".join(f"${i}" for i in range(1, len(args) + 1))
    answer = json.loads(await conn.fetchval(f"SELECT tokentrack.{function}({placeholders})", *args))
    assert isinstance(answer, dict)
    return answer


async def run_report(
    conn: asyncpg.Connection,
    rng: random.Random,
    account: uuid.UUID,
    outcome: str,
    mode: str,
    history: History,
) -> uuid.UUID:
    """One report from reservation to its outcome (or left active for expired/running)."""
    report = uuid.uuid4()
    await conn.execute(
        "INSERT INTO tokentrack.reports (id, account_id, mode, status)"
        " VALUES ($1, $2, $3, 'pending')",
        report,
        account,
        mode,
    )
    granted = await call(conn, "try_reserve_tokens", account, report, rng.randint(2_000, 9_000))
    assert granted["success"] is True, granted
    steps = rng.randint(1, 4) if outcome != "failed" else rng.randint(0, 2)
    for index in range(steps):
        name = f"step_{index}_{rng.choice(['outline', 'search', 'draft', 'review'])}"
        tokens_in, tokens_out = rng.randint(50, 1_500), rng.randint(20, 900)
        model = rng.choice(["model-a", "model-b", None])
        answer = await call(
            conn, "persist_step_usage", report, account, name, tokens_in, tokens_out, None, model
        )
        assert answer["success"] is True, answer
        history.steps += 1
        if rng.random() < 0.1:  # a retried step: a duplicate, nothing changes
            again = await call(
                conn,
                "persist_step_usage",
                report,
                account,
                name,
                tokens_in,
                tokens_out,
                None,
                model,
            )
            assert again["duplicate"] is True, again
    if outcome in ("complete", "failed", "cancelled"):
        message = "model timeout" if outcome == "failed" else None
        done = await call(conn, "finish_report", report, account, outcome, message)
        assert done["success"] is True, done
        if outcome == "cancelled" and rng.random() < 0.5:  # a step that was still running
            late = await call(
                conn, "persist_step_usage", report, account, "late_step", 10, 5, None, None
            )
            assert late["late"] is True, late
            history.steps += 1
    history.outcomes[outcome] += 1
    history.reports += 1
    return report


async def build_history(
    conn: asyncpg.Connection, *, seed: int = 20260108, accounts: int = 6, reports: int = 60
) -> History:
    """Fill the database behind ``conn`` (tokentrack installed, otherwise empty)."""
    rng = random.Random(seed)
    history = History()
    spread: list[tuple[uuid.UUID, timedelta]] = []
    expired: list[uuid.UUID] = []
    for _ in range(accounts):
        account = uuid.uuid4()
        history.accounts.append(account)
        opened = await call(conn, "open_usage_period", account, 5_000_000, None)
        assert opened["success"] is True, opened
        for _ in range(rng.randint(2, 5)):
            legacy = await call(
                conn, "increment_usage", account, rng.randint(100, 5_000), True, False
            )
            assert "tokens_used" in legacy, legacy
        for period in range(2):
            count = reports // 6 if period == 0 else reports - reports // 6
            for _ in range(count):
                outcome = rng.choices(OUTCOMES, WEIGHTS)[0]
                mode = rng.choice(MODES)
                report = await run_report(conn, rng, account, outcome, mode, history)
                if outcome == "expired":
                    expired.append(report)
                elif outcome != "running":
                    spread.append((report, timedelta(minutes=rng.randint(1, WINDOW_HOURS * 60))))
            if period == 0:  # close the first period: its reports keep billing into it
                reopened = await call(conn, "open_usage_period", account, 5_000_000, None)
                assert reopened["success"] is True, reopened
    # Reservations that were abandoned 3 hours ago, then swept.
    await conn.execute(
        "UPDATE tokentrack.report_reservations"
        " SET created_at = now() - interval '3 hours', expires_at = now() - interval '1 hour'"
        " WHERE report_id = ANY($1::uuid[])",
        expired,
    )
    await conn.execute(
        "UPDATE tokentrack.reports SET created_at = now() - interval '3 hours'"
        " WHERE id = ANY($1::uuid[])",
        expired,
    )
    swept = await call(conn, "cleanup_expired_reservations")
    assert swept["expired"] == len(expired), swept
    # Spread the finished reports (and their reservations) over the last WINDOW_HOURS hours.
    await conn.executemany(
        "UPDATE tokentrack.reports SET created_at = created_at - $2::interval WHERE id = $1",
        spread,
    )
    await conn.executemany(
        "UPDATE tokentrack.report_reservations SET created_at = created_at - $2::interval,"
        " expires_at = expires_at - $2::interval WHERE report_id = $1",
        spread,
    )
    reconciled = await call(conn, "reconcile", None)
    assert reconciled["ok"] is True, reconciled
    return history


# --------------------------------------------------------------------------------------------
# Fixtures (registered through pytest_plugins in conftest.py) and the CLI runner
# --------------------------------------------------------------------------------------------

HISTORY_TEMPLATE = "tokentrack_history_tmpl"


@pytest.fixture(scope="session")
def history_template(
    pg_server: PostgresServer, tokentrack_template: TemplateDatabase
) -> Iterator[str]:
    """Session: a template database holding :func:`build_history` (built once)."""

    async def build() -> None:
        await pg_server.drop_database(HISTORY_TEMPLATE)
        dsn = await pg_server.create_database(
            HISTORY_TEMPLATE, template=tokentrack_template.template_dbname
        )
        conn = await asyncpg.connect(dsn)
        try:
            await build_history(conn)
        finally:
            await conn.close()

    run_in_thread(build)
    try:
        yield HISTORY_TEMPLATE
    finally:
        run_in_thread(lambda: pg_server.drop_database(HISTORY_TEMPLATE))


@pytest.fixture
async def history_dsn(history_template: str, make_database: Callable[..., Awaitable[str]]) -> str:
    """DSN of a fresh database cloned from the history template."""
    return await make_database(history_template)


def _pg_cron_library(bindir: Path) -> Path:
    pg_config = bindir / "pg_config"
    if pg_config.exists():
        out = subprocess.run(
            [str(pg_config), "--pkglibdir"], capture_output=True, text=True, check=False
        )
        if out.returncode == 0 and out.stdout.strip():
            return Path(out.stdout.strip()) / "pg_cron.so"
    return bindir.parent / "lib" / "pg_cron.so"


@pytest.fixture(scope="module")
def cron_server() -> Iterator[PostgresServer]:
    """A server of its own that preloads pg_cron (cron.database_name = postgres); one per
    test module, so that the modules' jobs and extension states never meet."""
    bindir = find_bindir()
    library = _pg_cron_library(bindir)
    if not library.exists():
        message = (
            f"pg_cron is not installed ({library} is missing): install Debian's "
            "postgresql-15-cron (make test does)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    settings = {
        "shared_preload_libraries": "pg_cron",
        "cron.database_name": "postgres",
        # Jobs run in background workers, not through a libpq connection to localhost.
        "cron.use_background_workers": "on",
        "max_worker_processes": "16",
    }
    with PostgresServer(bindir=bindir, settings=settings) as server:
        yield server


@dataclass(frozen=True)
class CliResult:
    """Exit status and output of one ``tokentrack`` run."""

    code: int
    out: str
    err: str


def run_cli_sync(*argv: str) -> CliResult:
    """Run ``tokentrack argv...`` in this process (asyncio.run inside: call from a thread)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:  # argparse: --help, usage errors
            code = int(exc.code or 0)
    return CliResult(code, out.getvalue(), err.getvalue())


async def tokentrack(*argv: str) -> CliResult:
    """Run ``tokentrack argv...`` from an async test (in a worker thread)."""
    return await asyncio.to_thread(run_cli_sync, *argv)
