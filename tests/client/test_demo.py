"""``tokentrack demo`` end to end, as a subprocess: on its own throwaway server (also when
interrupted with Ctrl-C, and when DATABASE_URL is exported: it is ignored), and on a database
given by --database-url, which it refuses when it holds accounts other than the demo's."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg

from tokentrack_client.demo import ACCOUNT_IDS

REPORTS = {
    "acme-1": "standard",
    "acme-2": "dd",
    "umbrella-1": "hybrid",
    "umbrella-2": "discovery",
    "globex-1": "discovery",
    "globex-2": "hybrid",
    "initech-1": "standard",
    "initech-2": "standard",
}
STEPS = {"standard": 4, "dd": 7, "discovery": 4, "hybrid": 5}
TIMEOUT = 180


def demo_env(database_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    if database_url:
        env["DATABASE_URL"] = database_url
    return env


def table_rows(output: str) -> dict[str, list[str]]:
    """The demo's table: report name -> [mode, outcome, reserved, billed, steps...]."""
    rows = {}
    for line in output.splitlines():
        cells = line.split()
        if cells and cells[0] in REPORTS:
            rows[cells[0]] = cells[1:]
    return rows


def server_dir(output: str) -> Path:
    found = re.search(r"PostgreSQL running in (\S+) on 127\.0\.0\.1:(\d+)", output)
    assert found, output
    return Path(found.group(1))


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that mention ``text`` (e.g. a data directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


def assert_no_server_left(output: str) -> None:
    base = server_dir(output)
    port = int(re.search(r"on 127\.0\.0\.1:(\d+)", output).group(1))  # type: ignore[union-attr]
    assert f"stopped PostgreSQL and removed {base}" in output
    assert not base.exists()
    assert processes_mentioning(str(base)) == []
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def check_table(output: str) -> dict[str, list[str]]:
    rows = table_rows(output)
    assert set(rows) == set(REPORTS), output
    for name, mode in REPORTS.items():
        assert rows[name][0] == mode
    return rows


async def test_the_demo_runs_on_its_own_server_and_leaves_nothing_behind(
    empty_db_dsn: str,
) -> None:
    # DATABASE_URL exported (as the runbook has operators do): the demo must not touch it.
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tokentrack_client", "demo"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=demo_env(empty_db_dsn),
        check=False,
    )
    output = result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    assert "DATABASE_URL is ignored" in output
    conn = await asyncpg.connect(empty_db_dsn)
    try:  # not even the SQL was installed there
        assert await conn.fetchval("SELECT to_regnamespace('tokentrack')") is None
    finally:
        await conn.close()
    assert "progress: 8/8 reports done" in output
    rows = check_table(output)
    for name in ("acme-1", "acme-2", "umbrella-1", "umbrella-2"):
        mode, outcome, _reserved, _billed, steps = rows[name][:5]
        assert (outcome, int(steps)) == ("complete", STEPS[mode])
    assert rows["globex-1"][1] == "cancelled"
    assert rows["globex-1"][4:7] == ["3", "(1", "late)"]  # the step in flight, billed late
    assert rows["globex-2"][1] == "failed"
    race = sorted(rows[name][1] for name in ("initech-1", "initech-2"))
    assert race == ["complete", "refused"]
    refused = next(rows[n] for n in ("initech-1", "initech-2") if rows[n][1] == "refused")
    assert refused[2:5] == ["-", "0", "0"]
    assert re.search(r"^reconcile: ok \(4 accounts, 4 periods checked", output, re.M), output
    assert_no_server_left(output)


def test_ctrl_c_cancels_the_running_reports_and_removes_the_server() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tokentrack_client", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=demo_env(),
    )
    assert process.stdout is not None
    seen = []
    try:
        for line in process.stdout:
            seen.append(line)
            if line.startswith("progress: "):  # reports are running
                process.send_signal(signal.SIGINT)
                break
        rest, errors = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:  # pragma: no cover - only when the demo hangs
            process.kill()
            process.wait()
    output = "".join(seen) + rest
    assert process.returncode == 130, output + errors
    assert "interrupted" in errors
    assert re.search(r"^interrupted: [1-8] running report\(s\) were marked cancelled", output, re.M)
    rows = check_table(output)
    assert "processing" not in {row[1] for row in rows.values()}  # every report has an outcome
    assert "cancelled" in {row[1] for row in rows.values()}
    assert re.search(r"^reconcile: ok", output, re.M), output
    assert_no_server_left(output)


async def run_demo_on(dsn: str) -> subprocess.CompletedProcess[str]:
    """``tokentrack demo --database-url dsn``, with another DATABASE_URL exported."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tokentrack_client", "demo", "--database-url", dsn],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=demo_env("postgresql://nobody@127.0.0.1:1/not-this-one"),
        check=False,
    )


async def test_the_demo_uses_the_database_given_on_its_command_line(empty_db_dsn: str) -> None:
    for run in range(2):  # the second run finds the SQL installed and its own accounts there
        result = await run_demo_on(empty_db_dsn)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "using the database given by --database-url" in result.stdout
        assert "throwaway" not in result.stdout
        expected = "is now at version" if run == 0 else "is up to date"
        assert expected in result.stdout
        check_table(result.stdout)
        assert re.search(r"^reconcile: ok", result.stdout, re.M)
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        modes = await conn.fetch("SELECT mode, count(*) FROM tokentrack.reports GROUP BY mode")
        assert {r["mode"]: r["count"] for r in modes} == {
            "standard": 6,
            "dd": 2,
            "hybrid": 4,
            "discovery": 4,
        }
        accounts = await conn.fetch("SELECT id FROM tokentrack.accounts")
        assert {r["id"] for r in accounts} == set(ACCOUNT_IDS.values())  # the same four
        verdict = await conn.fetchval("SELECT tokentrack.reconcile(NULL) ->> 'ok'")
        assert verdict == "true"
    finally:
        await conn.close()


async def test_the_demo_refuses_a_database_with_other_accounts(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        customer = uuid.uuid4()
        await conn.fetchval("SELECT tokentrack.open_usage_period($1, 1000, NULL)", customer)
        before = await conn.fetchval("SELECT count(*) FROM tokentrack.usage_ledger")
        result = await run_demo_on(db_dsn)
        assert result.returncode == 2, result.stdout + result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("tokentrack: error: refusing "), lines
        assert "1 account(s) that are not the demo's" in lines[0]
        accounts = await conn.fetch("SELECT id FROM tokentrack.accounts")
        assert [r["id"] for r in accounts] == [customer]  # nothing written
        assert await conn.fetchval("SELECT count(*) FROM tokentrack.usage_ledger") == before
    finally:
        await conn.close()


async def test_a_database_failure_mid_demo_is_one_line_and_exit_2(db_dsn: str) -> None:
    """The installed SQL is up to date and the database holds no account, but nothing can be
    written (read-only sessions): the first call fails inside the client, which the demo must
    report as one line and exit 2 like every other command, not as a traceback and exit 1."""
    conn = await asyncpg.connect(db_dsn)
    try:
        dbname = await conn.fetchval("SELECT current_database()")
        await conn.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')
    finally:
        await conn.close()
    result = await run_demo_on(db_dsn)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tokentrack: error: "), lines
    assert "read-only transaction" in lines[0], lines
    assert "Traceback" not in result.stdout + result.stderr
