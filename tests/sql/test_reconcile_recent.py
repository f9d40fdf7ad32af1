"""The incremental reconcile: reconcile_recent() and advance_reconcile_point().

What changed since the verified point is checked as reconcile() checks it (a discrepancy is
reported in the same shape), the point moves only over ledger rows that have settled (every
transaction that could still commit a lower id has ended) and only when the check is ok, and
the rows read do not depend on the rows before the point (buffers, not time).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg

from sqlkit import Connect, call, new_account, period, reserve, step


async def _report(conn: asyncpg.Connection, account: uuid.UUID, tokens: int = 100) -> uuid.UUID:
    report, answer = await reserve(conn, account, 1_000)
    assert answer["success"] is True
    assert (await step(conn, report, account, "AN0", tokens - 10, 10))["success"] is True
    finished = await call(conn, "finish_report", report, account, "complete", None)
    assert finished["success"] is True
    return report


async def _settle(conn: asyncpg.Connection) -> dict[str, Any]:
    """Run advance_reconcile_point() until the point is the last ledger row: a run records the
    pending point, the next folds through it (nothing else is running, so that run's snapshot
    xmin has passed the first one's xmax). At most two runs."""
    last = await _last_entry(conn)
    answer: dict[str, Any] = {}
    for _ in range(2):
        answer = await call(conn, "advance_reconcile_point")
        assert answer["ok"] is True, answer
        if answer["through_entry"] == last:
            break
    assert (answer["advanced"], answer["through_entry"], answer["pending_entry"]) == (
        True,
        last,
        None,
    )
    return answer


async def _last_entry(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT max(id) FROM tokentrack.usage_ledger"))


async def test_a_healthy_database_is_ok_before_and_after_the_point(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    for _ in range(3):
        await _report(conn, account)
    before = await call(conn, "reconcile_recent")
    assert before["ok"] is True
    assert before["through_entry"] == 0
    assert before["advanced_at"] is None
    assert before["entries_checked"] == 3  # one billing entry per report
    assert before["periods_checked"] == 1
    settled = await _settle(conn)
    assert settled["through_entry"] == await _last_entry(conn)
    after = await call(conn, "reconcile_recent")
    assert (after["ok"], after["entries_checked"], after["periods_checked"]) == (True, 0, 1)
    assert after["advanced_at"] is not None
    # The point's sums are the ledger's.
    sums = await conn.fetchrow(
        "SELECT tokens, reports FROM tokentrack.reconcile_periods WHERE account_id = $1", account
    )
    assert sums is not None
    assert (sums["tokens"], sums["reports"]) == (300, 3)
    assert (await period(conn, account))["tokens_used"] == 300
    await _report(conn, account)
    later = await call(conn, "reconcile_recent", account)
    assert (later["ok"], later["entries_checked"]) == (True, 1)
    assert (await call(conn, "reconcile", account))["ok"] is True


async def test_an_unknown_account_is_refused(conn: asyncpg.Connection) -> None:
    answer = await call(conn, "reconcile_recent", uuid.uuid4())
    assert (answer["success"], answer["error"]) == (False, "account_not_found")


async def test_a_discrepancy_after_the_point_is_caught_as_reconcile_reports_it(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    await _report(conn, account)
    await _settle(conn)
    # A hand edit of the active period's tokens_used, after the point.
    await conn.execute(
        "UPDATE tokentrack.usage_periods SET tokens_used = tokens_used + 7"
        " WHERE account_id = $1 AND status = 'active'",
        account,
    )
    recent = await call(conn, "reconcile_recent")
    full = await call(conn, "reconcile")
    assert recent["ok"] is False
    assert recent["discrepancies"] == full["discrepancies"]
    assert [d["check"] for d in recent["discrepancies"]] == ["tokens_used"]
    assert (recent["discrepancies"][0]["expected"], recent["discrepancies"][0]["actual"]) == (
        100,
        107,
    )
    # The point does not move over a discrepancy.
    await _report(conn, account)
    through = (await call(conn, "reconcile_recent"))["through_entry"]
    for _ in range(2):
        refused = await call(conn, "advance_reconcile_point")
        assert (refused["ok"], refused["advanced"], refused["through_entry"]) == (
            False,
            False,
            through,
        )
    # An adjustment is checked with the period (and moves tokens_used with it: it does not
    # explain a hand edit); undoing the edit makes the period ok again, and the point moves.
    adjusted = await call(conn, "adjust_usage", account, None, 7, "recon-test-1", "a correction")
    assert adjusted["success"] is True
    still = await call(conn, "reconcile_recent")
    assert (still["ok"], still["corrections_checked"]) == (False, 1)
    await conn.execute(
        "UPDATE tokentrack.usage_periods SET tokens_used = tokens_used - 7"
        " WHERE account_id = $1 AND status = 'active'",
        account,
    )
    assert (await call(conn, "reconcile_recent"))["ok"] is True
    assert (await _settle(conn))["through_entry"] == await _last_entry(conn)


async def test_a_new_billing_entry_that_disagrees_with_its_steps_is_caught(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    await _report(conn, account)
    await _settle(conn)
    report = await _report(conn, account, tokens=50)
    # A billing entry written outside the functions: the ledger says 60, the steps say 50
    # (and the period was moved with it, so tokens_used agrees with the ledger).
    async with conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        pid = (await period(conn, account))["id"]
        await conn.execute(
            "INSERT INTO tokentrack.usage_ledger (account_id, period_id, kind, tokens, report_id)"
            " VALUES ($1, $2, 'late_step', 10, $3)",
            account,
            pid,
            report,
        )
        await conn.execute(
            "UPDATE tokentrack.usage_periods SET tokens_used = tokens_used + 10 WHERE id = $1", pid
        )
    recent = await call(conn, "reconcile_recent", account)
    full = await call(conn, "reconcile", account)
    assert [d["check"] for d in recent["discrepancies"]] == ["ledger_entry"]
    assert recent["discrepancies"] == full["discrepancies"]


async def test_a_budget_window_edited_after_the_point_is_caught(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    budget = await call(conn, "set_budget", account, None, "tokens", "month", 1_000_000, "{}")
    assert budget["success"] is True
    await _report(conn, account)
    await _settle(conn)
    assert (await call(conn, "reconcile_recent"))["budget_windows_checked"] == 0
    await _report(conn, account)
    healthy = await call(conn, "reconcile_recent")
    assert (healthy["ok"], healthy["budget_windows_checked"], healthy["budgets_checked"]) == (
        True,
        1,
        1,
    )
    await conn.execute(
        "UPDATE tokentrack.budget_windows SET used = used - 1 WHERE account_id = $1", account
    )
    recent = await call(conn, "reconcile_recent")
    full = await call(conn, "reconcile")
    assert [d["check"] for d in recent["discrepancies"]] == ["budget_used"]
    assert recent["discrepancies"] == full["discrepancies"]
    # The window's sum through the point is kept: after a settle it is still explained.
    await conn.execute(
        "UPDATE tokentrack.budget_windows SET used = used + 1 WHERE account_id = $1", account
    )
    await _settle(conn)
    await _report(conn, account)
    assert (await call(conn, "reconcile_recent"))["ok"] is True
    assert (await call(conn, "reconcile"))["ok"] is True


async def test_the_point_waits_for_a_lower_ledger_id_that_commits_later(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    account = await new_account(conn)
    other = await new_account(conn)
    slow = await connect()
    try:
        # A transaction takes a ledger id and stays open; a later one commits a higher id.
        transaction = slow.transaction()
        await transaction.start()
        await call(slow, "increment_usage", account, 5, False, False)
        await call(conn, "increment_usage", other, 3, False, False)
        first = await call(conn, "advance_reconcile_point")
        assert first["pending_entry"] == await _last_entry(conn)
        second = await call(conn, "advance_reconcile_point")
        assert second["advanced"] is False  # the open transaction may still commit below it
        await transaction.commit()
    finally:
        await slow.close()
    third = await call(conn, "advance_reconcile_point")
    assert third["advanced"] is True
    assert third["through_entry"] == first["pending_entry"]
    sums = dict(await conn.fetch("SELECT account_id, tokens FROM tokentrack.reconcile_periods"))
    assert sums == {account: 5, other: 3}
    assert (await call(conn, "reconcile_recent"))["ok"] is True


async def _buffers(conn: asyncpg.Connection, sql: str, *args: Any) -> int:
    """Shared buffers (hit + read) of one call, the function's own statements included."""
    raw = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", *args)
    plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]
    return int(plan["Plan"]["Shared Hit Blocks"]) + int(plan["Plan"]["Shared Read Blocks"])


HISTORY_SQL = """
WITH seed AS (
    SELECT gen_random_uuid() AS report_id, p.account_id, p.id AS period_id
    FROM generate_series(1, $2) AS g
    INNER JOIN tokentrack.usage_periods AS p ON p.account_id = $1 AND p.status = 'active'
), reports AS (
    INSERT INTO tokentrack.reports (id, account_id, status, token_usage)
    SELECT report_id, account_id, 'complete', '{"totalTokens": 100}' FROM seed
), reservations AS (
    INSERT INTO tokentrack.report_reservations (
        report_id, account_id, period_id, status, reserved_tokens, billed_tokens, finalized_at
    )
    SELECT report_id, account_id, period_id, 'completed', 1000, 100, now() FROM seed
), entries AS (
    INSERT INTO tokentrack.usage_ledger (account_id, period_id, kind, tokens, reports, report_id)
    SELECT account_id, period_id, 'report_billed', 100, 1, report_id FROM seed
    RETURNING id, report_id, period_id, account_id
), steps AS (
    INSERT INTO tokentrack.report_step_usage (
        report_id, account_id, step_name, input_tokens, output_tokens, total_tokens,
        billed_at, billed_period_id, billing_entry_id
    )
    SELECT report_id, account_id, 'AN0', 90, 10, 100, now(), period_id, id FROM entries
)
UPDATE tokentrack.usage_periods AS p
SET tokens_used = p.tokens_used + 100 * $2, reports_count = p.reports_count + $2
WHERE p.account_id = $1 AND p.status = 'active'
"""


async def test_rows_read_do_not_depend_on_the_rows_before_the_point(
    conn: asyncpg.Connection,
) -> None:
    """One new report after the point costs the same buffers over 200 and over 20,000
    history reports, where reconcile() of the account reads many times more."""
    account = await new_account(conn, limit=10**12)
    measured: dict[int, tuple[int, int]] = {}
    for size, more in ((200, 200), (20_000, 19_800)):
        async with conn.transaction():
            # A bulk load consistent by construction: no per-row foreign-key checks.
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(HISTORY_SQL, account, more)
        await conn.execute("ANALYZE")
        await _settle(conn)
        await _report(conn, account)
        assert (await call(conn, "reconcile_recent", account))["ok"] is True
        assert (await call(conn, "reconcile", account))["ok"] is True
        for sql in ("SELECT tokentrack.reconcile_recent($1)", "SELECT tokentrack.reconcile($1)"):
            await _buffers(conn, sql, account)  # warm the plan cache of this session
        measured[size] = (
            await _buffers(conn, "SELECT tokentrack.reconcile_recent($1)", account),
            await _buffers(conn, "SELECT tokentrack.reconcile($1)", account),
        )
    (small_recent, small_full), (large_recent, large_full) = measured[200], measured[20_000]
    # The full audit grows with the history (the check discriminates) ...
    assert large_full > 10 * small_full, measured
    # ... the incremental check does not: at most a deeper index level or two.
    assert large_recent <= small_recent * 1.2 + 8, measured


async def test_reconcile_answers_the_same_without_the_step_billing_indexes(
    conn: asyncpg.Connection,
) -> None:
    """reconcile() (the full audit) reaches steps through the ledger's report_id and the
    account's steps: without report_step_usage_billing_entry_idx and
    report_step_usage_billed_period_idx (which version 20261214000000's write path dropped)
    its answers, discrepancies included, are those it gives with them."""
    account = await new_account(conn)
    other = await new_account(conn)
    for _ in range(2):
        await _report(conn, account)
    stray = await _report(conn, other, tokens=40)
    # A billed step moved behind its ledger row's back (triggers off): its entry no longer
    # explains it, and it is billed into a period its entry is not of.
    async with conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(
            "UPDATE tokentrack.report_step_usage SET total_tokens = total_tokens + 2,"
            " billed_period_id = (SELECT id FROM tokentrack.usage_periods WHERE account_id = $2)"
            " WHERE report_id = $1",
            stray,
            account,
        )
    # With the two indexes back, as version 20261213000000 had them (in a transaction rolled
    # back), and then without them, as this version has it.
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute(
            "CREATE INDEX report_step_usage_billing_entry_idx"
            " ON tokentrack.report_step_usage (billing_entry_id)"
            " WHERE billing_entry_id IS NOT NULL;"
            " CREATE INDEX report_step_usage_billed_period_idx"
            " ON tokentrack.report_step_usage (billed_period_id)"
            " WHERE billed_period_id IS NOT NULL"
        )
        before = {a: await call(conn, "reconcile", a) for a in (account, other)}
        before_all = await call(conn, "reconcile")
    finally:
        await transaction.rollback()
    assert {d["check"] for d in before_all["discrepancies"]} == {"ledger_entry", "billed_steps"}
    # One account's billed steps are its own steps: the other account's step billed into this
    # account's period shows in reconcile() of everything and of its own account (docs/API.md).
    assert before[account]["ok"] is True
    assert before[other]["ok"] is False
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = 'tokentrack'"
            " AND indexname IN ('report_step_usage_billing_entry_idx',"
            " 'report_step_usage_billed_period_idx')"
        )
        == 0
    )
    assert await call(conn, "reconcile") == before_all
    for a in (account, other):
        assert await call(conn, "reconcile", a) == before[a]
