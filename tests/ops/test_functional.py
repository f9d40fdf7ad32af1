"""``tokentrack verify --functional``: the staging tests in a sandbox that leaves nothing behind."""

from __future__ import annotations

import json

import asyncpg

from ops_history import tokentrack
from sqlkit import snapshot

MODES = ("standard", "dd", "discovery", "hybrid")


async def _snapshot(dsn: str) -> dict[str, list[str]]:
    conn = await asyncpg.connect(dsn)
    try:
        return await snapshot(conn)
    finally:
        await conn.close()


async def test_functional_passes_and_leaves_every_row_as_it_was(history_dsn: str) -> None:
    before = await _snapshot(history_dsn)
    result = await tokentrack("verify", "--functional", "--database-url", history_dsn)
    assert result.code == 0, result.out
    assert "verify --functional: all staging tests passed" in result.out
    table = result.out.split("REPORT TYPE", 1)[1].splitlines()
    for mode in MODES:
        for outcome in ("complete", "cancelled", "failed"):
            [line] = [row for row in table if row.split()[:2] == [mode, outcome]]
            cells = line.split()
            assert cells[2] == outcome, line
            assert cells[5] == "PASS", line
            assert int(cells[3]) == int(cells[4]) > 0, line  # tokens recorded == billed
    assert [row.split()[:3] for row in table if row.startswith("race")] in (
        [
            ["race", "granted", "active"],
            ["race", "refused", "insufficient_tokens"],
            ["race", "removed", "gone"],
        ],
        [
            ["race", "refused", "insufficient_tokens"],
            ["race", "granted", "active"],
            ["race", "removed", "gone"],
        ],
    )
    assert await _snapshot(history_dsn) == before


async def test_functional_on_a_fresh_database_as_json(db_dsn: str) -> None:
    result = await tokentrack("verify", "--functional", "--json", "--database-url", db_dsn)
    assert result.code == 0, result.out
    data = json.loads(result.out)
    assert data["ok"] is True
    assert data["functional"]["ok"] is True
    rows = data["functional"]["rows"]
    assert len([r for r in rows if r["report_type"] in MODES]) == 12
    cancelled = [r for r in rows if r["outcome"] == "cancelled"]
    # The step after the cancel is recorded and billed (late): nothing is lost.
    assert all(r["tokens_recorded"] == r["billed"] > 0 for r in cancelled)
    assert sum(r["billed"] for r in rows if r["report_type"] in MODES) == next(
        r["billed"] for r in rows if r["outcome"] == "reconcile"
    )
    assert all(rows == [] for rows in (await _snapshot(db_dsn)).values())


async def test_functional_reports_a_failure_and_still_leaves_nothing(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        # A database whose sessions are read-only by default: the structure is intact
        # (verify compares every constraint and trigger with a clean install's, so the
        # breakage must not be one), but the staging run cannot write and must say so.
        dbname = await conn.fetchval("SELECT current_database()")
        await conn.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')
    finally:
        await conn.close()
    result = await tokentrack("verify", "--functional", "--database-url", db_dsn)
    assert result.code == 1
    assert "verify: all checks passed" in result.out  # the structure is fine
    assert "verify --functional: FAILED" in result.out
    assert "read-only transaction" in result.out, result.out
    assert "sandbox      rolled back  gone" in result.out
    assert all(rows == [] for rows in (await _snapshot(db_dsn)).values())


async def test_functional_is_skipped_when_the_structure_fails(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute("ALTER TABLE tokentrack.reports DISABLE ROW LEVEL SECURITY")
    finally:
        await conn.close()
    result = await tokentrack("verify", "--functional", "--database-url", db_dsn)
    assert result.code == 1
    assert "verify --functional: skipped: the structural checks failed" in result.out
