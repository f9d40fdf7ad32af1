"""The invariant checker itself (tests/support/invariants.py): silent on a healthy database, and
each kind of damage, done behind the functions' back, is reported as the invariant it breaks.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest

from invariants import check_invariants, install_grant_probe, v1_state
from sqlkit import call, expire, new_account, reserve, step


async def healthy(conn: asyncpg.Connection) -> dict[str, Any]:
    """Billed, late, active and swept reports, increments, and two accounts."""
    await install_grant_probe(conn)
    account = await new_account(conn, 1_000)
    other = await new_account(conn, 1_000)
    # A budget of the account's own: its reservations hold its month's window.
    budget = await call(conn, "set_budget", account, None, "tokens", "month", 300, "{}")
    assert budget["success"] is True
    billed, grant = await reserve(conn, account, 100)
    await step(conn, billed, account, "AN0", 10, 5)
    await call(conn, "finish_report", billed, account, "complete", None)
    await step(conn, billed, account, "late", 1, 1)
    active, _ = await reserve(conn, account, 100)
    await step(conn, active, account, "AN0", 3, 3)
    swept, _ = await reserve(conn, other, 100)
    await step(conn, swept, other, "AN0", 4, 4)
    await expire(conn, swept)
    await call(conn, "cleanup_expired_reservations")
    await call(conn, "increment_usage", account, 7, True, False)
    return {"account": account, "other": other, "billed": billed, "active": active, "grant": grant}


DAMAGE = [
    (
        "tokens_used raised",
        "UPDATE tokentrack.usage_periods SET tokens_used = tokens_used + 5 WHERE account_id = $1",
        "account",
        {2, 6},
    ),
    (
        "a report billed twice",
        "INSERT INTO tokentrack.usage_ledger (account_id, period_id, kind, tokens, report_id)"
        " SELECT account_id, period_id, 'report_billed', billed_tokens, report_id"
        " FROM tokentrack.report_reservations WHERE report_id = $1",
        "billed",
        {1, 6},
    ),
    (
        "a billed step unmarked",
        "UPDATE tokentrack.report_step_usage SET billed_at = NULL, billed_period_id = NULL,"
        " billing_entry_id = NULL WHERE report_id = $1 AND step_name = 'AN0'",
        "billed",
        {1, 2, 6, 7},  # 7: the budget window was billed the step
    ),
    (
        "a reservation granted beyond the limit",
        "INSERT INTO tokentrack.report_reservations (report_id, account_id, period_id,"
        " reserved_tokens) SELECT r.id, r.account_id, p.id, 5000 FROM tokentrack.reports AS r"
        " JOIN tokentrack.usage_periods AS p ON p.account_id = r.account_id"
        " AND p.status = 'active' WHERE r.id = $1",
        "new_report",
        {3},
    ),
    (
        "an active reservation left past its expiry",
        "UPDATE tokentrack.report_reservations SET created_at = now() - interval '3 hours',"
        " expires_at = now() - interval '1 hour' WHERE report_id = $1",
        "active",
        {4},
    ),
    (
        "a step moved to another account",
        "UPDATE tokentrack.report_step_usage SET account_id = (SELECT id FROM tokentrack.accounts"
        " WHERE id <> $1 LIMIT 1) WHERE report_id IN (SELECT id FROM tokentrack.reports"
        " WHERE account_id = $1)",
        "account",
        {5},
    ),
    (
        "a budget window's used raised",
        "UPDATE tokentrack.budget_windows SET used = used + 5 WHERE account_id = $1",
        "account",
        {6, 7},
    ),
    (
        "a reservation granted beyond a budget",
        "INSERT INTO tokentrack.report_reservations (report_id, account_id, period_id,"
        " reserved_tokens, holds) SELECT r.id, r.account_id, p.id, 250, ("
        "   SELECT rr.holds FROM tokentrack.report_reservations AS rr"
        "   WHERE rr.account_id = r.account_id AND rr.holds IS NOT NULL LIMIT 1)"
        " FROM tokentrack.reports AS r JOIN tokentrack.usage_periods AS p"
        "   ON p.account_id = r.account_id AND p.status = 'active' WHERE r.id = $1",
        "new_report",
        {7},
    ),
    (
        "a reservation's hold moved to another window",
        "UPDATE tokentrack.report_reservations SET holds = jsonb_build_array(jsonb_build_object("
        " 'budget_id', holds -> 0 ->> 'budget_id', 'window_start', '2020-01-01T00:00:00Z'))"
        " WHERE report_id = $1",
        "billed",
        {6, 7},
    ),
    (
        "reports_count raised",
        "UPDATE tokentrack.usage_periods SET reports_count = reports_count + 1"
        " WHERE account_id = $1",
        "account",
        {2, 6},
    ),
]


async def test_a_healthy_database_has_no_violation(conn: asyncpg.Connection) -> None:
    ids = await healthy(conn)
    assert await check_invariants(conn, grants=[ids["grant"]]) == []
    await conn.execute(
        "UPDATE tokentrack.report_reservations SET created_at = now() - interval '3 hours',"
        " expires_at = now() - interval '1 hour' WHERE status = 'active'"
    )
    await call(conn, "cleanup_expired_reservations")
    assert await check_invariants(conn, settled=True, swept=True, grants=[ids["grant"]]) == []


@pytest.mark.parametrize(
    ("damage", "sql", "target", "invariants"), DAMAGE, ids=[d[0] for d in DAMAGE]
)
async def test_damage_is_reported_as_the_invariant_it_breaks(
    conn: asyncpg.Connection, damage: str, sql: str, target: str, invariants: set[int]
) -> None:
    ids = await healthy(conn)
    if target == "new_report":
        ids[target] = uuid.uuid4()
        await conn.execute(
            "INSERT INTO tokentrack.reports (id, account_id) VALUES ($1, $2)",
            ids[target],
            ids["account"],
        )
    # Behind the functions' back, past the guard on billed steps (version 20261202000000).
    guard = "TRIGGER report_step_usage_billed_immutable"
    await conn.execute(f"ALTER TABLE tokentrack.report_step_usage DISABLE {guard}")
    await conn.execute(sql, ids[target])
    await conn.execute(f"ALTER TABLE tokentrack.report_step_usage ENABLE {guard}")
    found = await check_invariants(conn, swept=True)
    numbers = {int(text.split(":")[0].split()[1]) for text in found}
    assert numbers == invariants, found


async def test_an_answer_promising_more_than_was_available_is_reported(
    conn: asyncpg.Connection,
) -> None:
    ids = await healthy(conn)
    inflated = {**ids["grant"], "available_tokens": ids["grant"]["available_tokens"] + 1}
    found = await check_invariants(conn, grants=[inflated])
    assert len(found) == 1
    assert found[0].startswith("invariant 3: the grant answered more available_tokens")


async def test_a_change_of_version_1_rows_is_reported(conn: asyncpg.Connection) -> None:
    ids = await healthy(conn)
    before = await v1_state(conn)
    await conn.execute("UPDATE tokentrack.reports SET mode = 'hybrid' WHERE id = $1", ids["billed"])
    found = await check_invariants(conn, v1_before=before)
    assert found == ["invariant 6: reports changed across the version change"]


async def test_an_answer_promising_more_of_a_budget_than_was_available_is_reported(
    conn: asyncpg.Connection,
) -> None:
    ids = await healthy(conn)
    entries = [{**b, "available": b["available"] + 1} for b in ids["grant"]["budgets"]]
    found = await check_invariants(conn, grants=[{**ids["grant"], "budgets": entries}])
    assert len(found) == 1, found
    assert found[0].startswith("invariant 7: a reserve answered more available"), found
