"""Version 20261211000000 (credits): its rollback keeps the grants, adjustments and refunds,
the functions it reworked work again at the budgets version, and a reinstall restores the
records so that reconcile is ok again."""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest

from sqlkit import call, new_account, step
from tokentrack_client import migrate

CREDITS = "20261211000000"
BEFORE = max(v.version for v in migrate.load_versions() if v.version < CREDITS)
REWORKED = ("reserve_usage", "extend_reservation", "health", "reconcile")
INTRODUCED = ("grant_credits", "adjust_usage", "refund_report", "budget_limit")
RECORDS = ("credit_grants", "usage_adjustments", "report_refunds")


async def _records(conn: asyncpg.Connection) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for table in RECORDS:
        rows = await conn.fetch(f"SELECT t::text AS row FROM tokentrack.{table} AS t ORDER BY 1")
        out[table] = [r["row"] for r in rows]
    return out


async def _reserve(conn: asyncpg.Connection, account: uuid.UUID, tokens: int) -> dict[str, object]:
    answer = json.loads(
        await conn.fetchval(
            "SELECT tokentrack.reserve($1, $2, $3::jsonb)::text",
            account,
            uuid.uuid4(),
            json.dumps({"tokens": tokens}),
        )
    )
    assert isinstance(answer, dict)
    return answer


async def test_rollback_refuses_then_archives_and_reinstall_restores_the_records(
    db_dsn: str,
) -> None:
    assert BEFORE == "20261210000000"
    conn = await asyncpg.connect(db_dsn)
    try:
        account = await new_account(conn)
        made = await call(conn, "set_budget", account, None, "tokens", "day", 100, "{}")
        day = uuid.UUID(made["budget_id"])
        granted = await call(conn, "grant_credits", account, day, 50, None, "g-1", "promo")
        assert granted["limit"] == 150
        report = uuid.uuid4()
        reserved = json.loads(
            await conn.fetchval(
                "SELECT tokentrack.reserve($1, $2, '{\"tokens\": 120}'::jsonb)::text",
                account,
                report,
            )
        )
        assert reserved["success"] is True, reserved
        await step(conn, report, account, "S0", 30, 10)
        await call(conn, "finish_report", report, account, "complete", None)
        assert (await call(conn, "adjust_usage", account, day, 5, "a-1", "fix"))["used"] == 45
        assert (await call(conn, "adjust_usage", account, None, 3, "a-2", "fix"))["used"] == 43
        refunded = await call(conn, "refund_report", report, account, "r-1", "complaint")
        assert refunded["tokens"] == 40
        verdict = await call(conn, "reconcile", None)
        assert verdict["ok"] is True, verdict["discrepancies"]

        kept = await _records(conn)
        assert all(kept.values())
        with pytest.raises(migrate.RollbackRefused) as refused:
            await migrate.rollback(db_dsn, to=BEFORE)
        assert "tokentrack.credit_grants" in str(refused.value)
        assert await _records(conn) == kept  # nothing changed

        rolled = await migrate.rollback(db_dsn, to=BEFORE, archive=True)
        assert [v.version for v in rolled.versions] == [CREDITS]
        assert {t.table for t in rolled.versions[0].archived} == set(RECORDS)
        for table in RECORDS:
            assert await conn.fetchval(f"SELECT count(*) FROM tokentrack_archive.{table}") == len(
                kept[table]
            )
            assert await conn.fetchval("SELECT to_regclass($1)", f"tokentrack.{table}") is None
        for name in REWORKED:
            source = await conn.fetchval(
                "SELECT source FROM tokentrack.schema_functions WHERE path = $1"
                " ORDER BY id DESC LIMIT 1",
                f"functions/{name}.sql",
            )
            history = migrate.default_sql_dir() / "history" / BEFORE / f"{name}.sql"
            assert source == history.read_text(), name
        for name in INTRODUCED:
            assert await conn.fetchval("SELECT to_regproc($1)", f"tokentrack.{name}") is None
        # At the budgets version: the limit is limit_amount again (no grant counts), and the
        # corrected amounts stay as they are (reconcile cannot explain them until the records
        # come back).
        assert (await _reserve(conn, account, 96))["error"] == "insufficient_budget"
        assert await conn.fetchval("SELECT sum(used) FROM tokentrack.budget_windows") == 5
        at_budgets = await call(conn, "reconcile", None)
        assert {d["check"] for d in at_budgets["discrepancies"]} == {"budget_used", "tokens_used"}

        await migrate.install(db_dsn)
        assert await _records(conn) == kept
        assert await conn.fetchval("SELECT to_regnamespace('tokentrack_archive')") is None
        verdict = await call(conn, "reconcile", None)
        assert verdict["ok"] is True, verdict["discrepancies"]
        assert verdict["corrections_checked"] == 4
        # The grant counts again: 150 - 5 used.
        assert (await _reserve(conn, account, 145))["success"] is True
        again = await call(conn, "refund_report", report, account, "r-1", "complaint")
        assert again == {**refunded, "duplicate": True}
    finally:
        await conn.close()
