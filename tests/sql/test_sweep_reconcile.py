"""Contract: the expiry sweep (function and batched procedure), reconcile, increment_usage."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from sqlkit import (
    Connect,
    assert_reconciled,
    call,
    counts,
    expire,
    new_account,
    period,
    race_a_short_batch,
    reserve,
    step,
)


async def test_sweep_bills_expired_reservations_and_marks_them_expired(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    expired, _ = await reserve(conn, account)
    live, _ = await reserve(conn, account)
    await step(conn, expired, account, "AN0", 30, 12)
    await step(conn, live, account, "AN0", 1, 1)
    await expire(conn, expired)
    answer = await call(conn, "cleanup_expired_reservations")
    assert (answer["success"], answer["expired"], answer["billed_tokens"]) == (True, 1, 42)
    rows = dict(
        await conn.fetch(
            "SELECT report_id, status FROM tokentrack.report_reservations WHERE account_id = $1",
            account,
        )
    )
    assert rows == {expired: "expired", live: "active"}
    billed = await conn.fetchval(
        "SELECT billed_tokens FROM tokentrack.report_reservations WHERE report_id = $1", expired
    )
    assert billed == 42
    assert (await period(conn, account))["tokens_used"] == 42
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM tokentrack.report_reservations"
            " WHERE status = 'active' AND expires_at <= now()"
        )
        == 0
    )
    await assert_reconciled(conn)


async def test_sweep_with_nothing_due_changes_nothing(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    await reserve(conn, account)
    before = await counts(conn)
    answer = await call(conn, "cleanup_expired_reservations")
    assert (answer["expired"], answer["billed_tokens"]) == (0, 0)
    assert await counts(conn) == before


async def test_finalize_after_the_sweep_answers_already_finalized(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    report, _ = await reserve(conn, account)
    await step(conn, report, account, "AN0", 5, 5)
    await expire(conn, report)
    await call(conn, "cleanup_expired_reservations")
    answer = await call(conn, "finalize_report_usage", report, account)
    assert (answer["already_finalized"], answer["billed_tokens"]) == (True, 10)
    assert (await period(conn, account))["tokens_used"] == 10


async def test_sweeps_racing_each_other_and_finalize_bill_once(connect: Connect) -> None:
    setup = await connect()
    account = await new_account(setup, 10**9)
    reports = []
    for i in range(30):
        report, _ = await reserve(setup, account)
        await step(setup, report, account, "AN0", i, 1)
        await expire(setup, report)
        reports.append(report)
    sweepers = [await connect() for _ in range(3)]
    finalizers = [await connect() for _ in range(3)]

    async def finalize_all(c: asyncpg.Connection, offset: int) -> None:
        for report in reports[offset::3]:
            await call(c, "finalize_report_usage", report, account)

    results = await asyncio.gather(
        *(call(c, "cleanup_expired_reservations") for c in sweepers),
        *(finalize_all(c, i) for i, c in enumerate(finalizers)),
    )
    expected = sum(i + 1 for i in range(30))
    assert (await period(setup, account))["tokens_used"] == expected
    swept = sum(r["billed_tokens"] for r in results[:3])
    finalized = await setup.fetchval(
        "SELECT coalesce(sum(billed_tokens), 0) FROM tokentrack.report_reservations"
        " WHERE account_id = $1 AND status = 'completed'",
        account,
    )
    assert swept + finalized == expected
    await assert_reconciled(setup)


async def test_batched_sweep_commits_per_batch_and_expires_everything(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn)
    for _ in range(5):
        report, _ = await reserve(conn, account)
        await step(conn, report, account, "AN0", 2, 2)
        await expire(conn, report)
    notices: list[str] = []
    sweeper = await asyncpg.connect(db_dsn)
    try:
        sweeper.add_log_listener(lambda _c, msg: notices.append(msg.message))
        await sweeper.execute("CALL tokentrack.sweep_expired_reservations(2)")
    finally:
        await sweeper.close()
    # 2, 2, 1, then a batch that finds nothing due ends it.
    assert notices == ["tokentrack sweep: 5 reservations expired, 20 tokens billed, 4 batches"]
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM tokentrack.report_reservations WHERE status = 'expired'"
        )
        == 5
    )
    await assert_reconciled(conn)


async def test_batched_sweep_goes_on_after_a_batch_shortened_by_a_concurrent_finalize(
    db_dsn: str,
) -> None:
    """Point 9 of issue #11: the procedure stopped after a batch that expired fewer than its
    size, leaving a due reservation active."""
    notices: list[str] = []
    sweeper = await asyncpg.connect(db_dsn)
    try:
        sweeper.add_log_listener(lambda _c, msg: notices.append(msg.message))
        await race_a_short_batch(
            db_dsn, lambda: sweeper.execute("CALL tokentrack.sweep_expired_reservations(2)")
        )
    finally:
        await sweeper.close()
    assert notices == ["tokentrack sweep: 2 reservations expired, 6 tokens billed, 3 batches"]


async def test_batched_sweep_refuses_to_run_inside_a_transaction(conn: asyncpg.Connection) -> None:
    with_error = None
    try:
        async with conn.transaction():
            await conn.execute("CALL tokentrack.sweep_expired_reservations(2)")
    except asyncpg.PostgresError as exc:
        with_error = exc
    assert with_error is not None
    assert with_error.sqlstate == "2D000"  # invalid transaction termination


async def test_reconcile_is_ok_on_a_healthy_database(conn: asyncpg.Connection) -> None:
    a = await new_account(conn)
    b = await new_account(conn)
    for account in (a, b):
        report, _ = await reserve(conn, account)
        await step(conn, report, account, "AN0", 10, 5)
        await call(conn, "finish_report", report, account, "complete", None)
        await step(conn, report, account, "AN1", 1, 1)
        await call(conn, "increment_usage", account, 77, True, False)
    before = await counts(conn)
    answer = await call(conn, "reconcile", None)
    assert answer == {
        "success": True,
        "ok": True,
        "periods_checked": 2,
        "costs_checked": 0,  # no step has a cost: no price is set
        "budget_windows_checked": 0,  # no budget is set
        "budgets_checked": 0,
        "corrections_checked": 0,  # no grant, adjustment or refund
        "discrepancies": [],
    }
    one = await call(conn, "reconcile", a)
    assert (one["ok"], one["periods_checked"]) == (True, 1)
    assert await counts(conn) == before


async def test_reconcile_finds_a_raw_update_of_tokens_used(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    healthy = await new_account(conn)
    await call(conn, "increment_usage", account, 100, False, False)
    await conn.execute(
        "UPDATE tokentrack.usage_periods SET tokens_used = tokens_used + 5 WHERE account_id = $1",
        account,
    )
    answer = await call(conn, "reconcile", None)
    assert answer["ok"] is False
    [found] = answer["discrepancies"]
    assert found["check"] == "tokens_used"
    assert (found["expected"], found["actual"], found["account_id"]) == (100, 105, str(account))
    assert (await call(conn, "reconcile", healthy))["ok"] is True


async def test_reconcile_finds_a_raw_update_of_reports_count(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    await conn.execute(
        "UPDATE tokentrack.usage_periods SET reports_count = 3 WHERE account_id = $1", account
    )
    [found] = (await call(conn, "reconcile", account))["discrepancies"]
    assert (found["check"], found["expected"], found["actual"]) == ("reports_count", 0, 3)


async def test_reconcile_finds_a_billed_step_changed_behind_its_ledger_row(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    report, _ = await reserve(conn, account)
    await step(conn, report, account, "AN0", 10, 10)
    await call(conn, "finalize_report_usage", report, account)
    # Behind the guard on billed steps (version 20261202000000), as only the owner can.
    guard = "TRIGGER report_step_usage_billed_immutable"
    await conn.execute(f"ALTER TABLE tokentrack.report_step_usage DISABLE {guard}")
    await conn.execute(
        "UPDATE tokentrack.report_step_usage SET total_tokens = 99 WHERE report_id = $1", report
    )
    await conn.execute(f"ALTER TABLE tokentrack.report_step_usage ENABLE {guard}")
    [found] = (await call(conn, "reconcile", account))["discrepancies"]
    assert (found["check"], found["expected"], found["actual"]) == ("ledger_entry", 20, 99)


async def test_reconcile_finds_a_step_marked_billed_without_a_ledger_row(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    report, _ = await reserve(conn, account)
    await step(conn, report, account, "AN0", 10, 10)
    entry = await conn.fetchval(
        "INSERT INTO tokentrack.usage_ledger (account_id, period_id, kind, tokens)"
        " SELECT account_id, id, 'adjustment', 0 FROM tokentrack.usage_periods"
        " WHERE account_id = $1 RETURNING id",
        account,
    )
    await conn.execute(
        "UPDATE tokentrack.report_step_usage SET billed_at = now(), billing_entry_id = $2,"
        " billed_period_id = (SELECT id FROM tokentrack.usage_periods WHERE account_id = $1)",
        account,
        entry,
    )
    checks = {d["check"] for d in (await call(conn, "reconcile", account))["discrepancies"]}
    assert "billed_steps" in checks


async def test_reconcile_unknown_account_is_refused(conn: asyncpg.Connection) -> None:
    answer = await call(conn, "reconcile", uuid.uuid4())
    assert (answer["success"], answer["error"]) == (False, "account_not_found")


async def test_ledger_is_append_only(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    await call(conn, "increment_usage", account, 1, False, False)
    for statement in (
        "UPDATE tokentrack.usage_ledger SET tokens = 2",
        "DELETE FROM tokentrack.usage_ledger",
        "TRUNCATE tokentrack.usage_ledger CASCADE",
    ):
        with pytest.raises(asyncpg.PostgresError, match="append-only") as caught:
            await conn.execute(statement)
        assert caught.value.sqlstate == "55000"
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.usage_ledger") == 1


async def test_increment_usage_adds_tokens_and_reports(conn: asyncpg.Connection) -> None:
    account = await new_account(conn, 1_000)
    first = await call(conn, "increment_usage", account, 300, True, False)
    assert (first["tokens_used"], first["tokens_limit"], first["reports_count"]) == (300, 1_000, 1)
    chat = await call(conn, "increment_usage", account, 50, False, True)
    assert (chat["tokens_used"], chat["reports_count"]) == (350, 1)
    over = await call(conn, "increment_usage", account, 5_000, False, False)
    assert over["tokens_used"] == 5_350  # actual usage is never dropped
    kinds = await conn.fetch(
        "SELECT kind, tokens, reports, is_chat FROM tokentrack.usage_ledger"
        " WHERE account_id = $1 ORDER BY id",
        account,
    )
    assert [tuple(r) for r in kinds] == [
        ("increment", 300, 1, False),
        ("increment", 50, 0, True),
        ("increment", 5_000, 0, False),
    ]
    await assert_reconciled(conn)


async def test_increment_usage_refusals(conn: asyncpg.Connection) -> None:
    no_period = uuid.uuid4()
    await conn.execute("INSERT INTO tokentrack.accounts (id) VALUES ($1)", no_period)
    before = await counts(conn)
    missing = await call(conn, "increment_usage", uuid.uuid4(), 1, False, False)
    idle = await call(conn, "increment_usage", no_period, 1, False, False)
    assert (missing["success"], missing["error"]) == (False, "account_not_found")
    assert (idle["success"], idle["error"]) == (False, "no_active_period")
    assert await counts(conn) == before


async def test_concurrent_increments_lose_nothing(connect: Connect) -> None:
    setup = await connect()
    account = await new_account(setup)
    conns = [await connect() for _ in range(5)]

    async def add(c: asyncpg.Connection) -> None:
        for _ in range(20):
            await call(c, "increment_usage", account, 3, True, False)

    await asyncio.gather(*(add(c) for c in conns))
    p = await period(setup, account)
    assert (p["tokens_used"], p["reports_count"]) == (300, 100)


async def test_open_usage_period_closes_the_active_one(conn: asyncpg.Connection) -> None:
    account = await new_account(conn, 10)
    old = (await period(conn, account))["id"]
    answer = await call(conn, "open_usage_period", account, 20, None)
    assert answer["previous_period_id"] == str(old)
    statuses = dict(
        await conn.fetch(
            "SELECT id, status FROM tokentrack.usage_periods WHERE account_id = $1", account
        )
    )
    assert statuses == {old: "completed", uuid.UUID(answer["period_id"]): "active"}


async def test_reservations_wait_for_a_period_switch_and_use_the_new_period(
    connect: Connect,
) -> None:
    switcher = await connect()
    reserver = await connect()
    account = await new_account(switcher, 10)
    tx = switcher.transaction()
    await tx.start()
    new = await call(switcher, "open_usage_period", account, 1_000, None)
    pending = asyncio.create_task(call(reserver, "try_reserve_tokens", account, uuid.uuid4(), 500))
    await asyncio.sleep(0.2)
    assert not pending.done()  # blocked on the period lock
    await tx.commit()
    answer = await pending
    assert answer["success"] is True
    assert answer["period_id"] == new["period_id"]
