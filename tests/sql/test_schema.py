"""Contract: tables, constraints, row level security, privileges; the DBA's post-deploy checks."""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest

from sqlkit import TABLES, call, counts, new_account, reserve, step

PUBLIC_API = {
    "increment_usage(uuid,integer,boolean,boolean)",
    "try_reserve_tokens(uuid,uuid,integer)",
    "persist_step_usage(uuid,uuid,text,integer,integer,integer,text)",
    "finalize_report_usage(uuid,uuid)",
    "finish_report(uuid,uuid,text,text)",
    "cleanup_expired_reservations()",
    "reconcile(uuid)",
    "open_usage_period(uuid,bigint,timestamp with time zone)",
    "expire_reservations(integer)",
    "sweep_expired_reservations(integer)",
    "health(integer)",
    "record_step(uuid,uuid,text,jsonb,text)",
    "reserve(uuid,uuid,jsonb,text[],text)",
    "extend_reservation(uuid,uuid,jsonb)",
    "set_budget(uuid,text,text,text,bigint,jsonb)",
    "grant_credits(uuid,uuid,bigint,timestamp with time zone,text,text)",
    "adjust_usage(uuid,uuid,bigint,text,text)",
    "refund_report(uuid,uuid,text,text)",
    "claim_notifications(text,integer,interval)",
    "ack_notification(bigint,text)",
    "metrics(integer,integer,integer)",
    "billing_totals(bigint,bigint)",
    # version 20261214000000: the incremental reconcile
    "reconcile_recent(uuid)",
    "advance_reconcile_point()",
}

# Functions that run with the caller's rights: the replaceable account hook, the trigger
# functions of the ledger and of the billed steps (they only refuse, as the role that
# changes the table), and the batched sweep (a procedure that commits cannot be SECURITY
# DEFINER).
INVOKER_RIGHTS = (
    "current_account_id",
    "usage_ledger_is_append_only",
    "report_step_usage_billed_is_immutable",
    "model_prices_are_immutable",
    "budget_changes_are_append_only",
    "credit_records_are_append_only",  # version 20261211000000
    "sweep_expired_reservations",
)


async def test_dba_post_deploy_checks_pass_verbatim(conn: asyncpg.Connection) -> None:
    await conn.execute("SET search_path = tokentrack")
    tables = await conn.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'tokentrack'"
        " AND table_name IN ('report_step_usage', 'report_reservations')"
    )
    assert {r["table_name"] for r in tables} == {"report_step_usage", "report_reservations"}
    routines = await conn.fetch(
        "SELECT routine_name FROM information_schema.routines WHERE routine_schema = 'tokentrack'"
        " AND routine_name IN ('try_reserve_tokens', 'persist_step_usage', 'finalize_report_usage')"
    )
    assert {r["routine_name"] for r in routines} == {
        "try_reserve_tokens",
        "persist_step_usage",
        "finalize_report_usage",
    }
    rls = await conn.fetch(
        "SELECT tablename, rowsecurity FROM pg_tables WHERE schemaname = 'tokentrack'"
        " AND tablename IN ('report_step_usage', 'report_reservations')"
    )
    assert {r["tablename"]: r["rowsecurity"] for r in rls} == {
        "report_step_usage": True,
        "report_reservations": True,
    }
    before = await counts(conn)
    raw = await conn.fetchval(
        "SELECT try_reserve_tokens('00000000-0000-0000-0000-000000000001'::uuid,"
        " '00000000-0000-0000-0000-000000000002'::uuid, 180000)"
    )
    assert json.loads(raw)["success"] is False
    assert await counts(conn) == before


async def test_a_minimal_insert_opens_a_period_with_defaults(conn: asyncpg.Connection) -> None:
    account = uuid.uuid4()
    await conn.execute("INSERT INTO tokentrack.accounts (id) VALUES ($1)", account)
    await conn.execute(
        "INSERT INTO tokentrack.usage_periods (account_id, tokens_limit) VALUES ($1, 5000)", account
    )
    row = await conn.fetchrow(
        "SELECT *, period_end = period_start + interval '1 month' AS one_month"
        " FROM tokentrack.usage_periods"
        " WHERE account_id = $1",
        account,
    )
    assert row is not None
    assert row["id"] is not None
    assert (row["status"], row["tokens_used"], row["reports_count"]) == ("active", 0, 0)
    assert row["one_month"] is True
    _, answer = await reserve(conn, account, 5000)
    assert answer["success"] is True


async def test_at_most_one_active_period_per_account(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    with pytest.raises(asyncpg.UniqueViolationError) as caught:
        await conn.execute(
            "INSERT INTO tokentrack.usage_periods (account_id, tokens_limit) VALUES ($1, 1)",
            account,
        )
    assert caught.value.constraint_name == "usage_periods_one_active_per_account"


@pytest.mark.parametrize(
    ("statement", "constraint"),
    [
        ("DELETE FROM tokentrack.accounts WHERE id = $1", {"usage_periods_account_fk"}),
        (
            "DELETE FROM tokentrack.reports WHERE account_id = $1",
            {
                "report_reservations_report_fk",
                "report_step_usage_report_fk",
                "usage_ledger_report_fk",
            },
        ),
        (
            "DELETE FROM tokentrack.usage_periods WHERE account_id = $1",
            {
                "usage_ledger_period_fk",
                "report_reservations_period_fk",
                "report_step_usage_billed_period_fk",
            },
        ),
    ],
)
async def test_billing_data_is_never_deleted_by_a_cascade(
    conn: asyncpg.Connection, statement: str, constraint: set[str]
) -> None:
    account = await new_account(conn)
    report, _ = await reserve(conn, account)
    await step(conn, report, account, "AN0", 1, 1)
    await call(conn, "finalize_report_usage", report, account)
    before = await counts(conn)
    # The foreign keys are ON DELETE RESTRICT: PostgreSQL 18 reports their violation as 23001
    # restrict_violation, older majors as 23503 foreign_key_violation (docs/API.md).
    major = int(await conn.fetchval("SHOW server_version_num")) // 10000
    refused = asyncpg.RestrictViolationError if major >= 18 else asyncpg.ForeignKeyViolationError
    with pytest.raises(refused) as caught:
        await conn.execute(statement, account)
    assert caught.value.constraint_name in constraint
    assert await counts(conn) == before


@pytest.mark.parametrize(
    ("statement", "constraint"),
    [
        (
            "UPDATE tokentrack.reports SET mode = 'weekly' WHERE account_id = $1",
            "reports_mode_valid",
        ),
        (
            "UPDATE tokentrack.reports SET status = 'done' WHERE account_id = $1",
            "reports_status_valid",
        ),
        (
            "UPDATE tokentrack.report_reservations SET status = 'lost', finalized_at = now(),"
            " billed_tokens = 0 WHERE account_id = $1",
            "report_reservations_status_valid",
        ),
        (
            "UPDATE tokentrack.usage_periods SET tokens_used = -1 WHERE account_id = $1",
            "usage_periods_used_non_negative",
        ),
        (
            "UPDATE tokentrack.report_step_usage SET total_tokens = 0 WHERE account_id = $1",
            "report_step_usage_total_covers_parts",
        ),
    ],
)
async def test_named_constraints_say_what_broke(
    conn: asyncpg.Connection, statement: str, constraint: str
) -> None:
    account = await new_account(conn)
    report, _ = await reserve(conn, account)
    await step(conn, report, account, "AN0", 1, 1)
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await conn.execute(statement, account)
    assert caught.value.constraint_name == constraint


async def test_every_table_has_row_level_security_and_a_comment(conn: asyncpg.Connection) -> None:
    rows = await conn.fetch(
        "SELECT c.relname, c.relrowsecurity, obj_description(c.oid, 'pg_class') AS comment"
        " FROM pg_class c WHERE c.relnamespace = 'tokentrack'::regnamespace AND c.relkind = 'r'"
    )
    # The migrator's bookkeeping and the price list (one per installation, a Citus reference
    # table) hold no account data: a comment, but no row level security.
    bookkeeping = {"schema_migrations", "schema_functions"}
    no_account_data = bookkeeping | {"model_prices"}
    budgets = {"budgets", "budget_changes", "budget_windows"}  # version 20261210000000
    credits = {"credit_grants", "usage_adjustments", "report_refunds"}  # version 20261211000000
    notifications = {"notifications"}  # version 20261212000000
    # version 20261214000000: the incremental reconcile's verified point
    point = {"reconcile_point", "reconcile_periods", "reconcile_windows"}
    assert {r["relname"] for r in rows} == (
        set(TABLES) | no_account_data | budgets | credits | notifications | point
    )
    for r in rows:
        assert r["comment"], r["relname"]
        if r["relname"] not in no_account_data:
            assert r["relrowsecurity"], r["relname"]
    for table in TABLES:
        assert (
            "account_id"
            in {
                a["attname"]
                for a in await conn.fetch(
                    "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0",
                    f"tokentrack.{table}",
                )
            }
            or table == "accounts"
        )


async def test_functions_are_hardened_and_only_the_service_role_may_execute(
    conn: asyncpg.Connection,
) -> None:
    rows = await conn.fetch(
        "SELECT p.proname || '(' || oidvectortypes(p.proargtypes) || ')' AS sig,"
        " p.prosecdef, p.proconfig, p.prokind,"
        " has_function_privilege('public', p.oid, 'EXECUTE') AS public_exec,"
        " has_function_privilege('tokentrack_service', p.oid, 'EXECUTE') AS service_exec,"
        " has_function_privilege('tokentrack_reader', p.oid, 'EXECUTE') AS reader_exec,"
        " obj_description(p.oid, 'pg_proc') AS comment"
        " FROM pg_proc p WHERE p.pronamespace = 'tokentrack'::regnamespace"
    )
    normalised = {r["sig"].replace(", ", ","): r for r in rows}
    assert set(normalised) >= PUBLIC_API
    for sig, r in normalised.items():
        assert r["comment"], sig
        if r["prosecdef"]:
            # reconcile_recent also plans each call with its arguments (see its header).
            custom = (
                ["plan_cache_mode=force_custom_plan"] if sig.startswith("reconcile_recent(") else []
            )
            assert r["proconfig"] == ["search_path=pg_catalog, pg_temp", *custom], sig
        else:
            assert sig.startswith(INVOKER_RIGHTS), f"{sig} runs with the caller's rights"
        assert not r["reader_exec"] or sig.startswith("current_account_id"), sig
        if sig in PUBLIC_API:
            assert not r["public_exec"], sig
            assert r["service_exec"], sig
        elif not sig.startswith("current_account_id"):
            assert not r["service_exec"], f"internal {sig} must not be executable"
