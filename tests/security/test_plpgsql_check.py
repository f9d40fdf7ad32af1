"""plpgsql_check over every PL/pgSQL routine: no errors, no warnings (all warning classes).

``make lint`` runs the same check on a throwaway server (tests/support/plpgsql_lint.py). Here it
runs inside the test session too, and is shown to catch an injected fault. Without the extension
(Debian's postgresql-15-plpgsql-check) the tests skip, saying so, except under CI=true,
where they fail: CI installs the package.
"""

from __future__ import annotations

import os

import asyncpg
import pytest

from plpgsql_lint import PACKAGE, check_functions, extension_available

pytestmark = pytest.mark.requires_extension("plpgsql_check")

# Every PL/pgSQL routine of every version: the API, the helpers, the triggers, the sweep and
# the monitoring figures.
EXPECTED = {
    "tokentrack.accounts_keep_billing_rows()",  # version 20261214000000
    # PL/pgSQL since version 20261214000000 (they were LANGUAGE sql)
    "tokentrack.lock_report_reservation(uuid,uuid)",
    "tokentrack.model_price_at(text,timestamp with time zone)",
    "tokentrack.step_cost_micros(tokentrack.model_prices,integer,integer,integer,integer,integer)",
    "tokentrack.increment_usage(uuid,integer,boolean,boolean)",
    "tokentrack.lock_active_period(uuid)",
    "tokentrack.open_usage_period(uuid,bigint,timestamp with time zone)",
    "tokentrack.usage_ledger_is_append_only()",
    "tokentrack.try_reserve_tokens(uuid,uuid,integer)",
    "tokentrack.persist_step_usage(uuid,uuid,text,integer,integer,integer,text)",
    "tokentrack.finalize_report_usage(uuid,uuid)",
    "tokentrack.finish_report(uuid,uuid,text,text)",
    "tokentrack.finalize_reservation(uuid,text)",
    "tokentrack.expire_reservations(integer)",
    "tokentrack.cleanup_expired_reservations()",
    "tokentrack.sweep_expired_reservations(integer)",
    "tokentrack.reconcile(uuid)",
    "tokentrack.require_read_committed(text)",
    "tokentrack.health(integer)",
    "tokentrack.report_step_usage_billed_is_immutable()",
    "tokentrack.record_step(uuid,uuid,text,jsonb,text)",
    "tokentrack.record_step_usage(uuid,uuid,text,integer,integer,integer,integer,integer,bigint,text)",
    "tokentrack.check_step_arguments(text,uuid,uuid,text)",
    "tokentrack.set_model_price(text,jsonb,timestamp with time zone)",
    "tokentrack.model_prices_are_immutable()",
    "tokentrack.set_budget(uuid,text,text,text,bigint,jsonb)",
    "tokentrack.budget_held(uuid,uuid,text,timestamp with time zone)",
    # Version 20261213000000 (metrics)
    "tokentrack.count_refusal(text,jsonb)",
    "tokentrack.metrics(integer,integer,integer)",
    "tokentrack.billing_totals(bigint,bigint)",
    # Version 20261214000000 (write_path): the incremental reconcile
    "tokentrack.reconcile_recent(uuid)",
    "tokentrack.advance_reconcile_point()",
    "tokentrack.reserve(uuid,uuid,jsonb,text[],text)",
    "tokentrack.reserve_usage(uuid,uuid,integer,bigint,text[],text)",
    "tokentrack.check_estimate(jsonb,text)",
    "tokentrack.extend_reservation(uuid,uuid,jsonb)",
    "tokentrack.budget_changes_are_append_only()",
    "tokentrack.budget_hold(uuid,timestamp with time zone)",
    "tokentrack.lock_reservation_budgets(uuid,jsonb)",
    "tokentrack.budget_window_start(text,text,timestamp with time zone,timestamp with time zone)",
    "tokentrack.bill_budget_windows(uuid,jsonb,bigint,bigint)",
    "tokentrack.lock_budgets(uuid,uuid[])",
    "tokentrack.budget_limit(uuid,uuid,timestamp with time zone)",
    "tokentrack.check_correction_text(text,text,integer)",
    "tokentrack.grant_credits(uuid,uuid,bigint,timestamp with time zone,text,text)",
    "tokentrack.adjust_usage(uuid,uuid,bigint,text,text)",
    "tokentrack.refund_report(uuid,uuid,text,text)",
    "tokentrack.refund_answer(tokentrack.report_refunds,boolean)",
    "tokentrack.credit_records_are_append_only()",
    # version 20261212000000 (notifications)
    "tokentrack.bill_budget_windows(uuid,jsonb,bigint,bigint,bigint,bigint)",
    "tokentrack.note_crossings(uuid,uuid,timestamp with time zone,bigint,bigint)",
    "tokentrack.claim_notifications(text,integer,interval)",
    "tokentrack.ack_notification(bigint,text)",
}


@pytest.fixture
async def checker(conn: asyncpg.Connection) -> asyncpg.Connection:
    if not await extension_available(conn):
        message = f"the plpgsql_check extension is not installed (Debian: {PACKAGE})"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"{message}; CI must run this check (.ci/run installs it)")
        pytest.skip(f"{message}; `make lint` skips it too, CI installs it")
    return conn


async def test_every_plpgsql_routine_passes_plpgsql_check(checker: asyncpg.Connection) -> None:
    checked, findings = await check_functions(checker)
    assert set(checked) == EXPECTED
    assert [str(f) for f in findings] == []


async def test_the_check_catches_a_faulty_routine(checker: asyncpg.Connection) -> None:
    await checker.execute(
        "CREATE FUNCTION tokentrack.faulty(p integer) RETURNS bigint LANGUAGE plpgsql"
        " SET search_path = pg_catalog, pg_temp AS $$"
        " DECLARE v integer; unused text;"
        " BEGIN SELECT r.nope INTO v FROM tokentrack.reports AS r; RETURN v; END $$"
    )
    _, findings = await check_functions(checker)
    faulty = [f for f in findings if f.routine.startswith("tokentrack.faulty(")]
    assert {f.level for f in faulty} >= {"error"}, [str(f) for f in faulty]
    assert any("nope" in f.message for f in faulty), [str(f) for f in faulty]
