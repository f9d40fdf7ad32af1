"""Version 20261214000000's reserve path (issue #16): fewer statements, the same answers.

reserve_usage reads the account and the report in one statement, finds and locks the budgets
in one, and computes every budget's window, effective limit (grants included, as budget_limit
computes it), use, holds and threshold crossings in one more; note_crossings runs only for a
window the hold takes across a bound. reserve and try_reserve_tokens call count_refusal only
for refusals; lock_reservation_budgets runs lock_budgets' statement itself and none for a
reservation without budgets. Each clause is pinned here; the answers and the notifications
are those of the version before (tests/sql/test_budgets.py, test_notifications.py,
test_credits.py and tests/invariants are unchanged).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from sqlkit import Connect, call, new_account

MONTH_LIMIT = 1_000_000


async def budget(
    conn: asyncpg.Connection,
    account: uuid.UUID,
    subject: str | None,
    unit: str,
    window: str,
    limit: int,
    **options: Any,
) -> uuid.UUID:
    answer = await call(
        conn, "set_budget", account, subject, unit, window, limit, json.dumps(options)
    )
    assert answer["success"] is True, answer
    return uuid.UUID(answer["budget_id"])


async def grant(
    conn: asyncpg.Connection,
    account: uuid.UUID,
    budget_id: uuid.UUID,
    amount: int,
    expires_at: datetime | None = None,
) -> None:
    answer = await call(
        conn, "grant_credits", account, budget_id, amount, expires_at, str(uuid.uuid4()), "test"
    )
    assert answer["success"] is True, answer


async def reserve(
    conn: asyncpg.Connection,
    account: uuid.UUID,
    estimate: dict[str, Any],
    subjects: list[str],
    report: uuid.UUID | None = None,
) -> dict[str, Any]:
    raw = await conn.fetchval(
        "SELECT tokentrack.reserve($1, $2, $3::jsonb, $4::text[])::text",
        account,
        report or uuid.uuid4(),
        json.dumps(estimate),
        subjects,
    )
    answer = json.loads(raw)
    assert isinstance(answer, dict)
    return answer


async def crossed(conn: asyncpg.Connection, budget_id: uuid.UUID) -> list[tuple[int, int, int]]:
    rows = await conn.fetch(
        "SELECT threshold, used, limit_amount FROM tokentrack.notifications"
        " WHERE budget_id = $1 ORDER BY window_start, threshold",
        budget_id,
    )
    return [(r["threshold"], r["used"], r["limit_amount"]) for r in rows]


async def test_each_budget_is_checked_against_the_limit_budget_limit_computes(
    conn: asyncpg.Connection,
) -> None:
    """The inline limit (limit_amount + unexpired grants overlapping the window) is
    budget_limit's, for every window kind and both units, with and without grants."""
    account = await new_account(conn, MONTH_LIMIT)
    later = datetime.now(UTC) + timedelta(days=400)
    ids = {
        "month": await budget(conn, account, None, "tokens", "month", 5_000),
        "day": await budget(
            conn, account, "team:a", "tokens", "day", 4_000, timezone="Europe/Berlin"
        ),
        "minute": await budget(conn, account, "key:k", "tokens", "minute", 3_000),
        "week": await budget(conn, account, "team:a", "cost_micros", "week", 2_000),
        "total": await budget(conn, account, "user:u", "tokens", "total", 1_000),
    }
    await grant(conn, account, ids["month"], 700)
    await grant(conn, account, ids["day"], 300, later)
    await grant(conn, account, ids["day"], 11)
    await grant(conn, account, ids["week"], 5_000, later)
    await grant(conn, account, ids["total"], 1, later)
    answer = await reserve(
        conn, account, {"tokens": 100, "cost_micros": 40}, ["team:a", "key:k", "user:u"]
    )
    assert answer["success"] is True, answer
    assert len(answer["budgets"]) == len(ids)
    expected_ids = sorted(str(i) for i in ids.values())
    assert [b["budget_id"] for b in answer["budgets"]] == expected_ids
    for held in answer["budgets"]:
        limit = await conn.fetchval(
            "SELECT tokentrack.budget_limit($1, $2, $3::text::timestamptz)",
            account,
            uuid.UUID(held["budget_id"]),
            held["window_start"],
        )
        requested = 100 if held["unit"] == "tokens" else 40
        assert held["held"] == requested
        assert held["available"] == limit - requested, (held, limit)
    # The limits themselves: limit_amount plus the grants counted in this window.
    limits = {
        name: await conn.fetchval(
            "SELECT tokentrack.budget_limit($1, $2, now())"
            if name != "total"
            else "SELECT tokentrack.budget_limit($1, $2, b.created_at)"
            " FROM tokentrack.budgets AS b WHERE b.id = $2",
            account,
            budget_id,
        )
        for name, budget_id in ids.items()
    }
    assert limits == {"month": 5_700, "day": 4_311, "minute": 3_000, "week": 7_000, "total": 1_001}


async def test_the_first_refusing_budget_in_id_order_answers_and_nothing_is_written(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    ids = sorted(
        [
            await budget(conn, account, None, "tokens", "month", 50),
            await budget(conn, account, "team:a", "tokens", "day", 40),
            await budget(conn, account, "key:k", "tokens", "minute", 1_000),
        ]
    )
    limits = {
        row["id"]: row["limit_amount"]
        for row in await conn.fetch(
            "SELECT id, limit_amount FROM tokentrack.budgets WHERE account_id = $1", account
        )
    }
    refusing = [i for i in ids if limits[i] < 60]
    before = await conn.fetchval("SELECT count(*) FROM tokentrack.report_reservations")
    answer = await reserve(conn, account, {"tokens": 60}, ["team:a", "key:k"])
    assert answer["success"] is False
    assert answer["error"] == "insufficient_budget"
    assert answer["budget_id"] == str(refusing[0])
    assert answer["requested"] == 60
    assert answer["available"] == limits[refusing[0]]
    assert answer["message"].startswith(f"requested 60 tokens, {limits[refusing[0]]} available")
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.report_reservations") == before
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM tokentrack.budget_windows WHERE account_id = $1", account
        )
        == 0
    )


async def test_a_hold_that_reaches_a_bound_exactly_records_it_one_short_records_none(
    conn: asyncpg.Connection,
) -> None:
    """The pre-test before note_crossings uses the window's limit with its grants: 100 + 50,
    80 % of 150 is 120."""
    account = await new_account(conn, MONTH_LIMIT)
    team = await budget(conn, account, "team:a", "tokens", "day", 100, thresholds=[80, 100])
    await grant(conn, account, team, 50)
    assert (await reserve(conn, account, {"tokens": 119}, ["team:a"]))["success"] is True
    assert await crossed(conn, team) == []
    assert (await reserve(conn, account, {"tokens": 1}, ["team:a"]))["success"] is True
    assert await crossed(conn, team) == [(80, 120, 150)]
    assert (await reserve(conn, account, {"tokens": 30}, ["team:a"]))["success"] is True
    assert await crossed(conn, team) == [(80, 120, 150), (100, 150, 150)]


async def test_a_cost_budget_held_at_zero_records_no_crossing_at_reserve(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    cost = await budget(conn, account, None, "cost_micros", "total", 10, thresholds=[1])
    answer = await reserve(conn, account, {"tokens": 5}, [])
    assert answer["success"] is True, answer
    assert answer["budgets"][0]["held"] == 0
    assert await crossed(conn, cost) == []
    answer = await reserve(conn, account, {"tokens": 5, "cost_micros": 1}, [])
    assert answer["success"] is True, answer
    assert await crossed(conn, cost) == [(1, 1, 10)]


async def test_only_the_crossing_windows_are_noted_and_each_once(conn: asyncpg.Connection) -> None:
    """Three budgets, one hold: only the one whose bound it reaches gets a notification."""
    account = await new_account(conn, MONTH_LIMIT)
    month = await budget(conn, account, None, "tokens", "month", 10_000)
    team = await budget(conn, account, "team:a", "tokens", "day", 1_000, thresholds=[50])
    key = await budget(conn, account, "key:k", "tokens", "minute", 100_000)
    assert (await reserve(conn, account, {"tokens": 500}, ["team:a", "key:k"]))["success"]
    assert await crossed(conn, month) == []
    assert await crossed(conn, team) == [(50, 500, 1_000)]
    assert await crossed(conn, key) == []
    assert (await reserve(conn, account, {"tokens": 1}, ["team:a", "key:k"]))["success"]
    assert await crossed(conn, team) == [(50, 500, 1_000)]


async def test_account_not_found_comes_before_a_report_of_another_account(
    conn: asyncpg.Connection,
) -> None:
    owner = await new_account(conn, MONTH_LIMIT)
    report = uuid.uuid4()
    assert (await call(conn, "try_reserve_tokens", owner, report, 10))["success"] is True
    missing = uuid.uuid4()
    answer = await call(conn, "try_reserve_tokens", missing, report, 10)
    assert answer["error"] == "account_not_found", answer
    other = await new_account(conn, MONTH_LIMIT)
    answer = await call(conn, "try_reserve_tokens", other, report, 10)
    assert answer["error"] == "report_account_mismatch", answer
    answer = await reserve(conn, other, {"tokens": 10}, [], report)
    assert answer["error"] == "report_account_mismatch", answer


@pytest.mark.parametrize("function", ["reserve", "try_reserve_tokens"])
async def test_grants_are_not_counted_and_refusals_are(
    conn: asyncpg.Connection, function: str
) -> None:
    account = await new_account(conn, 100)

    async def counted() -> int:
        return int(
            await conn.fetchval(
                "SELECT last_value - 1 + is_called::int"
                " FROM tokentrack.refusal_reserve_insufficient_tokens"
            )
        )

    async def ask(tokens: int) -> dict[str, Any]:
        if function == "reserve":
            return await reserve(conn, account, {"tokens": tokens}, [])
        return await call(conn, "try_reserve_tokens", account, uuid.uuid4(), tokens)

    start = await counted()
    assert (await ask(10))["success"] is True
    assert await counted() == start
    assert (await ask(1_000))["error"] == "insufficient_tokens"
    assert await counted() == start + 1


@pytest.mark.parametrize("function", ["reserve", "try_reserve_tokens"])
async def test_repeatable_read_is_still_refused_with_25000(
    conn: asyncpg.Connection, function: str
) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    sql = (
        "SELECT tokentrack.reserve($1, $2, '{\"tokens\": 1}')"
        if function == "reserve"
        else "SELECT tokentrack.try_reserve_tokens($1, $2, 1)"
    )
    with pytest.raises(
        asyncpg.InvalidTransactionStateError,
        match=f"tokentrack.{function} must run at READ COMMITTED",
    ):
        async with conn.transaction(isolation="repeatable_read"):
            await conn.fetchval(sql, account, uuid.uuid4())


async def test_lock_reservation_budgets_locks_the_held_budgets_and_none_without_holds(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    month = await budget(conn, account, None, "tokens", "month", 10_000)
    team = await budget(conn, account, "team:a", "tokens", "day", 10_000)
    other = await budget(conn, account, "team:b", "tokens", "day", 10_000)
    answer = await reserve(conn, account, {"tokens": 5}, ["team:a"])
    holds = await conn.fetchval(
        "SELECT holds::text FROM tokentrack.report_reservations WHERE id = $1",
        uuid.UUID(answer["reservation_id"]),
    )
    probe = await connect()
    try:

        async def locked(budget_id: uuid.UUID) -> bool:
            try:
                async with probe.transaction():
                    await probe.execute(
                        "SELECT FROM tokentrack.budgets WHERE account_id = $1 AND id = $2"
                        " FOR UPDATE NOWAIT",
                        account,
                        budget_id,
                    )
            except asyncpg.LockNotAvailableError:
                return True
            return False

        async with conn.transaction():
            await conn.execute("SELECT tokentrack.lock_reservation_budgets($1, NULL)", account)
            assert [await locked(b) for b in (month, team, other)] == [False, False, False]
            await conn.execute(
                "SELECT tokentrack.lock_reservation_budgets($1, $2::jsonb)", account, holds
            )
            assert [await locked(b) for b in (month, team, other)] == [True, True, False]
        assert [await locked(b) for b in (month, team, other)] == [False, False, False]
    finally:
        await probe.close()


@pytest.mark.parametrize(
    ("estimate", "message"),
    [
        ({"aaa": 1, "tokens": -1}, "unknown key p_estimate.aaa"),
        ({"tokens": -1, "zzz": 1}, "p_estimate.tokens must be positive"),
        ({"cost_micros": -1, "tokens": -5}, "p_estimate.cost_micros must not be negative"),
        ({"model": 7, "tokens": 0}, "p_estimate.model must be a model name"),
        ({"tokens": 5, "model": None, "cost_micros": None}, None),
    ],
)
async def test_check_estimate_reports_the_keys_in_their_order_with_or_without_unknown_ones(
    conn: asyncpg.Connection, estimate: dict[str, Any], message: str | None
) -> None:
    """The first bad key in key order is reported, whether the object has only known keys
    (no statement since version 20261214000000) or also unknown ones."""
    sql = "SELECT (tokentrack.check_estimate($1::jsonb, 'p_estimate')).*"
    if message is None:
        row = await conn.fetchrow(sql, json.dumps(estimate))
        assert (row["tokens"], row["cost_micros"]) == (5, None)
        return
    with pytest.raises(asyncpg.InvalidParameterValueError, match=message):
        await conn.fetchrow(sql, json.dumps(estimate))
