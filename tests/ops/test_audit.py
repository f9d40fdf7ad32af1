"""``tokentrack audit baseline|compare`` against a real server (fresh and with history)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import asyncpg
import pytest

from ops_history import call, tokentrack
from tokentrack_client import migrate


async def test_baseline_of_a_fresh_database_has_zero_figures(db_dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "baseline.json"
    result = await tokentrack("audit", "baseline", "--out", str(out), "--database-url", db_dsn)
    assert result.code == 0, result
    assert f"baseline written to {out}" in result.out
    figures = json.loads(out.read_text())
    assert figures["format"] == "tokentrack-audit/1"
    assert figures["usage_periods"]["active"] == {
        "periods": 0,
        "tokens_used": 0,
        "tokens_limit": 0,
        "reports_count": 0,
    }
    assert figures["versions"] == [v.version for v in migrate.load_versions()]
    assert "password" not in json.dumps(figures)

    same = await tokentrack("audit", "compare", str(out), "--database-url", db_dsn)
    assert same.code == 0, same
    assert "usage periods unchanged" in same.out


async def test_baseline_of_a_history_measures_what_was_built(
    history_dsn: str, tmp_path: Path
) -> None:
    out = tmp_path / "baseline.json"
    assert (
        await tokentrack("audit", "baseline", "--out", str(out), "--database-url", history_dsn)
    ).code == 0
    figures = json.loads(out.read_text())
    conn = await asyncpg.connect(history_dsn)
    try:
        for status in ("active", "completed"):
            row = await conn.fetchrow(
                "SELECT count(*) AS periods, sum(tokens_used) AS used,"
                " sum(reports_count) AS reports"
                " FROM tokentrack.usage_periods WHERE status = $1",
                status,
            )
            assert figures["usage_periods"][status]["periods"] == row["periods"] == 6
            assert figures["usage_periods"][status]["tokens_used"] == row["used"] > 0
            assert figures["usage_periods"][status]["reports_count"] == row["reports"] > 0
        in_24h = await conn.fetchval(
            "SELECT count(*) FROM tokentrack.reports"
            " WHERE created_at >= now() - interval '24 hours'"
        )
        total = await conn.fetchval("SELECT count(*) FROM tokentrack.reports")
    finally:
        await conn.close()
    assert 0 < sum(figures["reports_24h"].values()) == in_24h < total
    assert figures["reports_24h"]["complete"] > figures["reports_24h"]["failed"] > 0
    assert figures["tracked_tokens_7d"]["reports"] > 300
    assert figures["tracked_tokens_7d"]["total_tokens"] > 0
    assert figures["accounts"] == {"accounts": 6, "active_accounts": 6}


async def test_compare_passes_across_rollback_and_reinstall_of_version_2(
    history_dsn: str, tmp_path: Path
) -> None:
    """The deploy story: applying or rolling back every version after version 1 (version 2,
    health(), the guard on billed steps, token classes and cost) leaves the usage periods
    alone; baseline and compare work without health()
    (it is not installed before the deploy)."""
    # As the runbook's level-1 rollback does: the reports still running are billed (expired
    # and swept) before the baseline, so that the rollback has nothing left to bill.
    conn = await asyncpg.connect(history_dsn)
    try:
        await conn.execute(
            "UPDATE tokentrack.report_reservations SET expires_at = now() WHERE status = 'active'"
        )
    finally:
        await conn.close()
    assert (await tokentrack("cleanup", "--database-url", history_dsn)).code == 0
    out = tmp_path / "baseline.json"
    assert (
        await tokentrack("audit", "baseline", "--out", str(out), "--database-url", history_dsn)
    ).code == 0
    rolled_back = await tokentrack(  # --archive: version 2's tables hold the history's rows
        "migrate", "rollback", "--to", "20251219000000", "--archive", "--database-url", history_dsn
    )
    assert rolled_back.code == 0, rolled_back
    after_rollback = await tokentrack("audit", "compare", str(out), "--database-url", history_dsn)
    assert after_rollback.code == 0, after_rollback
    assert "(versions 20251219000000)" in after_rollback.out
    again = tmp_path / "again.json"
    assert (
        await tokentrack("audit", "baseline", "--out", str(again), "--database-url", history_dsn)
    ).code == 0  # a baseline before the deploy: health() is not there
    assert (await tokentrack("migrate", "install", "--database-url", history_dsn)).code == 0
    assert (
        await tokentrack("audit", "compare", str(again), "--database-url", history_dsn)
    ).code == 0
    reinstalled = await tokentrack("audit", "compare", str(out), "--database-url", history_dsn)
    assert reinstalled.code == 0, reinstalled


async def test_compare_names_a_changed_sum_and_exits_1(history_dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "baseline.json"
    assert (
        await tokentrack("audit", "baseline", "--out", str(out), "--database-url", history_dsn)
    ).code == 0
    conn = await asyncpg.connect(history_dsn)
    try:
        await conn.execute(
            "UPDATE tokentrack.usage_periods SET tokens_used = tokens_used + 7"
            " WHERE id = (SELECT id FROM tokentrack.usage_periods"
            "             WHERE status = 'completed' LIMIT 1)"
        )
    finally:
        await conn.close()
    result = await tokentrack("audit", "compare", str(out), "--database-url", history_dsn)
    assert result.code == 1, result
    assert "audit: usage_periods.completed.tokens_used changed" in result.out
    assert "(+7); it must not change" in result.out
    assert "not explained by recorded usage" in result.out
    assert "usage_periods.active.tokens_used changed" not in result.out
    as_json = await tokentrack(
        "audit", "compare", str(out), "--json", "--database-url", history_dsn
    )
    assert as_json.code == 1
    data = json.loads(as_json.out)
    assert data["ok"] is False
    assert data["changed"] == ["usage_periods.completed.tokens_used"]
    assert "usage_periods.completed.tokens_used changed" in as_json.err


async def test_compare_names_a_changed_count(history_dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "baseline.json"
    assert (
        await tokentrack("audit", "baseline", "--out", str(out), "--database-url", history_dsn)
    ).code == 0
    conn = await asyncpg.connect(history_dsn)
    try:
        await call(conn, "open_usage_period", uuid.uuid4(), 1_000, None)
    finally:
        await conn.close()
    result = await tokentrack("audit", "compare", str(out), "--database-url", history_dsn)
    assert result.code == 1
    assert "usage_periods.active.periods changed: 6 -> 7" in result.out
    assert "usage_periods.active.tokens_limit changed" in result.out
    assert "usage_periods.completed" not in result.out.split("audit:", 1)[1]


async def test_compare_says_when_live_traffic_explains_the_change(
    history_dsn: str, tmp_path: Path
) -> None:
    out = tmp_path / "baseline.json"
    assert (
        await tokentrack("audit", "baseline", "--out", str(out), "--database-url", history_dsn)
    ).code == 0
    conn = await asyncpg.connect(history_dsn)
    try:
        account = await conn.fetchval("SELECT account_id FROM tokentrack.usage_periods LIMIT 1")
        await call(conn, "increment_usage", account, 250, True, False)
    finally:
        await conn.close()
    result = await tokentrack("audit", "compare", str(out), "--database-url", history_dsn)
    assert result.code == 1, result
    assert "usage_periods.active.tokens_used changed" in result.out
    assert "equals the tokens of the 1 usage ledger rows written since the baseline" in result.out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("{not json", "invalid JSON"),
        ('{"format": "something else"}', "is not a tokentrack audit baseline"),
    ],
)
async def test_compare_refuses_a_bad_baseline_file(
    db_dsn: str, tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "baseline.json"
    if content is not None:
        path.write_text(content)
    result = await tokentrack("audit", "compare", str(path), "--database-url", db_dsn)
    assert result.code == 2
    assert result.err.startswith("tokentrack: error: ")
    assert message in result.err
    assert result.err.count("\n") == 1


async def test_audit_refuses_a_database_without_tokentrack(
    empty_db_dsn: str, tmp_path: Path
) -> None:
    result = await tokentrack(
        "audit", "baseline", "--out", str(tmp_path / "b.json"), "--database-url", empty_db_dsn
    )
    assert result.code == 2
    assert "tokentrack.usage_periods not found" in result.err
    assert not (tmp_path / "b.json").exists()
