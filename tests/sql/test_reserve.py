"""Contract: tokentrack.try_reserve_tokens."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import asyncpg

from sqlkit import Connect, call, counts, expire, new_account, period, reserve, step


async def test_grant_answers_with_reservation_and_what_is_left(conn: asyncpg.Connection) -> None:
    account = await new_account(conn, 10_000)
    report, answer = await reserve(conn, account, 4_000)
    assert answer["success"] is True
    assert answer["reserved_tokens"] == 4_000
    assert answer["available_tokens"] == 6_000
    row = await conn.fetchrow(
        "SELECT * FROM tokentrack.report_reservations WHERE report_id = $1", report
    )
    assert row is not None
    assert str(row["id"]) == answer["reservation_id"]
    assert row["status"] == "active"
    assert row["period_id"] == (await period(conn, account))["id"]
    assert row["expires_at"] - row["created_at"] == dt.timedelta(hours=2)
    assert dt.datetime.fromisoformat(answer["expires_at"]) == row["expires_at"]


async def test_available_subtracts_used_and_other_active_reservations(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn, 10_000)
    await call(conn, "increment_usage", account, 1_500, False, False)
    await reserve(conn, account, 2_000)
    _, answer = await reserve(conn, account, 3_000)
    assert answer["available_tokens"] == 10_000 - 1_500 - 2_000 - 3_000


async def test_report_row_is_created_processing(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    report, _ = await reserve(conn, account)
    row = await conn.fetchrow("SELECT * FROM tokentrack.reports WHERE id = $1", report)
    assert row is not None
    assert (row["account_id"], row["status"]) == (account, "processing")


async def test_pending_report_becomes_processing_and_keeps_its_mode(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    report = uuid.uuid4()
    await conn.execute(
        "INSERT INTO tokentrack.reports (id, account_id, mode) VALUES ($1, $2, 'dd')",
        report,
        account,
    )
    answer = await call(conn, "try_reserve_tokens", account, report, 100)
    assert answer["success"] is True
    row = await conn.fetchrow("SELECT status, mode FROM tokentrack.reports WHERE id = $1", report)
    assert row is not None
    assert (row["status"], row["mode"]) == ("processing", "dd")


async def test_reserving_again_returns_the_same_reservation(conn: asyncpg.Connection) -> None:
    account = await new_account(conn, 10_000)
    report, first = await reserve(conn, account, 4_000)
    before = await counts(conn)
    again = await call(conn, "try_reserve_tokens", account, report, 9_000)
    assert again["success"] is True
    assert again["reservation_id"] == first["reservation_id"]
    assert again["reserved_tokens"] == 4_000
    assert again["available_tokens"] == 6_000
    assert await counts(conn) == before


async def test_refused_insufficient_tokens_writes_nothing(conn: asyncpg.Connection) -> None:
    account = await new_account(conn, 1_000)
    await reserve(conn, account, 700)
    before = await counts(conn)
    report, answer = await reserve(conn, account, 301)
    assert answer["success"] is False
    assert answer["error"] == "insufficient_tokens"
    assert answer["available_tokens"] == 300
    assert answer["requested_tokens"] == 301
    assert answer["message"]
    assert await counts(conn) == before
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.reports WHERE id = $1", report) == 0


async def test_refused_account_not_found(conn: asyncpg.Connection) -> None:
    before = await counts(conn)
    _, answer = await reserve(conn, uuid.uuid4(), 10)
    assert (answer["success"], answer["error"]) == (False, "account_not_found")
    assert await counts(conn) == before


async def test_refused_no_active_period(conn: asyncpg.Connection) -> None:
    account = uuid.uuid4()
    await conn.execute("INSERT INTO tokentrack.accounts (id) VALUES ($1)", account)
    before = await counts(conn)
    _, answer = await reserve(conn, account, 10)
    assert (answer["success"], answer["error"]) == (False, "no_active_period")
    assert await counts(conn) == before


async def test_refused_report_of_another_account(conn: asyncpg.Connection) -> None:
    owner = await new_account(conn)
    other = await new_account(conn)
    report, _ = await reserve(conn, owner, 10)
    before = await counts(conn)
    answer = await call(conn, "try_reserve_tokens", other, report, 10)
    assert (answer["success"], answer["error"]) == (False, "report_account_mismatch")
    assert await counts(conn) == before


async def test_refused_report_finalized_after_billing(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    report, _ = await reserve(conn, account, 10)
    await call(conn, "finalize_report_usage", report, account)
    before = await counts(conn)
    answer = await call(conn, "try_reserve_tokens", account, report, 10)
    assert (answer["success"], answer["error"]) == (False, "report_finalized")
    assert await counts(conn) == before


async def test_refused_report_finalized_when_report_has_an_outcome(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    report = uuid.uuid4()
    await conn.execute(
        "INSERT INTO tokentrack.reports (id, account_id, status) VALUES ($1, $2, 'failed')",
        report,
        account,
    )
    before = await counts(conn)
    answer = await call(conn, "try_reserve_tokens", account, report, 10)
    assert (answer["success"], answer["error"]) == (False, "report_finalized")
    assert await counts(conn) == before


async def test_refused_report_finalized_when_its_reservation_expired(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    report, _ = await reserve(conn, account, 10)
    await expire(conn, report)
    answer = await call(conn, "try_reserve_tokens", account, report, 10)
    assert (answer["success"], answer["error"]) == (False, "report_finalized")


async def test_report_finalized_says_whether_the_sweep_billed_the_reservation(
    conn: asyncpg.Connection,
) -> None:
    """Point 10 of issue #11: a reservation past expiry that the sweep has not billed yet was
    called "already billed". Same code in every case; the message says which case it is."""
    account = await new_account(conn)
    report, _ = await reserve(conn, account, 10)
    await step(conn, report, account, "AN0", 2, 2)
    await expire(conn, report)
    before = await counts(conn)
    pending = await call(conn, "try_reserve_tokens", account, report, 10)
    assert (pending["success"], pending["error"]) == (False, "report_finalized")
    assert "already billed" not in pending["message"]
    assert "the expiry sweep has not billed it yet" in pending["message"]
    assert "holds nothing" in pending["message"]
    assert await counts(conn) == before

    assert (await call(conn, "cleanup_expired_reservations"))["expired"] == 1
    swept = await call(conn, "try_reserve_tokens", account, report, 10)
    assert (swept["success"], swept["error"]) == (False, "report_finalized")
    assert swept["message"].startswith(f"report {report} was already billed by the expiry sweep")

    done, _ = await reserve(conn, account, 10)
    await call(conn, "finalize_report_usage", done, account)
    finalized = await call(conn, "try_reserve_tokens", account, done, 10)
    assert finalized["message"] == (
        f"report {done} was already billed (its reservation is completed)"
    )


async def test_expired_reservations_hold_nothing_before_the_sweep(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn, 1_000)
    old, _ = await reserve(conn, account, 900)
    _, refused = await reserve(conn, account, 900)
    assert refused["error"] == "insufficient_tokens"
    await expire(conn, old)
    _, granted = await reserve(conn, account, 900)
    assert granted["success"] is True
    assert granted["available_tokens"] == 100
    status = await conn.fetchval(
        "SELECT status FROM tokentrack.report_reservations WHERE report_id = $1", old
    )
    assert status == "active"  # not swept yet, yet it holds nothing


async def test_billing_frees_the_estimate_and_charges_usage(conn: asyncpg.Connection) -> None:
    account = await new_account(conn, 1_000)
    report, _ = await reserve(conn, account, 900)
    await step(conn, report, account, "AN0", 100, 50)
    await call(conn, "finalize_report_usage", report, account)
    _, answer = await reserve(conn, account, 850)
    assert answer["success"] is True
    assert answer["available_tokens"] == 0


async def test_racing_reservations_grant_exactly_as_many_as_fit(connect: Connect) -> None:
    setup = await connect()
    for limit, estimate, racers in ((1_000, 300, 8), (1_000, 1_000, 6), (999, 100, 12)):
        account = await new_account(setup, limit)
        conns = [await connect() for _ in range(racers)]
        start = asyncio.Event()

        async def racer(
            c: asyncpg.Connection,
            account: uuid.UUID = account,
            start: asyncio.Event = start,
            estimate: int = estimate,
        ) -> bool:
            await start.wait()
            answer = await call(c, "try_reserve_tokens", account, uuid.uuid4(), estimate)
            return bool(answer["success"])

        tasks = [asyncio.create_task(racer(c)) for c in conns]
        start.set()
        granted = sum(await asyncio.gather(*tasks))
        assert granted == min(racers, limit // estimate)
        held = await setup.fetchval(
            "SELECT sum(reserved_tokens) FROM tokentrack.report_reservations"
            " WHERE account_id = $1 AND status = 'active'",
            account,
        )
        assert held <= limit
        for c in conns:
            await c.close()


async def test_racing_reserves_for_one_report_make_one_reservation(connect: Connect) -> None:
    setup = await connect()
    account = await new_account(setup, 10_000)
    report = uuid.uuid4()
    conns = [await connect() for _ in range(6)]
    answers = await asyncio.gather(
        *(call(c, "try_reserve_tokens", account, report, 1_000) for c in conns)
    )
    assert all(a["success"] for a in answers)
    assert len({a["reservation_id"] for a in answers}) == 1
    assert (
        await setup.fetchval(
            "SELECT count(*) FROM tokentrack.report_reservations WHERE report_id = $1", report
        )
        == 1
    )


async def test_racing_accounts_for_one_new_report_only_one_gets_it(connect: Connect) -> None:
    setup = await connect()
    accounts = [await new_account(setup) for _ in range(4)]
    report = uuid.uuid4()
    conns = [await connect() for _ in accounts]
    answers = await asyncio.gather(
        *(
            call(c, "try_reserve_tokens", a, report, 10)
            for c, a in zip(conns, accounts, strict=True)
        )
    )
    assert sum(a["success"] for a in answers) == 1
    assert {a.get("error") for a in answers if not a["success"]} == {"report_account_mismatch"}
