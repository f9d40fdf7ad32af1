"""Contract: an invalid argument raises SQLSTATE class 22 naming it, and nothing is written."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest

from sqlkit import counts, new_account, reserve

A = "account"  # replaced by a real account id
R = "report"  # replaced by a report id with an active reservation of that account
LONG = "x" * 201

CASES: list[tuple[str, tuple[Any, ...], str, str]] = [
    # function, arguments, argument named in the message, SQLSTATE
    ("increment_usage", (None, 1, False, False), "p_account_id", "22004"),
    ("increment_usage", (A, None, False, False), "p_tokens", "22004"),
    ("increment_usage", (A, -1, False, False), "p_tokens", "22023"),
    ("increment_usage", (A, 1, None, False), "p_is_report", "22004"),
    ("increment_usage", (A, 1, False, None), "p_is_chat", "22004"),
    ("try_reserve_tokens", (None, R, 10), "p_account_id", "22004"),
    ("try_reserve_tokens", (A, None, 10), "p_report_id", "22004"),
    ("try_reserve_tokens", (A, R, None), "p_estimated_tokens", "22004"),
    ("try_reserve_tokens", (A, R, 0), "p_estimated_tokens", "22023"),
    ("try_reserve_tokens", (A, R, -5), "p_estimated_tokens", "22023"),
    ("persist_step_usage", (None, A, "AN0", 1, 1, None, None), "p_report_id", "22004"),
    ("persist_step_usage", (R, None, "AN0", 1, 1, None, None), "p_account_id", "22004"),
    ("persist_step_usage", (R, A, None, 1, 1, None, None), "p_step_name", "22004"),
    ("persist_step_usage", (R, A, "", 1, 1, None, None), "p_step_name", "22023"),
    ("persist_step_usage", (R, A, "   ", 1, 1, None, None), "p_step_name", "22023"),
    ("persist_step_usage", (R, A, LONG, 1, 1, None, None), "p_step_name", "22001"),
    ("persist_step_usage", (R, A, "AN0", None, 1, None, None), "p_input_tokens", "22004"),
    ("persist_step_usage", (R, A, "AN0", -1, 1, None, None), "p_input_tokens", "22023"),
    ("persist_step_usage", (R, A, "AN0", 1, None, None, None), "p_output_tokens", "22004"),
    ("persist_step_usage", (R, A, "AN0", 1, -1, None, None), "p_output_tokens", "22023"),
    ("persist_step_usage", (R, A, "AN0", 5, 5, 9, None), "p_total_tokens", "22023"),
    ("persist_step_usage", (R, A, "AN0", 5, 5, -1, None), "p_total_tokens", "22023"),
    (
        "persist_step_usage",
        (R, A, "AN0", 2_000_000_000, 2_000_000_000, None, None),
        "p_total_tokens",
        "22003",
    ),
    ("persist_step_usage", (R, A, "AN0", 1, 1, None, LONG), "p_model", "22001"),
    ("finalize_report_usage", (None, A), "p_report_id", "22004"),
    ("finalize_report_usage", (R, None), "p_account_id", "22004"),
    ("finish_report", (None, A, "complete", None), "p_report_id", "22004"),
    ("finish_report", (R, None, "complete", None), "p_account_id", "22004"),
    ("finish_report", (R, A, None, None), "p_status", "22004"),
    ("finish_report", (R, A, "done", None), "p_status", "22023"),
    ("finish_report", (R, A, "processing", None), "p_status", "22023"),
    ("finish_report", (R, A, "failed", "e" * 10_001), "p_error_message", "22001"),
    ("open_usage_period", (None, 10, None), "p_account_id", "22004"),
    ("open_usage_period", (A, None, None), "p_tokens_limit", "22004"),
    ("open_usage_period", (A, -1, None), "p_tokens_limit", "22023"),
]


@pytest.mark.parametrize(
    ("function", "args", "argument", "sqlstate"),
    CASES,
    ids=[f"{c[0]}-{c[2]}-{c[3]}-{i}" for i, c in enumerate(CASES)],
)
async def test_invalid_argument_is_a_data_exception_naming_it(
    conn: asyncpg.Connection,
    function: str,
    args: tuple[Any, ...],
    argument: str,
    sqlstate: str,
) -> None:
    account = await new_account(conn)
    report, _ = await reserve(conn, account, 10)
    real = tuple(account if a == A else report if a == R else a for a in args)
    before = await counts(conn)
    placeholders = ", ".join(f"${i}" for i in range(1, len(real) + 1))
    with pytest.raises(asyncpg.PostgresError) as caught:
        await conn.fetchval(f"SELECT tokentrack.{function}({placeholders})", *real)
    assert caught.value.sqlstate == sqlstate
    assert caught.value.sqlstate.startswith("22")
    assert argument in caught.value.message
    assert caught.value.column_name == argument
    assert await counts(conn) == before


async def test_period_end_in_the_past_is_refused(conn: asyncpg.Connection) -> None:
    before = await counts(conn)
    with pytest.raises(asyncpg.PostgresError) as caught:
        await conn.fetchval(
            "SELECT tokentrack.open_usage_period($1, 10, now() - interval '1 day')", uuid.uuid4()
        )
    assert (caught.value.sqlstate, caught.value.column_name) == ("22023", "p_period_end")
    assert await counts(conn) == before


@pytest.mark.parametrize("batch", [0, -1, None])
async def test_batched_sweep_refuses_a_bad_batch_size(conn: asyncpg.Connection, batch: Any) -> None:
    with pytest.raises(asyncpg.PostgresError) as caught:
        await conn.execute("CALL tokentrack.sweep_expired_reservations($1)", batch)
    assert caught.value.sqlstate in {"22004", "22023"}
    assert "p_batch_size" in caught.value.message


async def test_a_step_name_of_unicode_quotes_and_semicolons_is_data(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    report, _ = await reserve(conn, account, 10)
    name = "AN1.5 ✓ 'x'; DROP TABLE tokentrack.reports; --"
    answer = await conn.fetchval(
        "SELECT tokentrack.persist_step_usage($1, $2, $3, 1, 1, NULL, $3)", report, account, name
    )
    assert '"success": true' in answer
    assert (
        await conn.fetchval(
            "SELECT step_name FROM tokentrack.report_step_usage WHERE report_id = $1", report
        )
        == name
    )
