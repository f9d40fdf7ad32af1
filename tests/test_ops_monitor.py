"""``tokentrack monitor``: quiet on healthy databases, alerts on each seeded bad state.

Also proves that its queries stay indexed on large tables (EXPLAIN, no sequential scan of the
big tables), which is what keeps it fast; no timing is asserted.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ops_history import call, tokentrack
from tokentrack_client.ops.monitor import MONITOR_QUERIES

ALERTS = (
    "stale_reservations",
    "reservations_older_than_2h",
    "reports_without_steps",
    "usage_accuracy",
    "failure_rate",
    "completion_rate",
)


async def _monitor(dsn: str, *extra: str) -> tuple[int, dict[str, Any]]:
    result = await tokentrack("monitor", "--json", *extra, "--database-url", dsn)
    assert result.code in (0, 1), result
    return result.code, json.loads(result.out)


def _firing(data: dict[str, Any]) -> set[str]:
    return {a["name"] for a in data["alerts"] if a["firing"]}


async def _reserve(conn: asyncpg.Connection, account: uuid.UUID) -> uuid.UUID:
    report = uuid.uuid4()
    answer = await call(conn, "try_reserve_tokens", account, report, 100)
    assert answer["success"] is True, answer
    return report


async def _account(conn: asyncpg.Connection, limit: int = 10_000_000) -> uuid.UUID:
    account = uuid.uuid4()
    assert (await call(conn, "open_usage_period", account, limit, None))["success"] is True
    return account


async def test_monitor_is_quiet_on_a_fresh_database(db_dsn: str) -> None:
    code, data = await _monitor(db_dsn)
    assert code == 0
    assert _firing(data) == set()
    assert data["ok"] is True
    assert data["failure_rate"] is None
    assert data["reconcile"] == {"ok": True, "periods_checked": 0, "discrepancies": []}


async def test_monitor_is_quiet_on_a_healthy_history(history_dsn: str) -> None:
    code, data = await _monitor(history_dsn)
    assert code == 0, [a for a in data["alerts"] if a["firing"]]
    assert _firing(data) == set()
    conn = await asyncpg.connect(history_dsn)
    try:
        window = {
            r["status"]: r["n"]
            for r in await conn.fetch(
                "SELECT status, count(*) AS n FROM tokentrack.reports"
                " WHERE created_at >= now() - interval '24 hours' GROUP BY status"
            )
        }
        active = await conn.fetchval(
            "SELECT count(*) FROM tokentrack.report_reservations WHERE status = 'active'"
        )
        expired_in_window = await conn.fetchval(
            "SELECT count(*) FROM tokentrack.report_reservations rr"
            " JOIN tokentrack.reports r ON r.id = rr.report_id"
            " WHERE rr.status = 'expired' AND r.created_at >= now() - interval '24 hours'"
        )
    finally:
        await conn.close()
    assert {k: v for k, v in data["reports_window"].items() if v} == window
    assert window["complete"] > 200
    assert window["failed"] > 0
    assert window["cancelled"] > 0
    assert data["failure_rate"] == pytest.approx(
        window["failed"] / (window["complete"] + window["failed"] + window["cancelled"])
    )
    assert 0 < data["failure_rate"] < 0.05
    assert data["completion_rate"] > 0.9
    assert data["active_reservations"]["count"] == active > 0  # reports still running
    assert data["active_reservations"]["older_than_2h"] == 0
    assert data["reservations_by_status"]["expired"]["count"] == expired_in_window > 0
    assert data["reconcile"]["ok"] is True
    assert data["reconcile"]["periods_checked"] == 12
    assert sum(sum(h[s] for s in window) for h in data["reports_by_hour"]) == sum(window.values())
    assert len(data["reports_by_hour"]) in (24, 25)

    human = await tokentrack("monitor", "--database-url", history_dsn)
    assert human.code == 0
    assert "monitor: no alert firing" in human.out
    assert "Usage accuracy (reconcile): ok, 12 periods checked, 0 discrepancies" in human.out


async def test_prometheus_output_parses_and_matches_json(history_dsn: str) -> None:
    result = await tokentrack("monitor", "--prometheus", "--database-url", history_dsn)
    assert result.code == 0
    _, data = await _monitor(history_dsn)
    families = {f.name: f for f in text_string_to_metric_families(result.out)}
    assert all(f.type == "gauge" for f in families.values())

    def value(metric: str, /, **labels: str) -> float:
        for sample in families[metric].samples:
            if sample.labels == labels:
                return float(sample.value)
        raise AssertionError(f"{metric}{labels} not in output")

    assert value("tokentrack_reservations_active") == data["active_reservations"]["count"]
    assert value("tokentrack_reports", status="complete") == data["reports_window"]["complete"]
    assert value("tokentrack_report_failure_ratio") == pytest.approx(data["failure_rate"])
    assert value("tokentrack_reconcile_ok") == 1
    assert value("tokentrack_reconcile_periods_checked") == 12
    for name in ALERTS:
        level = "warning" if name == "reservations_older_than_2h" else "alert"
        assert value("tokentrack_alert", name=name, level=level) == 0

    fresh = await tokentrack(
        "monitor", "--prometheus", "--database-url", history_dsn, "--hours", "1"
    )
    assert fresh.code == 0
    parsed = {f.name: f for f in text_string_to_metric_families(fresh.out)}
    assert parsed["tokentrack_monitor_window_seconds"].samples[0].value == 3600


async def test_stale_reservations_warn_then_alert_above_the_threshold(history_dsn: str) -> None:
    conn = await asyncpg.connect(history_dsn)
    try:
        account = await _account(conn)
        reports = [await _reserve(conn, account) for _ in range(11)]

        async def age(report_ids: list[uuid.UUID], hours: int) -> None:
            await conn.execute(
                "UPDATE tokentrack.report_reservations"
                " SET created_at = now() - make_interval(hours => $2),"
                "     expires_at = now() - make_interval(hours => $2) + interval '2 hours'"
                " WHERE report_id = ANY($1::uuid[])",
                report_ids,
                hours,
            )

        await age(reports[:1], 4)  # one old active reservation: a warning, no alert
        code, data = await _monitor(history_dsn)
        assert code == 0
        assert _firing(data) == {"reservations_older_than_2h"}
        assert data["active_reservations"]["older_than_3h"] == 1
        code, data = await _monitor(history_dsn, "--stale-alert-count", "0")
        assert code == 1
        assert _firing(data) == {"reservations_older_than_2h", "stale_reservations"}

        await age(reports, 4)  # eleven: above the checklist's 10
        code, data = await _monitor(history_dsn)
        assert code == 1
        assert _firing(data) == {"reservations_older_than_2h", "stale_reservations"}
        assert data["active_reservations"]["past_expiry"] == 11
        human = await tokentrack("monitor", "--database-url", history_dsn)
        assert human.code == 1
        assert "stale_reservations          alert    FIRING" in human.out
        assert "monitor: 1 alert(s) firing" in human.out

        swept = await tokentrack("cleanup", "--database-url", history_dsn)
        assert swept.code == 0
        code, data = await _monitor(history_dsn)
        assert code == 0
        assert _firing(data) == set()
    finally:
        await conn.close()


async def test_a_raw_update_breaks_usage_accuracy(history_dsn: str) -> None:
    conn = await asyncpg.connect(history_dsn)
    try:
        period = await conn.fetchrow(
            "UPDATE tokentrack.usage_periods SET tokens_used = tokens_used + 1000"
            " WHERE id = (SELECT id FROM tokentrack.usage_periods WHERE status = 'active' LIMIT 1)"
            " RETURNING id, tokens_used"
        )
    finally:
        await conn.close()
    code, data = await _monitor(history_dsn)
    assert code == 1
    assert _firing(data) == {"usage_accuracy"}
    [found] = data["reconcile"]["discrepancies"]
    assert found["period_id"] == str(period["id"])
    assert found["actual"] - found["expected"] == 1000
    human = await tokentrack("monitor", "--database-url", history_dsn)
    assert f"period {period['id']} (tokens_used): expected {found['expected']}" in human.out
    prom = await tokentrack("monitor", "--prometheus", "--database-url", history_dsn)
    assert prom.code == 1
    assert 'tokentrack_alert{name="usage_accuracy",level="alert"} 1' in prom.out
    assert "tokentrack_reconcile_discrepancies 1" in prom.out


async def test_a_burst_of_failed_reports_fires_the_rate_alerts(history_dsn: str) -> None:
    conn = await asyncpg.connect(history_dsn)
    try:
        account = await _account(conn)
        for _ in range(40):
            report = await _reserve(conn, account)
            await call(conn, "persist_step_usage", report, account, "draft", 10, 5, None, None)
            done = await call(conn, "finish_report", report, account, "failed", "rate limited")
            assert done["success"] is True
    finally:
        await conn.close()
    code, data = await _monitor(history_dsn)
    assert code == 1
    assert _firing(data) == {"failure_rate", "completion_rate"}
    assert data["failure_rate"] > 0.05
    assert data["completion_rate"] < 0.9
    # Over the last hour only the burst counts.
    code, last_hour = await _monitor(history_dsn, "--hours", "1")
    assert last_hour["reports_window"]["failed"] >= 40
    assert last_hour["failure_rate"] > 0.5  # the burst dominates the last hour
    # Raised thresholds silence it.
    code, relaxed = await _monitor(
        history_dsn, "--max-failure-rate", "0.5", "--min-completion-rate", "0.5"
    )
    assert code == 0
    assert _firing(relaxed) == set()


async def test_few_reports_do_not_alert_on_rates_until_min_reports(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        account = await _account(conn)
        for status in ("complete", "failed", "failed"):
            report = await _reserve(conn, account)
            await call(conn, "persist_step_usage", report, account, "s", 1, 1, None, None)
            await call(conn, "finish_report", report, account, status, None)
    finally:
        await conn.close()
    code, data = await _monitor(db_dsn)
    assert code == 0
    assert data["failure_rate"] == pytest.approx(2 / 3)
    assert "fewer than --min-reports 20" in next(
        a["message"] for a in data["alerts"] if a["name"] == "failure_rate"
    )
    code, data = await _monitor(db_dsn, "--min-reports", "3")
    assert code == 1
    assert _firing(data) == {"failure_rate", "completion_rate"}


async def test_a_completed_report_without_steps_alerts(history_dsn: str) -> None:
    conn = await asyncpg.connect(history_dsn)
    try:
        account = await _account(conn)
        report = await _reserve(conn, account)
        done = await call(conn, "finish_report", report, account, "complete", None)
        assert done["success"] is True
        assert done["billed_tokens"] == 0
    finally:
        await conn.close()
    code, data = await _monitor(history_dsn)
    assert code == 1
    assert _firing(data) == {"reports_without_steps"}
    assert data["reports_without_steps"] == {"count": 1, "examples": [str(report)]}


async def test_monitor_errors(empty_db_dsn: str) -> None:
    missing = await tokentrack("monitor", "--database-url", empty_db_dsn)
    assert missing.code == 2
    assert missing.err == (
        "tokentrack: error: tokentrack.report_reservations not found in this database: install "
        "tokentrack first (make install-sql DATABASE_URL=... or tokentrack migrate install)\n"
    )
    both = await tokentrack("monitor", "--json", "--prometheus", "--database-url", empty_db_dsn)
    assert both.code == 2
    assert "not allowed with argument" in both.err
    bad = await tokentrack("monitor", "--max-failure-rate", "5", "--database-url", empty_db_dsn)
    assert bad.code == 2


# --------------------------------------------------------------------------------------------
# Large tables: every monitoring query is served by indexes
# --------------------------------------------------------------------------------------------

BIG_TABLES = {"reports", "report_reservations", "report_step_usage"}
REPORTS = 30_000


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(n for child in plan.get("Plans", []) for n in _nodes(child))]


async def _unindexed_scans(conn: asyncpg.Connection, plan: dict[str, Any]) -> list[str]:
    """Scans of a big table that read all of it: a Seq Scan, or an index scan whose condition
    does not bound the index's leading column (a whole-index scan), unless the index is a
    partial one (its predicate is the bound: the active reservations)."""
    found = []
    for node in _nodes(plan):
        if node.get("Node Type") == "Seq Scan" and node.get("Relation Name") in BIG_TABLES:
            found.append(f"Seq Scan on {node['Relation Name']}")
        if "Index Name" not in node:
            continue
        leading, partial = await conn.fetchrow(
            "SELECT a.attname, x.indpred IS NOT NULL FROM pg_index x"
            " JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]"
            " WHERE x.indexrelid = ('tokentrack.' || $1)::regclass",
            node["Index Name"],
        )
        condition = node.get("Index Cond", "")
        if not partial and f"({leading} " not in condition:
            found.append(
                f"whole-index scan of {node['Index Name']} ({condition or 'no condition'})"
            )
    return found


async def test_monitor_queries_use_indexes_on_large_tables(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    """30,000 reports over 30 days (reservations and steps alike), 30 active reservations.

    Reports per hour and the window's reservations need an index on reports (created_at);
    the SQL does not have one yet (see docs/RUNBOOK.md, "Monitoring"): it is created here
    when no index of reports starts with created_at, so that this test checks the plans
    that production gets once it exists.
    """
    # A synthetic bulk load for the planner: foreign-key triggers off while it loads.
    await conn.execute("SET session_replication_role = replica")
    await conn.execute(
        """
        INSERT INTO tokentrack.accounts (id)
        SELECT gen_random_uuid() FROM generate_series(1, 200);
        INSERT INTO tokentrack.usage_periods (account_id, tokens_limit)
        SELECT id, 1000000000 FROM tokentrack.accounts;
        INSERT INTO tokentrack.reports (id, account_id, status, created_at)
        SELECT gen_random_uuid(), acc.ids[1 + g % 200],
               CASE WHEN g % 50 = 0 THEN 'failed' ELSE 'complete' END,
               now() - (g * interval '86 seconds')
        FROM generate_series(1, 30000) AS g,
             (SELECT array_agg(id) AS ids FROM tokentrack.accounts) AS acc;
        INSERT INTO tokentrack.report_reservations
            (report_id, account_id, period_id, status, reserved_tokens, billed_tokens,
             created_at, expires_at, finalized_at)
        SELECT r.id, r.account_id, p.id, 'completed', 1000, 500,
               r.created_at, r.created_at + interval '2 hours', r.created_at + interval '5 minutes'
        FROM tokentrack.reports r
        JOIN tokentrack.usage_periods p ON p.account_id = r.account_id;
        UPDATE tokentrack.report_reservations SET status = 'active', billed_tokens = NULL,
               finalized_at = NULL, created_at = now(), expires_at = now() + interval '2 hours'
        WHERE id IN (SELECT id FROM tokentrack.report_reservations LIMIT 30);
        INSERT INTO tokentrack.report_step_usage
            (report_id, account_id, step_name, input_tokens, output_tokens, total_tokens)
        SELECT id, account_id, 'draft', 300, 200, 500 FROM tokentrack.reports;
        """
    )
    await conn.execute("RESET session_replication_role")
    await conn.execute(
        "ANALYZE tokentrack.reports, tokentrack.report_reservations, tokentrack.report_step_usage"
    )
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.reports") == REPORTS
    for name, sql in MONITOR_QUERIES.items():
        explained = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql.replace('$1', '24')}")
        plan = json.loads(explained)[0]["Plan"]
        assert await _unindexed_scans(conn, plan) == [], (name, json.dumps(plan, indent=1))
    code, data = await _monitor(db_dsn)
    assert code == 0
    # Reports every 86 seconds: 1,004 in the last 24 hours, every 50th failed.
    assert data["reports_window"]["complete"] + data["reports_window"]["failed"] == 1004
    assert data["reports_window"]["failed"] == 20
    assert data["active_reservations"]["count"] == 30
