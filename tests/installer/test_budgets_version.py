"""Version 20261210000000 (budgets): its rollback keeps the budgets, their windows and the
reservations' holds, and the functions it reworked work again at the version before it."""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest

from sqlkit import assert_reconciled, call, new_account, reserve, step
from tokentrack_client import migrate

BUDGETS = "20261210000000"
BEFORE = max(v.version for v in migrate.load_versions() if v.version < BUDGETS)
REWORKED = (
    "try_reserve_tokens",
    "finalize_reservation",
    "record_step_usage",
    "expire_reservations",
    "finish_report",
    "health",
    "reconcile",
)


async def _budget_rows(conn: asyncpg.Connection) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for table in ("budgets", "budget_changes", "budget_windows"):
        rows = await conn.fetch(f"SELECT t::text AS row FROM tokentrack.{table} AS t ORDER BY 1")
        out[table] = [r["row"] for r in rows]
    holds = await conn.fetch(
        "SELECT (id, holds, reserved_cost_micros)::text AS row FROM tokentrack.report_reservations"
        " WHERE holds IS NOT NULL OR reserved_cost_micros IS NOT NULL ORDER BY id"
    )
    out["holds"] = [r["row"] for r in holds]
    return out


async def test_rollback_refuses_then_archives_and_reinstall_restores_budgets_and_holds(
    db_dsn: str,
) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        account = await new_account(conn)
        await call(conn, "set_budget", account, "team:a", "tokens", "day", 1_000, "{}")
        billed = uuid.uuid4()
        answer = json.loads(
            await conn.fetchval(
                "SELECT tokentrack.reserve($1, $2, $3::jsonb, $4::text[])::text",
                account,
                billed,
                json.dumps({"tokens": 100, "cost_micros": 7}),
                ["team:a"],
            )
        )
        assert answer["success"] is True
        await step(conn, billed, account, "S0", 30, 20)
        await call(conn, "finish_report", billed, account, "complete", None)
        # A report in flight under the team's budget: the archive rollback bills it first, with
        # this version's functions, into its window.
        running = uuid.uuid4()
        answer = json.loads(
            await conn.fetchval(
                "SELECT tokentrack.reserve($1, $2, '{\"tokens\": 100}'::jsonb, $3::text[])::text",
                account,
                running,
                ["team:a"],
            )
        )
        assert answer["success"] is True
        await step(conn, running, account, "S0", 6, 4)

        kept = await _budget_rows(conn)
        assert kept["holds"]
        with pytest.raises(migrate.RollbackRefused) as refused:
            await migrate.rollback(db_dsn, to=BEFORE)
        assert "tokentrack.budgets" in str(refused.value)
        assert await _budget_rows(conn) == kept  # nothing changed

        rolled = await migrate.rollback(db_dsn, to=BEFORE, archive=True)
        assert [v.version for v in rolled.versions][-1] == BUDGETS
        # The versions after it (credits, with no rows here) go first; the budgets version,
        # whose billing data holds the report in flight, bills it.
        swept = rolled.versions[-1].billed
        assert swept is not None
        assert (swept.expired, swept.billed_tokens) == (1, 10)
        # What the archive keeps already counts the swept report: 50 billed before, 10 by it.
        archived = await conn.fetchval("SELECT sum(used) FROM tokentrack_archive.budget_windows")
        assert archived == 60
        for name in REWORKED:
            source = await conn.fetchval(
                "SELECT source FROM tokentrack.schema_functions WHERE path = $1"
                " ORDER BY id DESC LIMIT 1",
                f"functions/{name}.sql",
            )
            history = migrate.default_sql_dir() / "history" / BEFORE / f"{name}.sql"
            assert source == history.read_text(), name
        # At the version before: Part 1 and the cost version's calls work as they did.
        report, granted = await reserve(conn, account, 100)
        assert granted["success"] is True
        assert "budgets" not in granted
        await step(conn, report, account, "S0", 3, 4)
        settled = await call(conn, "finish_report", report, account, "complete", None)
        assert settled["billed_tokens"] == 7
        await assert_reconciled(conn)

        await migrate.install(db_dsn)
        restored = await _budget_rows(conn)
        assert restored["budgets"] == kept["budgets"]
        assert restored["budget_changes"] == kept["budget_changes"]
        assert restored["holds"] == kept["holds"]
        # The window's use: the billed report (50) and the one the rollback swept (10).
        assert await conn.fetchval("SELECT sum(used) FROM tokentrack.budget_windows") == 60
        verdict = await call(conn, "reconcile", account)
        assert verdict["ok"] is True, verdict["discrepancies"]
        assert verdict["budget_windows_checked"] == 1
    finally:
        await conn.close()
