"""Version 20261213000000 (metrics): refusal counters, metrics() and billing_totals()."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
import pytest

from sqlkit import Connect, call, expire, new_account, reserve, step


async def refusals(conn: asyncpg.Connection) -> dict[tuple[str, ...], int]:
    """health()'s refusal counters, keyed by (operation, code[, unit, window, scope])."""
    answer = json.loads(await conn.fetchval("SELECT tokentrack.health(1)::text"))["refusals"]
    counted = {}
    for c in answer["counters"]:
        key = (c["operation"], c["code"])
        if c["unit"] is not None:
            key += (c["unit"], c["window"], c["scope"])
        counted[key] = int(c["count"])
    assert int(answer["total"]) == sum(counted.values())
    return counted


def nonzero(counted: dict[tuple[str, ...], int]) -> dict[tuple[str, ...], int]:
    return {k: v for k, v in counted.items() if v}


async def set_budget(
    conn: asyncpg.Connection, account: uuid.UUID, subject: str | None, window: str, limit: int
) -> str:
    answer = await call(conn, "set_budget", account, subject, "tokens", window, limit, "{}")
    assert answer["success"] is True, answer
    return str(answer["budget_id"])


async def reserve_json(
    conn: asyncpg.Connection, account: uuid.UUID, tokens: int, subjects: list[str]
) -> dict[str, Any]:
    raw = await conn.fetchval(
        "SELECT tokentrack.reserve($1, $2, $3::jsonb, $4::text[])::text",
        account,
        uuid.uuid4(),
        json.dumps({"tokens": tokens}),
        subjects,
    )
    answer: dict[str, Any] = json.loads(raw)
    return answer


# --------------------------------------------------------------------------------------------
# The counters
# --------------------------------------------------------------------------------------------


async def test_the_counters_are_fixed_bounded_and_start_at_zero(conn: asyncpg.Connection) -> None:
    counted = await refusals(conn)
    assert len(counted) == 68
    assert not nonzero(counted)
    budget_kinds = [k for k in counted if k[1] == "insufficient_budget"]
    assert len(budget_kinds) == 2 * 2 * 6 * 2  # operation x unit x window x scope
    assert {k[0] for k in counted} == {"reserve", "extend", "finalize", "step"}
    # One unlogged sequence per counter (no WAL), named as the view says.
    sequences = await conn.fetch(
        "SELECT c.oid::regclass::text AS name, c.relpersistence::text FROM pg_class AS c"
        " WHERE c.relkind = 'S' AND c.relnamespace = 'tokentrack'::regnamespace"
        " AND c.relname LIKE 'refusal\\_%'"
    )
    assert {r["relpersistence"] for r in sequences} == {"u"}
    listed = await conn.fetch("SELECT counter FROM tokentrack.refusal_counters")
    assert sorted(r["counter"] for r in listed) == sorted(r["name"] for r in sequences)
    assert len(sequences) == 68


async def test_each_reserve_refusal_counts_under_its_code(conn: asyncpg.Connection) -> None:
    account = await new_account(conn, limit=1_000)
    # insufficient_tokens
    _, answer = await reserve(conn, account, 5_000)
    assert answer["error"] == "insufficient_tokens"
    # account_not_found (try_reserve_tokens and reserve count under the same operation)
    _, answer = await reserve(conn, uuid.uuid4(), 10)
    assert answer["error"] == "account_not_found"
    answer = await reserve_json(conn, uuid.uuid4(), 10, [])
    assert answer["error"] == "account_not_found"
    # report_account_mismatch
    other = await new_account(conn)
    report, granted = await reserve(conn, other, 10)
    assert granted["success"] is True
    answer = await call(conn, "try_reserve_tokens", account, report, 10)
    assert answer["error"] == "report_account_mismatch"
    # report_finalized
    assert (await call(conn, "finalize_report_usage", report, other))["success"] is True
    answer = await call(conn, "try_reserve_tokens", other, report, 10)
    assert answer["error"] == "report_finalized"
    # no_active_period
    await conn.execute(
        "UPDATE tokentrack.usage_periods SET status = 'completed' WHERE account_id = $1", other
    )
    _, answer = await reserve(conn, other, 10)
    assert answer["error"] == "no_active_period"
    assert nonzero(await refusals(conn)) == {
        ("reserve", "insufficient_tokens"): 1,
        ("reserve", "account_not_found"): 2,
        ("reserve", "report_account_mismatch"): 1,
        ("reserve", "report_finalized"): 1,
        ("reserve", "no_active_period"): 1,
    }


async def test_a_budget_refusal_counts_by_the_refusing_budgets_kind(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    await set_budget(conn, account, None, "day", 100)
    await set_budget(conn, account, "user:1", "hour", 50)
    assert (await reserve_json(conn, account, 200, []))["error"] == "insufficient_budget"
    refused = await reserve_json(conn, account, 80, ["user:1"])
    assert refused["error"] == "insufficient_budget"
    assert refused["subject"] == "user:1"
    assert nonzero(await refusals(conn)) == {
        ("reserve", "insufficient_budget", "tokens", "day", "account"): 1,
        ("reserve", "insufficient_budget", "tokens", "hour", "subject"): 1,
    }


async def test_grants_and_successes_count_nothing(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    report, granted = await reserve(conn, account, 100)
    assert granted["success"] is True
    assert (await step(conn, report, account, "a", 1, 2))["success"] is True
    assert (await step(conn, report, account, "a", 1, 2))["duplicate"] is True
    extended = await call(conn, "extend_reservation", report, account, json.dumps({"tokens": 5}))
    assert extended["success"] is True
    assert (await call(conn, "finish_report", report, account, "complete", None))["success"]
    assert (await call(conn, "finish_report", report, account, "complete", None))["success"]
    assert not nonzero(await refusals(conn))


async def test_extend_finalize_and_step_refusals_count_under_their_operation(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn, limit=1_000)
    missing = uuid.uuid4()
    more = json.dumps({"tokens": 5})
    assert (await call(conn, "extend_reservation", missing, account, more))[
        "error"
    ] == "reservation_not_found"
    report, _ = await reserve(conn, account, 100)
    too_much = json.dumps({"tokens": 5_000})
    assert (await call(conn, "extend_reservation", report, account, too_much))[
        "error"
    ] == "insufficient_tokens"
    assert (await call(conn, "finalize_report_usage", missing, account))[
        "error"
    ] == "reservation_not_found"
    assert (await step(conn, missing, account, "a", 1, 1))["error"] == "reservation_not_found"
    usage = json.dumps({"input_tokens": 1, "output_tokens": 1})
    answer = await call(conn, "record_step", missing, account, "a", usage, None)
    assert answer["error"] == "reservation_not_found"
    assert (await step(conn, report, account, "a", 1, 1))["success"] is True
    assert (await step(conn, report, account, "a", 2, 2))["error"] == "step_conflict"
    assert (await call(conn, "finish_report", report, account, "failed", None))["success"]
    answer = await call(conn, "finish_report", report, account, "complete", None)
    assert answer["error"] == "report_finalized"
    assert (await call(conn, "extend_reservation", report, account, more))[
        "error"
    ] == "report_finalized"
    assert nonzero(await refusals(conn)) == {
        ("extend", "reservation_not_found"): 1,
        ("extend", "insufficient_tokens"): 1,
        ("extend", "report_finalized"): 1,
        ("finalize", "reservation_not_found"): 1,
        ("finalize", "report_finalized"): 1,
        ("step", "reservation_not_found"): 2,
        ("step", "step_conflict"): 1,
    }


async def test_a_refusal_counts_although_its_transaction_rolls_back_and_writes_nothing(
    conn: asyncpg.Connection,
) -> None:
    for rolled_back in (True, False, False, False):
        tr = conn.transaction()
        await tr.start()
        _, answer = await reserve(conn, uuid.uuid4(), 10)  # account_not_found: takes no lock
        assert answer["error"] == "account_not_found"
        # No transaction id: the count wrote nothing (no WAL) the commit would have to flush.
        assert await conn.fetchval("SELECT txid_current_if_assigned()") is None
        await (tr.rollback() if rolled_back else tr.commit())
    assert nonzero(await refusals(conn)) == {("reserve", "account_not_found"): 4}
    rows = await conn.fetchval("SELECT count(*) FROM tokentrack.reports")
    assert rows == 0


async def test_a_refusal_in_a_read_only_transaction_is_answered_and_not_counted(
    conn: asyncpg.Connection,
) -> None:
    async with conn.transaction(readonly=True):
        _, answer = await reserve(conn, uuid.uuid4(), 10)
        assert answer["error"] == "account_not_found"
    assert not nonzero(await refusals(conn))


async def test_concurrent_refusals_are_all_counted(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    account = await new_account(conn, limit=1)
    others = [await connect() for _ in range(4)]

    async def refuse(c: asyncpg.Connection) -> None:
        for _ in range(10):
            _, answer = await reserve(c, account, 10)
            assert answer["error"] == "insufficient_tokens"

    await asyncio.gather(*(refuse(c) for c in others))
    assert nonzero(await refusals(conn)) == {("reserve", "insufficient_tokens"): 40}


async def test_count_refusal_validates_its_operation_and_counts_unknown_codes_as_other(
    conn: asyncpg.Connection,
) -> None:
    refusal = json.dumps({"success": False, "error": "something_new"})
    with pytest.raises(asyncpg.NullValueNotAllowedError) as null:
        await conn.fetchval("SELECT tokentrack.count_refusal(NULL, $1::jsonb)", refusal)
    assert null.value.column_name == "p_operation"
    with pytest.raises(asyncpg.InvalidParameterValueError) as unknown:
        await conn.fetchval("SELECT tokentrack.count_refusal('bill', $1::jsonb)", refusal)
    assert unknown.value.column_name == "p_operation"
    echoed = await conn.fetchval(
        "SELECT tokentrack.count_refusal('step', $1::jsonb)::text", refusal
    )
    assert json.loads(echoed) == json.loads(refusal)
    granted = json.dumps({"success": True})
    await conn.fetchval("SELECT tokentrack.count_refusal('step', $1::jsonb)", granted)
    assert await conn.fetchval("SELECT tokentrack.count_refusal('step', NULL)") is None
    assert nonzero(await refusals(conn)) == {("step", "other"): 1}


# --------------------------------------------------------------------------------------------
# metrics()
# --------------------------------------------------------------------------------------------


async def metrics(conn: asyncpg.Connection, *args: int) -> dict[str, Any]:
    placeholders = ", ".join(f"${i + 1}" for i in range(len(args)))
    raw = await conn.fetchval(f"SELECT tokentrack.metrics({placeholders})::text", *args)
    answer: dict[str, Any] = json.loads(raw)
    return answer


async def test_metrics_keeps_the_top_accounts_and_sums_the_rest_under_other(
    conn: asyncpg.Connection,
) -> None:
    accounts = [await new_account(conn) for _ in range(4)]
    # Account i has a day budget of 100 with 10 * (i + 1) held: account 3 is the fullest.
    for i, account in enumerate(accounts):
        await set_budget(conn, account, None, "day", 100)
        assert (await reserve_json(conn, account, 10 * (i + 1), []))["success"] is True
    # Account 3 also has three subject budgets: the fullest stays, the others become "other".
    for n, fill in ((1, 5), (2, 40), (3, 1)):
        await set_budget(conn, accounts[3], f"user:{n}", "hour", 50)
        assert (await reserve_json(conn, accounts[3], fill, [f"user:{n}"]))["success"] is True
    answer = await metrics(conn, 1, 2, 1)
    assert answer["budget_accounts"] == 4
    groups = {(g["account"], g["subject"], g["unit"], g["window"]): g for g in answer["budgets"]}
    top, second = str(accounts[3]), str(accounts[2])
    assert set(groups) == {
        (top, "", "tokens", "day"),
        (top, "user:2", "tokens", "hour"),
        (top, "other", "tokens", "hour"),
        (second, "", "tokens", "day"),
        ("other", "other", "tokens", "day"),
    }
    # held: account 3 holds 40 + 5 + 40 + 1 in its day budget (every reservation holds it)
    assert groups[(top, "", "tokens", "day")]["held"] == 40 + 5 + 40 + 1
    assert groups[(top, "user:2", "tokens", "hour")]["held"] == 40
    assert groups[(top, "other", "tokens", "hour")] == {
        "account": top,
        "subject": "other",
        "unit": "tokens",
        "window": "hour",
        "budgets": 2,
        "exhausted": 0,
        "used": 0,
        "held": 6,
        "limit": 100,
    }
    rest = groups[("other", "other", "tokens", "day")]
    assert (rest["budgets"], rest["held"], rest["limit"]) == (2, 10 + 20, 200)
    # No cap left: everything summed.
    none = await metrics(conn, 1, 0, 0)
    assert {(g["account"], g["subject"]) for g in none["budgets"]} == {("other", "other")}
    assert sum(g["budgets"] for g in none["budgets"]) == 7


async def test_metrics_counts_an_exhausted_window_and_a_zero_limit_as_full(
    conn: asyncpg.Connection,
) -> None:
    full, empty = await new_account(conn), await new_account(conn)
    await set_budget(conn, full, None, "month", 0)
    await set_budget(conn, empty, None, "month", 10)
    answer = await metrics(conn, 1, 1, 0)
    [top] = [g for g in answer["budgets"] if g["account"] != "other"]
    assert top["account"] == str(full)
    assert top["exhausted"] == 1


async def test_metrics_report_durations(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    assert (await metrics(conn))["report_durations"]["count"] == 0
    report, _ = await reserve(conn, account, 10)
    await conn.execute(
        "UPDATE tokentrack.report_reservations SET created_at = now() - interval '90 seconds'"
        " WHERE report_id = $1",
        report,
    )
    assert (await call(conn, "finish_report", report, account, "complete", None))["success"]
    durations = (await metrics(conn))["report_durations"]
    assert durations["count"] == 1
    assert durations["hours"] == 1
    assert 89 <= durations["avg_seconds"] == durations["max_seconds"] < 120


@pytest.mark.parametrize(
    ("args", "column", "error"),
    [
        ((None, 10, 5), "p_hours", asyncpg.NullValueNotAllowedError),
        ((0, 10, 5), "p_hours", asyncpg.InvalidParameterValueError),
        ((1, None, 5), "p_top_accounts", asyncpg.NullValueNotAllowedError),
        ((1, -1, 5), "p_top_accounts", asyncpg.InvalidParameterValueError),
        ((1, 1001, 5), "p_top_accounts", asyncpg.InvalidParameterValueError),
        ((1, 10, None), "p_top_subjects", asyncpg.NullValueNotAllowedError),
        ((1, 10, -1), "p_top_subjects", asyncpg.InvalidParameterValueError),
        ((1, 10, 1001), "p_top_subjects", asyncpg.InvalidParameterValueError),
    ],
)
async def test_metrics_validates_its_arguments(
    conn: asyncpg.Connection, args: tuple[int | None, ...], column: str, error: type[Exception]
) -> None:
    with pytest.raises(error) as raised:
        await conn.fetchval("SELECT tokentrack.metrics($1, $2, $3)", *args)
    assert raised.value.column_name == column  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# billing_totals()
# --------------------------------------------------------------------------------------------


async def totals(conn: asyncpg.Connection, after: int = 0, settle: int = 0) -> dict[str, Any]:
    raw = await conn.fetchval("SELECT tokentrack.billing_totals($1, $2)::text", after, settle)
    answer: dict[str, Any] = json.loads(raw)
    return answer


async def test_billing_totals_sum_billed_expired_and_late_entries(conn: asyncpg.Connection) -> None:
    empty = await totals(conn)
    assert empty["last_entry"] == 0
    assert empty["all"]["entries"] == 0
    await call(conn, "set_model_price", "m", json.dumps({"input": 1_000_000, "output": 2_000_000}))
    account = await new_account(conn)
    billed, _ = await reserve(conn, account, 100)
    await step(conn, billed, account, "a", 10, 5, None, "m")  # 10 + 10 micros
    assert (await call(conn, "finish_report", billed, account, "complete", None))["success"]
    await step(conn, billed, account, "late", 1, 1, None, "m")  # late: 1 + 2 micros
    expired, _ = await reserve(conn, account, 100)
    await step(conn, expired, account, "a", 7, 0)  # unpriced
    await expire(conn, expired)
    await call(conn, "cleanup_expired_reservations")
    await conn.execute("SELECT tokentrack.increment_usage($1, 50, false, true)", account)
    answer = await totals(conn)
    assert answer["all"] == {
        "entries": 3,
        "reports_billed": 1,
        "reservations_expired": 1,
        "late_steps": 1,
        "tokens": 15 + 2 + 7,
        "late_tokens": 2,
        "cost_micros": 20 + 3,
    }
    assert answer["settled"]["entries"] == 0
    last = answer["last_entry"]
    assert last > 0
    # After the last entry: nothing; settling through it: everything counted once.
    assert (await totals(conn, last))["all"]["entries"] == 0
    assert (await totals(conn, last))["last_entry"] == last
    settled = await totals(conn, 0, last)
    assert settled["settled"] == settled["all"]
    assert int(settled["snapshot_xmin"]) <= int(settled["snapshot_xmax"])


@pytest.mark.parametrize(
    ("args", "column", "error"),
    [
        ((None, 0), "p_after_entry", asyncpg.NullValueNotAllowedError),
        ((-1, 0), "p_after_entry", asyncpg.InvalidParameterValueError),
        ((0, None), "p_settle_through", asyncpg.NullValueNotAllowedError),
        ((0, -1), "p_settle_through", asyncpg.InvalidParameterValueError),
    ],
)
async def test_billing_totals_validates_its_arguments(
    conn: asyncpg.Connection, args: tuple[int | None, ...], column: str, error: type[Exception]
) -> None:
    with pytest.raises(error) as raised:
        await conn.fetchval("SELECT tokentrack.billing_totals($1, $2)", *args)
    assert raised.value.column_name == column  # type: ignore[attr-defined]
