"""``tokentrack demo`` end to end, as a subprocess: on its own throwaway server (also when
interrupted with Ctrl-C, and when DATABASE_URL is exported: it is ignored), and on a database
given by --database-url, which it refuses when it holds accounts other than the demo's."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg

from tokentrack_client.demo import ACCOUNT_IDS, ACCOUNTS, TEAM_DAY_LIMIT, estimate, worst_case

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
# What the demo must have set, written out here: micros per million tokens of each class
# (cached input and reasoning as the demo gives them, cache write defaulting to input,
# reasoning to output).
PRICES = {
    "gpt-4o-mini": (150_000, 75_000, 150_000, 600_000, 600_000),
    "gpt-4o": (2_500_000, 1_250_000, 2_500_000, 10_000_000, 10_000_000),
    "o3-mini": (1_100_000, 550_000, 1_100_000, 4_400_000, 4_400_000),
}
COST = re.compile(r"^\$\d+\.\d{6}$")
STANDARD = estimate("standard")  # research-1's estimate: more than the team's day allows
FIRST = worst_case(("AN0", "AN1.7"))  # research-2's first estimate
MORE = worst_case(("AN1.5",))  # and its extension


def demo_env(database_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    if database_url:
        env["DATABASE_URL"] = database_url
    return env


def table_rows(output: str) -> dict[str, list[str]]:
    """The demo's table: report name -> [mode, outcome, reserved, billed, cost, steps...]."""
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


def tokens(text: str) -> int:
    return int(text.replace(",", ""))


def check_budget_story(output: str, rows: dict[str, list[str]]) -> int:
    """The budget lines of a first run on a database (the team's day unused): research-1
    refused by the team's day while acme's month has room, research-2 extended mid-report and
    billed past its first estimate without over_reservation. Returns what research-2 billed."""
    assert STANDARD > TEAM_DAY_LIMIT >= FIRST + MORE  # the story's premise
    assert (
        f"budgets: acme's team:research gets a daily budget of {TEAM_DAY_LIMIT:,} tokens "
        "(set_budget, days in UTC)" in output
    )
    assert (
        f"  research-1 (standard, subjects team:research): reserve {STANDARD:,} tokens: refused, "
        f"insufficient_budget: team:research's day budget has {TEAM_DAY_LIMIT:,} tokens "
        f"available, {STANDARD:,} requested" in output
    )
    # acme's month: its limit less what acme-1 and acme-2 billed, less research-1's estimate.
    month = re.search(
        r"^  acme's month would allow it: the same reservation without the team's subject is "
        r"granted, ([\d,]+) tokens of the month to spare \(rolled back\)$",
        output,
        re.M,
    )
    assert month, output
    billed_acme = tokens(rows["acme-1"][3]) + tokens(rows["acme-2"][3])
    assert tokens(month.group(1)) == ACCOUNTS["acme"] - billed_acme - STANDARD
    assert (
        f"  research-2 (discovery, subjects team:research): reserve {FIRST:,} tokens (the worst "
        f"case of AN0 and AN1.7): granted; the team's day has {TEAM_DAY_LIMIT - FIRST:,} left"
        in output
    )
    assert (
        f"  mid-report research-2 adds AN1.5: extend_reservation +{MORE:,} tokens: granted, "
        f"{FIRST + MORE:,} reserved; the team's day has {TEAM_DAY_LIMIT - FIRST - MORE:,} left"
        in output
    )
    done = re.search(
        rf"^  research-2 complete: billed ([\d,]+) tokens, more than its first estimate of "
        rf"{FIRST:,}; no step answered over_reservation$",
        output,
        re.M,
    )
    assert done, output
    billed = tokens(done.group(1))
    assert FIRST < billed <= FIRST + MORE
    assert re.search(
        rf"^  team:research's day \(from \S+T00:00:00\+00:00\): {billed:,} of "
        rf"{TEAM_DAY_LIMIT:,} tokens used$",
        output,
        re.M,
    ), output
    return billed


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
        mode, outcome, _reserved, _billed, cost, steps = rows[name][:6]
        assert (outcome, int(steps)) == ("complete", STEPS[mode])
        assert COST.match(cost), cost
        assert cost != "$0.000000"
    assert rows["globex-1"][1] == "cancelled"
    assert rows["globex-1"][5:8] == ["3", "(1", "late)"]  # the step in flight, billed late
    assert rows["globex-2"][1] == "failed"
    assert COST.match(rows["globex-2"][4])  # the steps it recorded before failing are billed
    race = sorted(rows[name][1] for name in ("initech-1", "initech-2"))
    assert race == ["complete", "refused"]
    refused = next(rows[n] for n in ("initech-1", "initech-2") if rows[n][1] == "refused")
    assert refused[2:6] == ["-", "0", "-", "0"]
    assert "prices set (micros of one currency per installation" in output
    check_budget_story(output, rows)
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
    assert "budgets: " not in output  # the budget story does not start once interrupted
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


def round_half_up(numerator: int) -> int:
    """numerator / 10^6 rounded half up (numerator >= 0): a cost in micros."""
    return (numerator + 500_000) // 1_000_000


def expected_costs(steps: list[asyncpg.Record]) -> dict[uuid.UUID, str]:
    """Each report's cost as the demo must print it, from its steps' tokens and PRICES alone:
    each step priced and rounded once, the report the sum of its steps."""
    micros: dict[uuid.UUID, int] = {}
    for s in steps:
        p_in, p_cached, p_write, p_out, p_reasoning = PRICES[s["model"]]
        plain_input = s["input_tokens"] - s["cached_input_tokens"] - s["cache_write_tokens"]
        step = round_half_up(
            plain_input * p_in
            + s["cached_input_tokens"] * p_cached
            + s["cache_write_tokens"] * p_write
            + (s["output_tokens"] - s["reasoning_tokens"]) * p_out
            + s["reasoning_tokens"] * p_reasoning
        )
        micros[s["report_id"]] = micros.get(s["report_id"], 0) + step
    return {report: f"${m // 1_000_000}.{m % 1_000_000:06d}" for report, m in micros.items()}


async def check_costs(conn: asyncpg.Connection, since: dt.datetime, output: str) -> None:
    """The cost column of the run started at ``since``, against the costs computed here."""
    reports = await conn.fetch(
        "SELECT r.id, r.account_id, r.mode, r.status FROM tokentrack.reports r"
        " WHERE r.created_at >= $1",
        since,
    )
    steps = await conn.fetch(
        "SELECT s.report_id, s.model, s.input_tokens, s.cached_input_tokens,"
        " s.cache_write_tokens, s.output_tokens, s.reasoning_tokens"
        " FROM tokentrack.report_step_usage s WHERE s.report_id = ANY($1::uuid[])",
        [r["id"] for r in reports],
    )
    # The demo records classes: cached input on the long gpt-4o steps, reasoning on o3-mini's.
    assert any(s["cached_input_tokens"] > 0 for s in steps)
    assert any(s["reasoning_tokens"] > 0 and s["model"] == "o3-mini" for s in steps)
    costs = expected_costs(steps)
    names = {account_id: name for name, account_id in ACCOUNT_IDS.items()}
    rows = table_rows(output)
    checked = 0
    for name, mode in REPORTS.items():
        account = name.split("-")[0]
        outcome, cost = rows[name][1], rows[name][4]
        if outcome == "refused":
            assert cost == "-"
            continue
        # (account, mode) names one report of the run, but for initech's two standard ones,
        # of which only one was granted and has steps.
        [report] = [
            r["id"]
            for r in reports
            if names[r["account_id"]] == account and r["mode"] == mode and r["id"] in costs
        ]
        assert cost == costs[report], (name, cost, costs[report])
        checked += 1
    assert checked == len(REPORTS) - 1


async def test_the_demo_uses_the_database_given_on_its_command_line(empty_db_dsn: str) -> None:
    billed = [0]
    for run in range(2):  # the second run finds the SQL installed and its own accounts there
        since = dt.datetime.now(dt.UTC)
        result = await run_demo_on(empty_db_dsn)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "using the database given by --database-url" in result.stdout
        assert "throwaway" not in result.stdout
        expected = "is now at version" if run == 0 else "is up to date"
        assert expected in result.stdout
        rows = check_table(result.stdout)
        assert re.search(r"^reconcile: ok", result.stdout, re.M)
        if run == 0:
            billed[0] = check_budget_story(result.stdout, rows)
        else:
            # The same day (the window has not turned since run 0): the team's day holds run
            # 0's usage, so both research reports are refused by it, and say so.
            # (Unless the UTC day turned between the two runs: then it is run 0's story.)
            left = TEAM_DAY_LIMIT - billed[0]
            if f"day budget has {left:,} tokens available" in result.stdout:
                assert (
                    f"  research-1 (standard, subjects team:research): reserve {STANDARD:,} "
                    f"tokens: refused, insufficient_budget: team:research's day budget has "
                    f"{left:,} tokens available, {STANDARD:,} requested" in result.stdout
                )
                assert (
                    f"  research-2 (discovery, subjects team:research): reserve {FIRST:,} "
                    f"tokens: refused, insufficient_budget: team:research's day budget has "
                    f"{left:,} tokens available, {FIRST:,} requested (earlier runs used the "
                    "team's day)" in result.stdout
                )
                assert "research-2 complete" not in result.stdout
            else:  # pragma: no cover - only across midnight UTC
                assert f"reserve {FIRST:,} tokens (the worst case" in result.stdout
        conn = await asyncpg.connect(empty_db_dsn)
        try:
            await check_costs(conn, since, result.stdout)
        finally:
            await conn.close()
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        prices = await conn.fetch(
            "SELECT model, input, cached_input, cache_write, output, reasoning"
            " FROM tokentrack.model_prices"
        )
        # Set once: the second run's set_model_price found the same prices (duplicates).
        assert {r["model"]: tuple(r[1:]) for r in prices} == PRICES
        assert len(prices) == len(PRICES)
        modes = await conn.fetch("SELECT mode, count(*) FROM tokentrack.reports GROUP BY mode")
        assert {r["mode"]: r["count"] for r in modes} == {
            "standard": 6,
            "dd": 2,
            "hybrid": 4,
            "discovery": 5,  # run 0's research-2 too, its mode set by reserve
        }
        accounts = await conn.fetch("SELECT id FROM tokentrack.accounts")
        assert {r["id"] for r in accounts} == set(ACCOUNT_IDS.values())  # the same four
        verdict = await conn.fetchval("SELECT tokentrack.reconcile(NULL) ->> 'ok'")
        assert verdict == "true"
        # One team budget, created once (set_budget again with the same limit changes nothing);
        # its windows used what the team's reports were billed, run 0's research-2 among them.
        budgets = await conn.fetch("SELECT id, subject, budget_window FROM tokentrack.budgets")
        assert [(r["subject"], r["budget_window"]) for r in budgets] == [("team:research", "day")]
        assert await conn.fetchval("SELECT count(*) FROM tokentrack.budget_changes") == 1
        used = await conn.fetchval("SELECT sum(used) FROM tokentrack.budget_windows")
        team_billed = await conn.fetchval(
            "SELECT sum(billed_tokens) FROM tokentrack.report_reservations WHERE holds IS NOT NULL"
        )
        assert used == team_billed >= billed[0] > 0
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


async def test_a_role_that_may_not_set_prices_runs_the_demo_unpriced(db_dsn: str) -> None:
    """set_model_price is the schema owner's: with an application role the demo says the
    prices were not set, records the steps unpriced, and marks their reports' cost."""
    role = f"tt_demo_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute(f"CREATE ROLE {role} LOGIN IN ROLE tokentrack_service")
        await conn.execute(f"GRANT INSERT ON tokentrack.reports TO {role}")
        # The demo checks the installed version first: the migrator's tables must be readable.
        await conn.execute(
            f"GRANT SELECT ON tokentrack.schema_migrations, tokentrack.schema_functions TO {role}"
        )
        user = await conn.fetchval("SELECT current_user")
        result = await run_demo_on(db_dsn.replace(f"//{user}@", f"//{role}@", 1))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "prices: not set (only the schema owner may call set_model_price)" in result.stdout
        rows = check_table(result.stdout)
        for name, row in rows.items():
            assert row[4] == ("-" if row[1] == "refused" else "$0.000000*"), (name, row)
        assert "*: the report has steps of a model without a price" in result.stdout
        assert await conn.fetchval("SELECT count(*) FROM tokentrack.model_prices") == 0
        unpriced = await conn.fetchval(
            "SELECT count(*) FROM tokentrack.report_step_usage WHERE cost_micros IS NULL"
        )
        assert unpriced == await conn.fetchval("SELECT count(*) FROM tokentrack.report_step_usage")
        assert unpriced > 0
    finally:
        await conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
        await conn.close()
