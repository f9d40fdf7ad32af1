"""``tokentrack verify``: passes on what the installer created, fails on each kind of damage.

Its expectation is sql/catalog.json, the catalog of a clean install of each version prefix;
the first test regenerates it from scratch and fails, naming ``make catalog``, when the
committed file is not what the SQL files give.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import asyncpg
import pytest

from ops_history import tokentrack
from tokentrack_client import migrate
from tokentrack_client.ops import catalog
from tokentrack_client.ops._common import OpsError
from tokentrack_client.ops.verify import verify
from tokentrack_client.testing import PostgresServer

V1, V2, V3, V4 = "20251219000000", "20260108000000", "20261201000000", "20261202000000"
V5, V6 = "20261203000000", "20261210000000"
V7, V8, V9 = "20261211000000", "20261212000000", "20261213000000"
V10 = "20261214000000"


async def _verify(dsn: str, *extra: str) -> tuple[int, dict[str, dict[str, object]], str]:
    result = await tokentrack("verify", "--json", *extra, "--database-url", dsn)
    data = json.loads(result.out)
    return result.code, {c["name"]: c for c in data["checks"]}, result.out


async def _execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def test_the_committed_catalog_is_what_a_clean_install_gives(
    pg_server: PostgresServer,
) -> None:
    generated = catalog.render(await catalog.generate(pg_server.dsn("postgres")))
    path = catalog.catalog_path(migrate.default_sql_dir())
    committed = path.read_text(encoding="utf-8")
    assert json.loads(generated) == json.loads(committed), (
        f"{path} is not what a clean install of the SQL files gives: run `make catalog` "
        "(python -m tokentrack_client.ops.catalog) and commit the result"
    )
    versions = json.loads(committed)["versions"]
    assert list(versions) == [V1, V2, V3, V4, V5, V6, V7, V8, V9, V10]
    claim = "tokentrack.claim_notifications(text, integer, interval)"
    assert claim in versions[V8]["catalog"]["routines"]
    assert claim not in versions[V7]["catalog"]["routines"]
    grant = "tokentrack.grant_credits(uuid, uuid, bigint, timestamp with time zone, text, text)"
    assert grant in versions[V7]["catalog"]["routines"]
    assert grant not in versions[V6]["catalog"]["routines"]
    exporter = "tokentrack.metrics(integer, integer, integer)"
    assert exporter in versions[V9]["catalog"]["routines"]
    assert exporter not in versions[V8]["catalog"]["routines"]
    reserve = "tokentrack.reserve(uuid, uuid, jsonb, text[], text)"
    assert reserve in versions[V6]["catalog"]["routines"]
    assert reserve not in versions[V5]["catalog"]["routines"]
    record_step = "tokentrack.record_step(uuid, uuid, text, jsonb, text)"
    assert record_step in versions[V5]["catalog"]["routines"]
    assert record_step not in versions[V4]["catalog"]["routines"]
    assert "tokentrack.health(integer)" in versions[V3]["catalog"]["routines"]
    assert "tokentrack.health(integer)" not in versions[V2]["catalog"]["routines"]
    assert "report_reservations" not in versions[V1]["catalog"]["tables"]


async def test_a_catalog_of_other_files_is_refused(db_dsn: str, tmp_path: Path) -> None:
    sql_dir = tmp_path / "sql"
    shutil.copytree(migrate.default_sql_dir(), sql_dir)
    data = json.loads((sql_dir / "catalog.json").read_text(encoding="utf-8"))
    data["versions"][V2]["sources"] = "0" * 64
    (sql_dir / "catalog.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(OpsError, match=rf"version\(s\) {V2} differ\): run `make catalog`"):
        await verify(db_dsn, sql_dir=sql_dir)
    shutil.copy(migrate.default_sql_dir() / "catalog.json", sql_dir / "catalog.json")
    # A function file edited without `make catalog`: the catalog is stale (exit 2, regenerate
    # it), not a function "edited by hand in the database" (exit 1).
    reconcile = sql_dir / "functions" / "reconcile.sql"
    reconcile.write_text(reconcile.read_text() + "\n-- edited\n", encoding="utf-8")
    with pytest.raises(OpsError, match=rf"version\(s\) {V2} differ\): run `make catalog`"):
        await verify(db_dsn, sql_dir=sql_dir)
    (sql_dir / "catalog.json").unlink()
    with pytest.raises(OpsError, match="generate it with `make catalog`"):
        await verify(db_dsn, sql_dir=sql_dir)


async def test_verify_passes_on_a_fresh_install(db_dsn: str) -> None:
    result = await tokentrack("verify", "--database-url", db_dsn)
    assert result.code == 0, result.out
    assert "verify: all checks passed" in result.out
    for name in (
        "versions",
        "tables",
        "row level security",
        "routines",
        "execute grants",
        "policies",
        "table grants",
        "function answers",
        "indexes",
        "search_path",
        "columns",
        "constraints",
        "triggers",
        "schema",
        "comments",
    ):
        assert any(
            line.startswith(name) and " PASS " in line for line in result.out.splitlines()
        ), name
    assert "rows: report_reservations  INFO    0 (none)" in result.out


async def test_verify_passes_on_a_history_and_counts_the_new_tables(history_dsn: str) -> None:
    code, checks, _ = await _verify(history_dsn)
    assert code == 0
    assert all(c["result"] in ("PASS", "INFO") for c in checks.values())
    conn = await asyncpg.connect(history_dsn)
    try:
        steps = await conn.fetchval("SELECT count(*) FROM tokentrack.report_step_usage")
        unbilled = await conn.fetchval(
            "SELECT count(*) FROM tokentrack.report_step_usage WHERE billed_at IS NULL"
        )
        reservations = await conn.fetchval("SELECT count(*) FROM tokentrack.report_reservations")
    finally:
        await conn.close()
    assert unbilled > 0  # the reports still running
    assert checks["rows: report_step_usage"]["detail"] == f"{steps} ({unbilled} not billed yet)"
    assert str(checks["rows: report_reservations"]["detail"]).startswith(f"{reservations} (")
    assert "expired" in str(checks["rows: report_reservations"]["detail"])


async def test_verify_fails_when_rls_is_switched_off(history_dsn: str) -> None:
    await _execute(
        history_dsn, "ALTER TABLE tokentrack.report_step_usage DISABLE ROW LEVEL SECURITY"
    )
    result = await tokentrack("verify", "--database-url", history_dsn)
    assert result.code == 1
    assert "row level security is disabled on tokentrack.report_step_usage" in result.out
    assert "verify: FAILED" in result.out


@pytest.mark.parametrize(
    ("damage", "check", "problem"),
    [
        (
            "GRANT EXECUTE ON FUNCTION tokentrack.try_reserve_tokens(uuid, uuid, integer)"
            " TO PUBLIC",
            "execute grants",
            "PUBLIC may EXECUTE tokentrack.try_reserve_tokens(uuid, uuid, integer)",
        ),
        (
            "GRANT EXECUTE ON FUNCTION tokentrack.finalize_reservation(uuid, text)"
            " TO tokentrack_reader",
            "execute grants",
            "tokentrack_reader may EXECUTE tokentrack.finalize_reservation(uuid, text)",
        ),
        (
            "REVOKE EXECUTE ON FUNCTION tokentrack.finalize_report_usage(uuid, uuid)"
            " FROM tokentrack_service",
            "execute grants",
            "tokentrack_service may not EXECUTE tokentrack.finalize_report_usage(uuid, uuid)",
        ),
        (
            "GRANT UPDATE ON tokentrack.usage_periods TO tokentrack_service",
            "table grants",
            "tokentrack_service has UPDATE on tokentrack.usage_periods",
        ),
        (
            "DROP POLICY report_step_usage_reader_own ON tokentrack.report_step_usage",
            "policies",
            "policy report_step_usage_reader_own on tokentrack.report_step_usage is missing",
        ),
        (
            "CREATE POLICY everyone ON tokentrack.reports FOR SELECT TO PUBLIC USING (true)",
            "policies",
            "policy everyone on tokentrack.reports is not created by the SQL",
        ),
        (
            "ALTER FUNCTION tokentrack.reconcile(uuid) RESET search_path",
            "search_path",
            "SECURITY DEFINER tokentrack.reconcile(p_account_id uuid) does not pin search_path",
        ),
        (
            "DROP FUNCTION tokentrack.cleanup_expired_reservations()",
            "routines",
            "function tokentrack.cleanup_expired_reservations() is missing",
        ),
        (
            "DROP INDEX tokentrack.report_reservations_active_by_expiry",
            "indexes",
            "index report_reservations_active_by_expiry on tokentrack.report_reservations"
            " is missing",
        ),
        (
            "UPDATE tokentrack.schema_migrations SET checksum = 'x'"
            " WHERE version = '20260108000000'",
            "versions",
            "version 20260108000000_antifragile_token_tracking: recorded checksum",
        ),
        (
            "CREATE TABLE tokentrack.notes (account_id uuid)",
            "row level security",
            "tokentrack.notes holds account data but has no row level security",
        ),
        (
            "ALTER TABLE tokentrack.reports ALTER COLUMN mode SET DEFAULT 'dd'",
            "columns",
            "column tokentrack.reports.mode: default is 'dd'::text; a clean install gives"
            " 'standard'::text",
        ),
        (
            "ALTER TABLE tokentrack.usage_periods DROP CONSTRAINT usage_periods_used_non_negative",
            "constraints",
            "constraint usage_periods_used_non_negative on tokentrack.usage_periods is missing",
        ),
        (
            "ALTER TABLE tokentrack.reports FORCE ROW LEVEL SECURITY",
            "row level security",
            "row level security is forced on tokentrack.reports, unlike a clean install",
        ),
        (
            "ALTER TABLE tokentrack.usage_ledger DISABLE TRIGGER usage_ledger_no_update_delete",
            "triggers",
            "trigger usage_ledger_no_update_delete on tokentrack.usage_ledger: enabled is D;",
        ),
        (
            "CREATE INDEX reports_mode_idx ON tokentrack.reports (mode)",
            "indexes",
            "index reports_mode_idx on tokentrack.reports is not created by any tokentrack version",
        ),
        (
            "GRANT CREATE ON SCHEMA tokentrack TO tokentrack_reader",
            "schema",
            "tokentrack_reader has CREATE on schema tokentrack (not granted by the SQL)",
        ),
        (
            "COMMENT ON FUNCTION tokentrack.health(integer) IS NULL",
            "comments",
            "function tokentrack.health(integer) has no comment",
        ),
        (
            "GRANT EXECUTE ON FUNCTION tokentrack.health(integer) TO tokentrack_reader",
            "execute grants",
            "tokentrack_reader may EXECUTE tokentrack.health(integer) (not granted by the SQL)",
        ),
        (
            # A broken function: grants and signature intact, but it grants everything.
            "CREATE OR REPLACE FUNCTION tokentrack.try_reserve_tokens("
            "p_account_id uuid, p_report_id uuid, p_estimated_tokens integer) RETURNS jsonb"
            " LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp"
            " AS $$ SELECT '{\"success\": true}'::jsonb $$",
            "function answers",
            "try_reserve_tokens for unknown uuids answered",
        ),
        (
            "UPDATE tokentrack.usage_periods SET tokens_used = tokens_used + 1"
            " WHERE id = (SELECT id FROM tokentrack.usage_periods LIMIT 1)",
            "function answers",
            "reconcile() is not ok: 1 discrepancies",
        ),
    ],
)
async def test_verify_fails_on_damage(
    history_dsn: str, damage: str, check: str, problem: str
) -> None:
    await _execute(history_dsn, damage)
    code, checks, out = await _verify(history_dsn)
    assert code == 1, out
    assert checks[check]["ok"] is False
    problems = checks[check]["problems"]
    assert isinstance(problems, list)
    assert any(problem in p for p in problems), problems
    failed = {name for name, c in checks.items() if c["ok"] is False}
    # Only the damaged aspect fails (an unknown table is also reported as such, and a function
    # changed in the database also differs from a clean install's definition).
    also = {"tables"} if damage.startswith("CREATE TABLE") else set()
    if damage.startswith(("ALTER FUNCTION", "CREATE OR REPLACE FUNCTION")):
        also = {"routines"}
    assert failed == {check} | also


async def test_verify_names_a_function_edited_by_hand(history_dsn: str) -> None:
    """The same signature, grants, settings and answers; only the body differs."""
    await _execute(
        history_dsn,
        "CREATE OR REPLACE FUNCTION tokentrack.current_account_id() RETURNS uuid LANGUAGE sql"
        " STABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $function$"
        " SELECT NULLIF(pg_catalog.current_setting('tokentrack.account_id', true), '')::uuid"
        " -- a hotfix typed into psql\n$function$",
    )
    code, checks, out = await _verify(history_dsn)
    assert code == 1, out
    assert checks["routines"]["problems"] == [
        "function tokentrack.current_account_id(): its definition differs from a clean"
        " install's (edited by hand in the database?)"
    ]
    assert {name for name, c in checks.items() if c["ok"] is False} == {"routines"}
    human = await tokentrack("verify", "--database-url", history_dsn)
    assert human.code == 1
    assert "edited by hand in the database?" in human.out


async def test_verify_after_rolling_back_versions_10_9_8_7_6_5_4_3_and_2(db_dsn: str) -> None:
    # The versions after 6 first (write path, metrics, notifications, then credits): each
    # leaves its predecessor's catalog exactly.
    rolled = await tokentrack("migrate", "rollback", "--steps", "1", "--database-url", db_dsn)
    assert rolled.code == 0, rolled
    code, checks, _ = await _verify(db_dsn)
    assert code == 1
    assert checks["versions"]["problems"] == [f"version {V10}_write_path is not applied"]
    assert (await tokentrack("verify", "--upto", V9, "--database-url", db_dsn)).code == 0
    rolled = await tokentrack("migrate", "rollback", "--steps", "1", "--database-url", db_dsn)
    assert rolled.code == 0, rolled
    code, checks, _ = await _verify(db_dsn)
    assert code == 1
    metrics = "function tokentrack.metrics(integer, integer, integer) is missing"
    assert metrics in checks["routines"]["problems"]  # type: ignore[operator]
    assert (await tokentrack("verify", "--upto", V8, "--database-url", db_dsn)).code == 0
    rolled = await tokentrack("migrate", "rollback", "--steps", "1", "--database-url", db_dsn)
    assert rolled.code == 0, rolled
    code, checks, _ = await _verify(db_dsn)
    assert code == 1
    assert (
        "function tokentrack.claim_notifications(text, integer, interval) is missing"
        in (
            checks["routines"]["problems"]  # type: ignore[operator]
        )
    )
    assert (await tokentrack("verify", "--upto", V7, "--database-url", db_dsn)).code == 0
    rolled = await tokentrack("migrate", "rollback", "--steps", "1", "--database-url", db_dsn)
    assert rolled.code == 0, rolled
    code, checks, _ = await _verify(db_dsn)
    assert code == 1
    grant = (
        "function tokentrack.grant_credits(uuid, uuid, bigint, timestamp with time zone, text,"
        " text) is missing"
    )
    assert grant in checks["routines"]["problems"]  # type: ignore[operator]
    # The functions version 7 reworked are their earlier texts again: as version 6 had them.
    assert (await tokentrack("verify", "--upto", V6, "--database-url", db_dsn)).code == 0
    rolled = await tokentrack("migrate", "rollback", "--steps", "1", "--database-url", db_dsn)
    assert rolled.code == 0, rolled
    code, checks, _ = await _verify(db_dsn)
    assert code == 1
    problems = checks["routines"]["problems"]
    reserve = "function tokentrack.reserve(uuid, uuid, jsonb, text[], text) is missing"
    assert reserve in problems  # type: ignore[operator]
    # The functions version 6 reworked are their earlier texts again: as version 5 had them.
    assert (await tokentrack("verify", "--upto", V5, "--database-url", db_dsn)).code == 0
    rolled = await tokentrack("migrate", "rollback", "--steps", "1", "--database-url", db_dsn)
    assert rolled.code == 0, rolled
    code, checks, _ = await _verify(db_dsn)
    assert code == 1
    problems = checks["routines"]["problems"]
    assert f"function {record_step_signature()} is missing" in problems  # type: ignore[operator]
    # The functions version 5 reworked are their earlier texts again: as version 4 had them.
    assert (await tokentrack("verify", "--upto", V4, "--database-url", db_dsn)).code == 0
    rolled = await tokentrack("migrate", "rollback", "--steps", "1", "--database-url", db_dsn)
    assert rolled.code == 0, rolled
    code, checks, _ = await _verify(db_dsn)
    assert code == 1
    guard = "function tokentrack.report_step_usage_billed_is_immutable() is missing"
    assert guard in checks["routines"]["problems"]  # type: ignore[operator]
    assert (await tokentrack("verify", "--upto", V3, "--database-url", db_dsn)).code == 0
    rolled = await tokentrack("migrate", "rollback", "--steps", "1", "--database-url", db_dsn)
    assert rolled.code == 0, rolled
    code, checks, _ = await _verify(db_dsn)
    assert code == 1
    assert "function tokentrack.health(integer) is missing" in checks["routines"]["problems"]  # type: ignore[operator]
    assert (await tokentrack("verify", "--upto", V2, "--database-url", db_dsn)).code == 0
    rolled = await tokentrack("migrate", "rollback", "--steps", "1", "--database-url", db_dsn)
    assert rolled.code == 0, rolled
    code, checks, _ = await _verify(db_dsn)
    assert code == 1
    assert checks["versions"]["problems"] == [
        "version 20260108000000_antifragile_token_tracking is not applied",
        "version 20261201000000_health is not applied",
        "version 20261202000000_immutable_billed_steps is not applied",
        "version 20261203000000_token_classes_and_cost is not applied",
        "version 20261210000000_budgets is not applied",
        "version 20261211000000_credits is not applied",
        "version 20261212000000_notifications is not applied",
        "version 20261213000000_metrics is not applied",
        "version 20261214000000_write_path is not applied",
    ]
    assert checks["tables"]["problems"] == [
        "table tokentrack.budget_changes is missing",
        "table tokentrack.budget_windows is missing",
        "table tokentrack.budgets is missing",
        "table tokentrack.credit_grants is missing",
        "table tokentrack.model_prices is missing",
        "table tokentrack.notifications is missing",
        # version 20261214000000: the incremental reconcile's verified point
        "table tokentrack.reconcile_periods is missing",
        "table tokentrack.reconcile_point is missing",
        "table tokentrack.reconcile_windows is missing",
        "table tokentrack.refusal_counters is missing",  # a view, version 20261213000000
        "table tokentrack.report_refunds is missing",
        "table tokentrack.report_reservations is missing",
        "table tokentrack.report_step_usage is missing",
        "table tokentrack.usage_adjustments is missing",
    ]
    result = await tokentrack("verify", "--upto", V1, "--database-url", db_dsn)
    assert result.code == 0, result.out
    assert "applied with matching checksums: 20251219000000\n" in result.out
    assert "report_reservations" not in result.out


async def test_verify_upto_fails_while_the_later_version_is_applied(db_dsn: str) -> None:
    code, checks, _ = await _verify(db_dsn, "--upto", V1)
    assert code == 1
    assert checks["versions"]["problems"] == [
        f"version {V2}_antifragile_token_tracking is applied but --upto {V1} expects it rolled"
        " back",
        f"version {V3}_health is applied but --upto {V1} expects it rolled back",
        f"version {V4}_immutable_billed_steps is applied but --upto {V1} expects it rolled back",
        f"version {V5}_token_classes_and_cost is applied but --upto {V1} expects it rolled back",
        f"version {V6}_budgets is applied but --upto {V1} expects it rolled back",
        f"version {V7}_credits is applied but --upto {V1} expects it rolled back",
        f"version {V8}_notifications is applied but --upto {V1} expects it rolled back",
        f"version {V9}_metrics is applied but --upto {V1} expects it rolled back",
        f"version {V10}_write_path is applied but --upto {V1} expects it rolled back",
    ]
    assert (
        "tokentrack.health(integer) exists but its version is not applied"
        in checks["routines"]["problems"]
    )  # type: ignore[operator]
    assert (
        "table tokentrack.report_reservations exists but its version is not applied"
        in checks["tables"]["problems"]
    )  # type: ignore[operator]


async def test_verify_on_an_empty_database_fails(empty_db_dsn: str) -> None:
    code, checks, _ = await _verify(empty_db_dsn)
    assert code == 1
    assert f"version {V1}_add_usage_tracking is not applied" in checks["versions"]["problems"]  # type: ignore[operator]
    assert checks["schema"]["detail"] == "schema tokentrack does not exist"


async def test_verify_errors(db_dsn: str) -> None:
    unknown = await tokentrack("verify", "--upto", "20990101000000", "--database-url", db_dsn)
    assert unknown.code == 2
    assert unknown.err.startswith("tokentrack: error: --upto 20990101000000: no such version")
    refused = await tokentrack("verify", "--database-url", "postgresql://nobody@127.0.0.1:1/x")
    assert refused.code == 2
    assert refused.err.startswith("tokentrack: error: cannot connect to nobody@127.0.0.1:1/x")
    assert refused.err.count("\n") == 1


async def test_a_monitoring_role_granted_health_is_listed_not_failed(db_dsn: str) -> None:
    """docs/SECURITY.md, "Monitoring role": the documented grants are not a failure."""
    await _execute(
        db_dsn,
        "DROP ROLE IF EXISTS tt_verify_monitor; CREATE ROLE tt_verify_monitor NOLOGIN;"
        " GRANT USAGE ON SCHEMA tokentrack TO tt_verify_monitor;"
        " GRANT EXECUTE ON FUNCTION tokentrack.health(integer) TO tt_verify_monitor;"
        " GRANT EXECUTE ON FUNCTION tokentrack.reconcile(uuid) TO tt_verify_monitor",
    )
    try:
        code, checks, out = await _verify(db_dsn)
        assert checks["monitoring grants"]["result"] == "INFO"
        assert checks["monitoring grants"]["detail"] == (
            "tt_verify_monitor may EXECUTE tokentrack.health(integer); "
            "tt_verify_monitor may EXECUTE tokentrack.reconcile(uuid)"
        )
        assert code == 0, out  # the schema USAGE of the recipe is part of it
        await _execute(db_dsn, "GRANT CREATE ON SCHEMA tokentrack TO tt_verify_monitor")
        code, checks, out = await _verify(db_dsn)
        assert code == 1, out
        assert checks["schema"]["problems"] == [
            "tt_verify_monitor has CREATE on schema tokentrack (not granted by the SQL)"
        ]
    finally:
        await _execute(db_dsn, "DROP OWNED BY tt_verify_monitor; DROP ROLE tt_verify_monitor")


def record_step_signature() -> str:
    """How verify names record_step."""
    return "tokentrack.record_step(uuid, uuid, text, jsonb, text)"
