"""Version 20261203000000 (token classes and cost): its rollback keeps what it would drop, and
the functions it reworked work again at the version before it, also after a fresh install."""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest

from sqlkit import assert_reconciled, call, new_account, reserve, step
from tokentrack_client import migrate

COST = "20261203000000"
BEFORE = max(v.version for v in migrate.load_versions() if v.version < COST)


async def _classes_and_costs(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch(
        "SELECT (id, cached_input_tokens, cache_write_tokens, reasoning_tokens, cost_micros)::text"
        " AS row FROM tokentrack.report_step_usage ORDER BY id"
    )
    return [r["row"] for r in rows]


async def _priced_report(conn: asyncpg.Connection) -> tuple[uuid.UUID, uuid.UUID]:
    await call(conn, "set_model_price", "m", json.dumps({"input": 1_000_000, "output": 2_000_000}))
    account = await new_account(conn)
    report, _ = await reserve(conn, account, 10_000)
    usage = {
        "input_tokens": 100,
        "cached_input_tokens": 40,
        "output_tokens": 50,
        "reasoning_tokens": 20,
    }
    answer = await call(conn, "record_step", report, account, "AN0", json.dumps(usage), "m")
    assert answer["cost_micros"] == 200
    await call(conn, "finish_report", report, account, "complete", None)
    return account, report


async def test_rollback_refuses_then_archives_and_reinstall_restores_classes_costs_and_prices(
    db_dsn: str,
) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        account, _report = await _priced_report(conn)
        kept = await _classes_and_costs(conn)
        prices = await conn.fetch("SELECT * FROM tokentrack.model_prices ORDER BY id")

        with pytest.raises(migrate.RollbackRefused) as refused:
            await migrate.rollback(db_dsn, to=BEFORE)
        message = str(refused.value)
        assert "1 row(s) of tokentrack.model_prices" in message
        assert "report_step_usage" in message
        assert "cost_micros" in message
        assert await _classes_and_costs(conn) == kept  # nothing changed

        rolled = await migrate.rollback(db_dsn, to=BEFORE, archive=True)
        assert [v.version for v in rolled.versions][-1] == COST
        # At the version before: the reworked functions are their earlier texts again.
        assert (
            await conn.fetchval(
                "SELECT to_regprocedure('tokentrack.record_step(uuid,uuid,text,jsonb,text)')"
            )
            is None
        )
        later, _ = await reserve(conn, account, 100)
        answer = await step(conn, later, account, "AN0", 3, 4, None, "m")
        assert set(answer) == {"success", "step_id", "total_tokens", "duplicate", "late"}
        settled = await call(conn, "finish_report", later, account, "complete", None)
        assert settled["billed_tokens"] == 7
        await assert_reconciled(conn)

        await migrate.install(db_dsn)
        assert [r for r in await _classes_and_costs(conn) if r in kept] == kept
        assert await conn.fetch("SELECT * FROM tokentrack.model_prices ORDER BY id") == prices
        # The step recorded while the version was rolled back stays unpriced, as it was recorded.
        unpriced = await conn.fetchval(
            "SELECT count(*) FROM tokentrack.report_step_usage WHERE report_id = $1"
            " AND cost_micros IS NULL",
            later,
        )
        assert unpriced == 1
        await assert_reconciled(conn)
    finally:
        await conn.close()


async def test_a_fresh_install_rolled_back_to_the_version_before_works_as_that_version(
    db_dsn: str,
) -> None:
    """The template database is a fresh install of every version at once: rolling back to the
    version before 20261203000000 restores the earlier texts (sql/history/) of the functions it
    reworked, so Part 1's calls work and reconcile knows nothing of costs."""
    await migrate.rollback(db_dsn, to=BEFORE)
    conn = await asyncpg.connect(db_dsn)
    try:
        for name in ("persist_step_usage", "finalize_reservation", "reconcile", "health"):
            source = await conn.fetchval(
                "SELECT source FROM tokentrack.schema_functions WHERE path = $1"
                " ORDER BY id DESC LIMIT 1",
                f"functions/{name}.sql",
            )
            history = migrate.default_sql_dir() / "history" / BEFORE / f"{name}.sql"
            assert source == history.read_text(), name
        account = await new_account(conn)
        report, _ = await reserve(conn, account, 100)
        await step(conn, report, account, "AN0", 10, 5)
        settled = await call(conn, "finish_report", report, account, "complete", None)
        assert settled["billed_tokens"] == 15
        usage = json.loads(
            await conn.fetchval(
                "SELECT token_usage::text FROM tokentrack.reports WHERE id = $1", report
            )
        )
        assert "costMicros" not in usage
        verdict = await call(conn, "reconcile", None)
        assert verdict["ok"] is True
        assert "costs_checked" not in verdict
        health = await call(conn, "health", 24)
        assert "steps" not in health
    finally:
        await conn.close()
