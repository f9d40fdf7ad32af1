"""``tokentrack cleanup`` and ``tokentrack cron``: the sweep once, and scheduled by a real pg_cron.

The pg_cron tests use a server of their own with ``shared_preload_libraries = 'pg_cron'``
(the ``cron_server`` fixture of ops_history.py; Debian's postgresql-15-cron, which
``make test`` installs) and let pg_cron run the job.
Debian bookworm ships pg_cron 1.4.2, whose smallest schedule is one minute ('* * * * *'),
so the test that watches a run waits for the next minute boundary (at most about a minute);
from pg_cron 1.5 on it uses '2 seconds'.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from ops_history import CliResult, call, tokentrack
from sqlkit import race_a_short_batch
from tokentrack_client import migrate
from tokentrack_client.testing import PostgresServer

SWEEP = "CALL tokentrack.sweep_expired_reservations(100)"


async def _seed_expired(dsn: str, reservations: int) -> tuple[uuid.UUID, int, int]:
    """An account with ``reservations`` expired reservations holding 2 steps each."""
    conn = await asyncpg.connect(dsn)
    try:
        account = uuid.uuid4()
        assert (await call(conn, "open_usage_period", account, 10_000_000, None))["success"]
        tokens = steps = 0
        for index in range(reservations):
            report = uuid.uuid4()
            assert (await call(conn, "try_reserve_tokens", account, report, 1_000))["success"]
            for step in ("outline", "draft"):
                answer = await call(
                    conn, "persist_step_usage", report, account, step, 100 + index, 50, None, None
                )
                tokens += answer["total_tokens"]
                steps += 1
        await conn.execute(
            "UPDATE tokentrack.report_reservations SET created_at = now() - interval '3 hours',"
            " expires_at = now() - interval '1 hour' WHERE account_id = $1",
            account,
        )
        return account, tokens, steps
    finally:
        await conn.close()


async def _state(dsn: str, account: uuid.UUID) -> tuple[int, int, bool]:
    """(active reservations, tokens_used of the account's period, reconcile ok)."""
    conn = await asyncpg.connect(dsn)
    try:
        active = await conn.fetchval(
            "SELECT count(*) FROM tokentrack.report_reservations"
            " WHERE account_id = $1 AND status = 'active'",
            account,
        )
        used = await conn.fetchval(
            "SELECT tokens_used FROM tokentrack.usage_periods WHERE account_id = $1", account
        )
        ok = (await call(conn, "reconcile", None))["ok"]
        return int(active), int(used), bool(ok)
    finally:
        await conn.close()


# --------------------------------------------------------------------------------------------
# cleanup
# --------------------------------------------------------------------------------------------


async def test_cleanup_expires_and_bills_what_was_left(history_dsn: str) -> None:
    account, tokens, steps = await _seed_expired(history_dsn, 4)
    result = await tokentrack("cleanup", "--database-url", history_dsn)
    assert result.code == 0, result
    # One batch of (at most) 100, then one that finds nothing due.
    assert result.out == (
        f"cleanup: expired 4 reservation(s), billed {tokens} tokens ({steps} step(s))"
        " in 2 transaction(s)\n"
    )
    assert await _state(history_dsn, account) == (0, tokens, True)
    again = await tokentrack("cleanup", "--json", "--database-url", history_dsn)
    assert json.loads(again.out) == {"expired": 0, "billed_tokens": 0, "steps": 0, "batches": 1}


async def test_cleanup_in_batches_commits_each(db_dsn: str) -> None:
    account, tokens, steps = await _seed_expired(db_dsn, 5)
    result = await tokentrack("cleanup", "--batch-size", "2", "--json", "--database-url", db_dsn)
    assert result.code == 0, result
    assert json.loads(result.out) == {
        "expired": 5,
        "billed_tokens": tokens,
        "steps": steps,
        "batches": 4,
    }
    assert await _state(db_dsn, account) == (0, tokens, True)


async def test_cleanup_commits_in_batches_of_100_by_default(db_dsn: str) -> None:
    """Point 9 of issue #11: without --batch-size, cleanup swept everything in one
    transaction (cleanup_expired_reservations), locking every affected period until the end."""
    account, tokens, steps = await _seed_expired(db_dsn, 220)
    result = await tokentrack("cleanup", "--json", "--database-url", db_dsn)
    assert result.code == 0, result
    assert json.loads(result.out) == {
        "expired": 220,
        "billed_tokens": tokens,
        "steps": steps,
        "batches": 4,  # 100, 100, 20, and one that found nothing due
    }
    assert await _state(db_dsn, account) == (0, tokens, True)


async def test_cleanup_goes_on_after_a_batch_shortened_by_a_concurrent_finalize(
    db_dsn: str,
) -> None:
    """Point 9 of issue #11: cleanup stopped after a batch that expired fewer than its size,
    leaving a due reservation active (race_a_short_batch asserts none is left)."""
    result = await race_a_short_batch(
        db_dsn,
        lambda: tokentrack("cleanup", "--batch-size", "2", "--json", "--database-url", db_dsn),
    )
    assert isinstance(result, CliResult)
    assert result.code == 0, result
    assert json.loads(result.out) == {"expired": 2, "billed_tokens": 6, "steps": 2, "batches": 3}


async def test_cleanup_errors(empty_db_dsn: str) -> None:
    missing = await tokentrack("cleanup", "--database-url", empty_db_dsn)
    assert missing.code == 2
    assert missing.err.startswith("tokentrack: error: tokentrack.report_reservations not found")
    zero = await tokentrack("cleanup", "--batch-size", "0", "--database-url", empty_db_dsn)
    assert zero.code == 2
    assert "must be at least 1" in zero.err


# --------------------------------------------------------------------------------------------
# cron without pg_cron
# --------------------------------------------------------------------------------------------


async def test_cron_install_says_clearly_when_pg_cron_is_not_loaded(db_dsn: str) -> None:
    """The session server does not preload pg_cron: nothing is scheduled, and it says why."""
    result = await tokentrack("cron", "install", "--database-url", db_dsn)
    assert result.code == 2
    assert result.err.startswith("tokentrack: error: pg_cron is ")
    assert "so nothing was scheduled" in result.err
    assert "shared_preload_libraries" in result.err
    assert result.err.count("\n") == 1
    tolerant = await tokentrack("cron", "install", "--if-available", "--database-url", db_dsn)
    assert tolerant.code == 0
    assert tolerant.err.startswith("tokentrack: notice: pg_cron is ")
    for action in ("status", "remove"):
        other = await tokentrack("cron", action, "--database-url", db_dsn)
        assert other.code == 2
        assert "nothing was scheduled" in other.err


# --------------------------------------------------------------------------------------------
# cron with a real pg_cron
# --------------------------------------------------------------------------------------------


async def _cron_rows(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(
            await conn.fetch("SELECT jobid, jobname, schedule, command, database FROM cron.job")
        )
    finally:
        await conn.close()


@pytest.mark.requires_extension("pg_cron")
async def test_cron_install_is_idempotent_and_pg_cron_runs_the_sweep(
    cron_server: PostgresServer,
) -> None:
    home = cron_server.dsn("postgres")  # cron.database_name: pg_cron lives here
    app = cron_server.dsn("tokentrack_app")  # the usual layout: tokentrack in another database
    admin = await asyncpg.connect(home)
    try:
        await admin.execute("CREATE DATABASE tokentrack_app")
    finally:
        await admin.close()
    for dsn in (home, app):
        await migrate.install(dsn)

    first = await tokentrack("cron", "install", "--database-url", app)
    assert first.code == 0, first
    assert first.out.startswith("cron: created extension pg_cron in database postgres\n")
    assert "created: '0 */2 * * *' runs 'CALL tokentrack.sweep_expired_reservations(100)'" in (
        first.out
    )
    assert "in database tokentrack_app" in first.out
    [job] = await _cron_rows(home)
    assert (job["jobname"], job["schedule"], job["command"], job["database"]) == (
        "tokentrack-expiry-sweep",
        "0 */2 * * *",
        SWEEP,
        "tokentrack_app",
    )

    again = await tokentrack("cron", "install", "--database-url", app)
    assert again.code == 0
    assert f"cron: job {job['jobid']} 'tokentrack-expiry-sweep' unchanged" in again.out
    assert "created extension" not in again.out
    assert [tuple(r) for r in await _cron_rows(home)] == [tuple(job)]

    conn = await asyncpg.connect(home)
    try:
        version = await conn.fetchval(
            "SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'"
        )
    finally:
        await conn.close()
    major, minor = (int(p) for p in str(version).split("-")[0].split(".")[:2])
    fast = "2 seconds" if (major, minor) >= (1, 5) else "* * * * *"

    # A short schedule for the test: the same job is updated, not duplicated.
    updated = await tokentrack("cron", "install", "--schedule", fast, "--database-url", app)
    assert updated.code == 0
    assert f"cron: job {job['jobid']} 'tokentrack-expiry-sweep' updated: '{fast}'" in updated.out
    # The same-database layout: pg_cron and tokentrack both in cron.database_name.
    local = await tokentrack(
        "cron",
        "install",
        "--job-name",
        "tokentrack-sweep-home",
        "--schedule",
        fast,
        "--database-url",
        home,
    )
    assert local.code == 0, local
    rows = {r["jobname"]: r for r in await _cron_rows(home)}
    assert rows["tokentrack-expiry-sweep"]["jobid"] == job["jobid"]
    assert rows["tokentrack-expiry-sweep"]["schedule"] == fast
    assert rows["tokentrack-sweep-home"]["database"] == "postgres"

    seeded = {dsn: await _seed_expired(dsn, 3) for dsn in (app, home)}
    deadline = time.monotonic() + 150
    while True:
        states = {dsn: await _state(dsn, account) for dsn, (account, _, _) in seeded.items()}
        if all(active == 0 for active, _, _ in states.values()):
            break
        assert time.monotonic() < deadline, f"pg_cron did not sweep in time: {states}"
        await asyncio.sleep(0.5)
    for dsn, (_, tokens, _) in seeded.items():
        assert states[dsn] == (0, tokens, True)

    status = await tokentrack("cron", "status", "--database-url", app)
    assert status.code == 0
    data = json.loads(status.out)
    assert data["job"]["command"] == SWEEP
    deadline = time.monotonic() + 30
    while not any(r["status"] == "succeeded" for r in data["runs"]):
        assert time.monotonic() < deadline, data
        await asyncio.sleep(0.2)
        data = json.loads((await tokentrack("cron", "status", "--database-url", app)).out)

    removed = await tokentrack("cron", "remove", "--database-url", app)
    assert removed.code == 0
    assert removed.out == f"cron: removed job {job['jobid']} (tokentrack-expiry-sweep)\n"
    gone = await tokentrack("cron", "remove", "--database-url", app)
    assert gone.out == "cron: no tokentrack sweep job was scheduled; nothing to remove\n"
    assert [r["jobname"] for r in await _cron_rows(home)] == ["tokentrack-sweep-home"]


@pytest.mark.requires_extension("pg_cron")
async def test_cron_install_refuses_a_database_without_tokentrack(
    cron_server: PostgresServer,
) -> None:
    result = await tokentrack("cron", "install", "--database-url", cron_server.dsn("template1"))
    assert result.code == 2
    assert result.err.startswith(
        "tokentrack: error: tokentrack.sweep_expired_reservations(integer) not found"
    )


# --------------------------------------------------------------------------------------------
# cron as a role that is not a superuser
# --------------------------------------------------------------------------------------------

SCHEDULE_IN_DATABASE = "cron.schedule_in_database(text,text,text,text,text,boolean)"


def _as(dsn: str, role: str) -> str:
    """``dsn`` logging in as ``role`` (trust authentication on the test servers)."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}"))


async def _admin(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def _one_line(result: CliResult, prefix: str) -> None:
    assert result.err.startswith(prefix), result
    assert result.err.count("\n") == 1, result
    assert "pg_read_all_settings" not in result.err, result


@pytest.mark.requires_extension("pg_cron")
async def test_cron_as_a_non_superuser_where_pg_cron_is_not_loaded(db_dsn: str) -> None:
    """Point 3 of issue #11: a role that may not read shared_preload_libraries got that
    error from every cron command (exit 2), `cron remove --if-available` (the first line of
    the rollback blocks) included. The session server does not preload pg_cron."""
    role = f"tt_cron_{uuid.uuid4().hex[:10]}"
    await _admin(db_dsn, f"CREATE ROLE {role} LOGIN", f"GRANT tokentrack_service TO {role}")
    try:
        dsn = _as(db_dsn, role)
        for action in ("install", "status", "remove"):
            refused = await tokentrack("cron", action, "--database-url", dsn)
            assert refused.code == 2, refused
            _one_line(refused, "tokentrack: error: pg_cron is installed but not loaded")
            tolerant = await tokentrack("cron", action, "--if-available", "--database-url", dsn)
            assert (tolerant.code, tolerant.out) == (0, ""), tolerant
            _one_line(tolerant, "tokentrack: notice: pg_cron is installed but not loaded")
    finally:
        await _admin(db_dsn, f"DROP OWNED BY {role}", f"DROP ROLE {role}")


@pytest.mark.requires_extension("pg_cron")
async def test_cron_works_for_a_non_superuser_database_owner(
    cron_server: PostgresServer,
) -> None:
    """Point 3 of issue #11. The owner of the tokentrack database, no superuser, with pg_cron
    in database postgres (cron.database_name): each missing grant is named on one line (exit
    2, or exit 0 with --if-available), then with USAGE on schema cron and EXECUTE on
    cron.schedule_in_database (pg_cron revokes it from PUBLIC) it installs the job, pg_cron
    runs the sweep as that owner, and it removes the job. A non-superuser in pg_cron's own
    database needs only USAGE (cron.schedule)."""
    home = cron_server.dsn("postgres")
    owner = f"tt_cron_owner_{uuid.uuid4().hex[:8]}"
    member = f"tt_cron_member_{uuid.uuid4().hex[:8]}"
    database = f"tt_owned_{uuid.uuid4().hex[:8]}"
    await _admin(
        home,
        "CREATE EXTENSION IF NOT EXISTS pg_cron",
        f"CREATE ROLE {owner} LOGIN CREATEROLE NOSUPERUSER",
        f"CREATE DATABASE {database} OWNER {owner}",
    )
    app = _as(cron_server.dsn(database), owner)
    try:
        await migrate.install(app)

        status = await tokentrack("cron", "status", "--database-url", app)
        assert status.code == 2, status
        _one_line(status, "tokentrack: error: pg_cron 1.")
        assert f"GRANT USAGE ON SCHEMA cron TO {owner} in database postgres" in status.err
        rollback_first_line = await tokentrack(
            "cron", "remove", "--if-available", "--database-url", app
        )
        assert rollback_first_line.code == 0, rollback_first_line
        _one_line(rollback_first_line, "tokentrack: notice: pg_cron 1.")

        await _admin(home, f"GRANT USAGE ON SCHEMA cron TO {owner}")
        refused = await tokentrack("cron", "install", "--database-url", app)
        assert refused.code == 2, refused
        _one_line(refused, f"tokentrack: error: role {owner} may not EXECUTE")
        assert f"GRANT EXECUTE ON FUNCTION {SCHEDULE_IN_DATABASE} TO {owner}" in refused.err
        status = await tokentrack("cron", "status", "--database-url", app)
        assert status.code == 0, status
        assert json.loads(status.out)["job"] is None

        await _admin(home, f"GRANT EXECUTE ON FUNCTION {SCHEDULE_IN_DATABASE} TO {owner}")
        created = await tokentrack(
            "cron", "install", "--schedule", "* * * * *", "--database-url", app
        )
        assert created.code == 0, created
        assert f"in database {database} as {owner} (pg_cron " in created.out
        again = await tokentrack(
            "cron", "install", "--schedule", "* * * * *", "--database-url", app
        )
        assert " unchanged: " in again.out, again
        [job] = [r for r in await _cron_rows(home) if r["database"] == database]
        assert (job["jobname"], job["command"]) == ("tokentrack-expiry-sweep", SWEEP)

        # pg_cron runs it as the owner (its smallest schedule in 1.4 is a minute).
        account, tokens, _ = await _seed_expired(app, 2)
        deadline = time.monotonic() + 150
        while (state := await _state(app, account))[0] != 0:
            assert time.monotonic() < deadline, f"pg_cron did not sweep in time: {state}"
            await asyncio.sleep(0.5)
        assert state == (0, tokens, True)
        deadline = time.monotonic() + 30
        while True:
            data = json.loads((await tokentrack("cron", "status", "--database-url", app)).out)
            if any(r["status"] == "succeeded" for r in data["runs"]):
                break
            assert time.monotonic() < deadline, data
            await asyncio.sleep(0.2)
        assert data["job"]["username"] == owner

        removed = await tokentrack("cron", "remove", "--database-url", app)
        assert removed.out == f"cron: removed job {job['jobid']} (tokentrack-expiry-sweep)\n"
        assert [r for r in await _cron_rows(home) if r["database"] == database] == []

        # In pg_cron's own database, USAGE on schema cron is all a non-superuser needs.
        await migrate.install(home)
        await _admin(
            home,
            f"CREATE ROLE {member} LOGIN NOSUPERUSER",
            f"GRANT tokentrack_service TO {member}",
            f"GRANT USAGE ON SCHEMA cron TO {member}",
        )
        local = _as(home, member)
        here = await tokentrack("cron", "install", "--job-name", member, "--database-url", local)
        assert here.code == 0, here
        assert f"in database postgres as {member} (pg_cron " in here.out
        gone = await tokentrack("cron", "remove", "--job-name", member, "--database-url", local)
        assert gone.out.startswith("cron: removed job "), gone
    finally:
        await _admin(
            home,
            f"DELETE FROM cron.job WHERE username IN ('{owner}', '{member}')",
            f"DROP DATABASE IF EXISTS {database} WITH (FORCE)",
            f"DROP OWNED BY {owner}",
            f"DROP ROLE {owner}",
            f"DO $$ BEGIN IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{member}') THEN"
            f" DROP OWNED BY {member}; DROP ROLE {member}; END IF; END $$",
        )
