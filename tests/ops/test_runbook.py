"""docs/RUNBOOK.md, executed: its command blocks run as written, in the runbook's order.

Each fenced ``sh`` block marked ``<!-- runbook-test: NAME -->`` runs under ``bash -euo
pipefail`` with ``DATABASE_URL`` set, ``tokentrack`` (this interpreter's) and the PostgreSQL
client programs on ``PATH``, and ``make`` running this repository's Makefile (with the venv
stamp taken as up to date and ``BIN`` pointing at this interpreter's scripts). The database
lives on a server with pg_cron, so ``make install-cron`` really schedules the sweep.

The story: a database on version 20251219000000 with legacy usage; staging-day deploy;
reports through the new path (some still running); rollback level 1 (in-flight steps are
billed before the tables go, which are archived); deploy again after level 1, in a new
directory (the archived rows come back: verify and reconcile pass, every token billed once);
more reports; rollback level 1 and level 2 as staging rehearses them (the pre-deploy backup
of the redeploy comes back, exactly, with the first archive); deploy again; the monitoring
commands.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from ops_history import call, run_cli_sync
from sqlkit import step
from tokentrack_client import migrate
from tokentrack_client.testing import PostgresServer

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = ROOT / "docs" / "RUNBOOK.md"
V1_TABLES = ("accounts", "usage_periods", "reports", "usage_ledger")
V2_TABLES = ("report_reservations", "report_step_usage")
BLOCK = re.compile(r"<!-- runbook-test: ([a-z0-9-]+) -->\n```sh\n(.*?)```", re.DOTALL)


def runbook_blocks() -> dict[str, str]:
    """The marked command blocks of docs/RUNBOOK.md by name."""
    return {m[1]: m[2] for m in BLOCK.finditer(RUNBOOK.read_text(encoding="utf-8"))}


def test_the_runbook_has_its_blocks_and_uses_real_commands() -> None:
    blocks = runbook_blocks()
    assert list(blocks) == ["deploy", "monitoring", "rollback-level-1", "rollback-level-2"]
    text = RUNBOOK.read_text(encoding="utf-8")
    assert "make rollback-sql TO=20251219000000 ARCHIVE=1" in blocks["rollback-level-1"]
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in re.findall(r"^make ([a-z-]+)", "\n".join(blocks.values()), re.MULTILINE):
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), target
    # Every tokentrack subcommand the runbook shows anywhere exists (its --help exits 0).
    for command in sorted(set(re.findall(r"`tokentrack ([a-z]+(?: [a-z]+)?)", text))):
        words = command.split()
        result = run_cli_sync(*words, "--help")
        if result.code != 0:  # "tokentrack cleanup every ..." style prose: the first word only
            result = run_cli_sync(words[0], "--help")
        assert result.code == 0, command


async def _run_block(
    name: str, dsn: str, cwd: Path, server: PostgresServer
) -> subprocess.CompletedProcess[str]:
    scripts = Path(sys.executable).parent
    if not (scripts / "tokentrack").exists():
        pytest.fail(f"{scripts}/tokentrack not found: install the package (make venv)")
    script = (
        "set -euo pipefail\n"
        f'make() {{ command make --no-print-directory -C "{ROOT}" -o .venv/.installed'
        f' BIN="{scripts}" "$@"; }}\n'
        "set -x\n" + runbook_blocks()[name]
    )
    env = dict(server.client_env())
    env.update(
        DATABASE_URL=dsn,
        PATH=f"{scripts}:{server.bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
    )
    env.pop("TOKENTRACK_SQL_DIR", None)
    return await asyncio.to_thread(
        subprocess.run,
        ["bash", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


async def _v1_rows(conn: asyncpg.Connection) -> dict[str, list[str]]:
    result = {}
    for table in V1_TABLES:
        rows = await conn.fetch(f"SELECT t::text AS row FROM tokentrack.{table} t ORDER BY 1")
        result[table] = [r["row"] for r in rows]
    return result


async def _archive_rows(conn: asyncpg.Connection) -> dict[str, list[str]]:
    """The rows of tokentrack_archive (empty when there is none), without archived_at."""
    result = {}
    for table in V2_TABLES:
        if await conn.fetchval("SELECT to_regclass($1)", f"tokentrack_archive.{table}"):
            rows = await conn.fetch(
                f"SELECT (t.archived_version, t.id)::text FROM tokentrack_archive.{table} t"
                " ORDER BY 1"
            )
            result[table] = [r[0] for r in rows]
    return result


async def _run_reports(
    conn: asyncpg.Connection, account: uuid.UUID, done: int, running: int
) -> int:
    """``done`` completed reports and ``running`` still running; the running ones' tokens."""
    in_flight = 0
    for index in range(done + running):
        report = uuid.uuid4()
        assert (await call(conn, "try_reserve_tokens", account, report, 5_000))["success"]
        for name in ("outline", "draft"):
            answer = await step(conn, report, account, name, 300 + index, 120)
            if index >= done:
                in_flight += answer["total_tokens"]
        if index < done:
            await call(conn, "finish_report", report, account, "complete", None)
    return in_flight


async def _billed_once(conn: asyncpg.Connection) -> None:
    """reconcile() ok, and every step billed by exactly the ledger row it points at."""
    assert (await call(conn, "reconcile", None))["ok"] is True
    assert not await conn.fetchval(
        "SELECT count(*) FROM tokentrack.report_step_usage WHERE billing_entry_id IS NULL"
    )


@pytest.mark.requires_extension("pg_cron")
async def test_the_runbook_as_written(cron_server: PostgresServer, tmp_path: Path) -> None:
    admin = await asyncpg.connect(cron_server.dsn("postgres"))
    try:
        await admin.execute("CREATE DATABASE runbook")
    finally:
        await admin.close()
    dsn = cron_server.dsn("runbook")
    # The database before the deploy: version 20251219000000 with legacy usage.
    await migrate.install(dsn)
    await migrate.rollback(dsn, to="20251219000000")
    conn = await asyncpg.connect(dsn)
    try:
        accounts = [uuid.uuid4() for _ in range(3)]
        for index, account in enumerate(accounts):
            await call(conn, "open_usage_period", account, 1_000_000, None)
            for tokens in (500, 1_200 + index, 90):
                await call(conn, "increment_usage", account, tokens, True, False)
        predeploy = await _v1_rows(conn)
    finally:
        await conn.close()
    workdir = tmp_path / "staging"
    workdir.mkdir()

    # Staging day, 1. Deploy.
    deploy = await _run_block("deploy", dsn, workdir, cron_server)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    assert "tokentrack-predeploy.dump" in os.listdir(workdir)
    for expected in (
        "verify: all checks passed",
        "verify --functional: all staging tests passed",
        "audit: usage periods unchanged (counts and sums)",
        "'tokentrack-expiry-sweep' created: '0 */2 * * *'",
        "monitor: no alert firing",
    ):
        assert expected in deploy.stdout, expected

    # The application runs reports through the new path; two are still running.
    conn = await asyncpg.connect(dsn)
    try:
        account = accounts[0]
        in_flight = await _run_reports(conn, account, done=3, running=2)
        used_before = await conn.fetchval(
            "SELECT tokens_used FROM tokentrack.usage_periods WHERE account_id = $1", account
        )
        steps_before = await conn.fetchval("SELECT count(*) FROM tokentrack.report_step_usage")
    finally:
        await conn.close()

    # Rollback level 1.
    level1 = await _run_block("rollback-level-1", dsn, workdir, cron_server)
    assert level1.returncode == 0, level1.stdout + level1.stderr
    assert "cron: removed job" in level1.stdout
    assert (
        f"cleanup: expired 2 reservation(s), billed {in_flight} tokens (4 step(s))" in level1.stdout
    )
    assert "billed 0 active reservation(s) of version 20260108000000" in level1.stdout
    assert "archived 5 row(s) of tokentrack.report_reservations" in level1.stdout
    assert f"archived {steps_before} row(s) of tokentrack.report_step_usage" in level1.stdout
    assert "applied with matching checksums: 20251219000000\n" in level1.stdout
    assert level1.stdout.count("audit: usage periods unchanged") == 1
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('tokentrack.report_step_usage')") is None
        used = await conn.fetchval(
            "SELECT tokens_used FROM tokentrack.usage_periods WHERE account_id = $1", account
        )
        ledger = await conn.fetchval(
            "SELECT sum(tokens) FROM tokentrack.usage_ledger WHERE account_id = $1", account
        )
        assert used == ledger == used_before + in_flight  # nothing in flight was lost
        first_archive = await _archive_rows(conn)
        assert [len(first_archive[t]) for t in V2_TABLES] == [5, steps_before]
        backed_up = await _v1_rows(conn)  # what the redeploy's pg_dump will hold
        # Level 1 keeps every account and ledger row from before the deploy: it only adds.
        for table in ("accounts", "usage_ledger"):
            assert set(predeploy[table]) <= set(backed_up[table]), table
    finally:
        await conn.close()

    # Deploy again after level 1, in a new directory: the archive comes back, verify (with
    # its reconcile()) passes; issue #11 found "reconcile() is not ok" here.
    redeploy_dir = tmp_path / "redeploy"
    redeploy_dir.mkdir()
    redeploy = await _run_block("deploy", dsn, redeploy_dir, cron_server)
    assert redeploy.returncode == 0, redeploy.stdout + redeploy.stderr
    for expected in (
        "restored 5 row(s) of tokentrack.report_reservations from tokentrack_archive",
        f"restored {steps_before} row(s) of tokentrack.report_step_usage from",
        "verify: all checks passed",
        "audit: usage periods unchanged (counts and sums)",
        "monitor: no alert firing",
    ):
        assert expected in redeploy.stdout, expected
    conn = await asyncpg.connect(dsn)
    try:
        await _billed_once(conn)
        assert await _archive_rows(conn) == {}
        assert (
            await conn.fetchval(
                "SELECT tokens_used FROM tokentrack.usage_periods WHERE account_id = $1", account
            )
            == used_before + in_flight
        )
        # More reports, one still running, then level 1 and level 2 as staging rehearses them.
        more = await _run_reports(conn, account, done=1, running=1)
        assert more > 0
        after_redeploy = await _v1_rows(conn)
    finally:
        await conn.close()
    level1 = await _run_block("rollback-level-1", dsn, redeploy_dir, cron_server)
    assert level1.returncode == 0, level1.stdout + level1.stderr
    assert "archived 7 row(s) of tokentrack.report_reservations" in level1.stdout

    # Rollback level 2: the redeploy's pre-deploy backup comes back exactly, and with it the
    # archive of the first level-1 rollback (the second one's is in the before-restore dump).
    level2 = await _run_block("rollback-level-2", dsn, redeploy_dir, cron_server)
    assert level2.returncode == 0, level2.stdout + level2.stderr
    assert "drop cascades to table tokentrack.usage_periods" in level2.stderr
    assert "drop cascades to table tokentrack_archive.report_step_usage" in level2.stderr
    assert "audit: usage periods unchanged (counts and sums)" in level2.stdout
    assert "tokentrack-before-restore.dump" in os.listdir(redeploy_dir)
    conn = await asyncpg.connect(dsn)
    try:
        restored = await _v1_rows(conn)
        assert restored == backed_up != after_redeploy  # usage since that backup is gone
        assert await _archive_rows(conn) == first_archive
        versions = await conn.fetch("SELECT version FROM tokentrack.schema_migrations")
        assert [v["version"] for v in versions] == ["20251219000000"]
    finally:
        await conn.close()

    # Deploy again, then the monitoring commands.
    again = await _run_block("deploy", dsn, redeploy_dir, cron_server)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "verify: all checks passed" in again.stdout
    conn = await asyncpg.connect(dsn)
    try:
        await _billed_once(conn)
    finally:
        await conn.close()
    monitoring = await _run_block("monitoring", dsn, redeploy_dir, cron_server)
    assert monitoring.returncode == 0, monitoring.stdout + monitoring.stderr
    assert "monitor: no alert firing" in monitoring.stdout
    assert '"command": "CALL tokentrack.sweep_expired_reservations(100)"' in monitoring.stdout


@pytest.mark.parametrize(
    "command",
    [
        ("audit",),
        ("audit", "baseline"),
        ("audit", "compare"),
        ("verify",),
        ("monitor",),
        ("cleanup",),
        ("cron",),
        ("cron", "install"),
        ("cron", "remove"),
        ("cron", "status"),
    ],
)
def test_every_operations_command_has_help(command: tuple[str, ...]) -> None:
    result = run_cli_sync(*command, "--help")
    assert result.code == 0
    assert result.out.startswith(f"usage: tokentrack {' '.join(command)}")
    if command not in (("audit",), ("cron",)):
        assert "--database-url URL" in result.out


def test_no_database_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    for command in (("verify",), ("monitor",), ("cleanup",), ("cron", "install")):
        result = run_cli_sync(*command)
        assert result.code == 2
        assert result.err == (
            "tokentrack: error: no database given: pass --database-url URL or set DATABASE_URL\n"
        )
