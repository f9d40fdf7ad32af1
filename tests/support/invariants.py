"""The guarantees of docs/API.md (Part 1's six and Part 2's invariant 7), checked against a
database: ``check_invariants``.

Each check is one SQL query that lists offending rows; ``check_invariants`` returns one line
per violation (empty list: all hold). The checks recompute everything from the rows
themselves (steps, reservations, ledger, periods) instead of trusting ``reconcile()``, which
is checked too, as one more witness.

Invariant 3 (no overcommit) is a property of the moment a reservation is granted, which no
later state shows. ``install_grant_probe`` adds, to a test database only, a trigger on
``report_reservations`` that runs inside the granting transaction: it locks the period row
(FOR NO KEY UPDATE: already held, as FOR UPDATE, by a correct ``try_reserve_tokens``, so
it changes nothing there, and it does not conflict with the foreign-key checks; a
``try_reserve_tokens`` that forgot the lock gets serialised here instead, and the probe then
sees the grants that raced it) and records ``tokens_used``, ``tokens_limit`` and what the
account's active unexpired reservations hold, this one included. ``check_invariants`` then
asserts ``tokens_used + held <= tokens_limit`` for every grant, and, given the grant answers,
that no answer's ``available_tokens`` exceeds ``limit - used - held`` (the oracle of
tests/support/model.py checks the exact arithmetic).

Invariant 7 (no overcommit of any budget) is the same kind of property, per budget window:
where budgets exist, ``install_grant_probe`` adds a second trigger (after the first) that
runs when a reservation holding budget windows is inserted (reserve) or raised
(extend_reservation): it locks the budgets it holds (FOR NO KEY UPDATE, in id order: already
held by a correct function) and records, for every window it holds, the budget's limit, the
window's used and what the active unexpired reservations holding that window hold, this one
included (read from the holds column as timestamps, not through the functions' own helpers).
``check_invariants`` asserts ``used + held <= limit`` for every row, that every held window
was probed, and that no answer's "budgets" entry promised more than the probe saw. Extensions
are probed for the account's active period as well (which they are checked against).
Invariant 7's second half, every window's used equals the billed tokens (tokens budgets) or
cost (cost budgets) of the steps of the reports whose reservations hold it, is computed here
in Python from the rows, and reconcile()'s own "budget_used" check must agree.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from model import parse_time, window_start

BILLING_KINDS = ("report_billed", "report_expired", "late_step")

PROBE_SQL = """
CREATE SCHEMA IF NOT EXISTS tokentrack_probe;
CREATE TABLE IF NOT EXISTS tokentrack_probe.grants (
    reservation_id uuid PRIMARY KEY,
    account_id uuid NOT NULL,
    period_id uuid NOT NULL,
    reserved_tokens bigint NOT NULL,
    tokens_limit bigint NOT NULL,
    tokens_used bigint NOT NULL,
    held bigint NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE OR REPLACE FUNCTION tokentrack_probe.record_grant() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $probe$
DECLARE
    v_period tokentrack.usage_periods%ROWTYPE;
    v_held bigint;
BEGIN
    SELECT p.* INTO v_period FROM tokentrack.usage_periods AS p
    WHERE p.id = NEW.period_id FOR NO KEY UPDATE;
    SELECT COALESCE(sum(rr.reserved_tokens), 0) INTO v_held
    FROM tokentrack.report_reservations AS rr
    WHERE rr.account_id = NEW.account_id AND rr.status = 'active' AND rr.expires_at > now();
    INSERT INTO tokentrack_probe.grants
        (reservation_id, account_id, period_id, reserved_tokens, tokens_limit, tokens_used, held)
    VALUES (NEW.id, NEW.account_id, NEW.period_id, NEW.reserved_tokens,
            v_period.tokens_limit, v_period.tokens_used, v_held);
    RETURN NULL;
END
$probe$;
DROP TRIGGER IF EXISTS zz_probe_grant ON tokentrack.report_reservations;
CREATE TRIGGER zz_probe_grant AFTER INSERT ON tokentrack.report_reservations
FOR EACH ROW EXECUTE FUNCTION tokentrack_probe.record_grant();
"""


# Invariant 7's probe (installed where the budgets exist): every granted or raised hold.
HOLD_PROBE_SQL = """
CREATE TABLE IF NOT EXISTS tokentrack_probe.holds (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    reservation_id uuid NOT NULL,
    kind text NOT NULL,
    reserved_tokens bigint NOT NULL,
    budget_id uuid NOT NULL,
    window_start timestamptz NOT NULL,
    unit text NOT NULL,
    limit_amount bigint NOT NULL,
    used bigint NOT NULL,
    held bigint NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS tokentrack_probe.extensions (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    reservation_id uuid NOT NULL,
    reserved_tokens bigint NOT NULL,
    period_id uuid NOT NULL,
    tokens_limit bigint NOT NULL,
    tokens_used bigint NOT NULL,
    held bigint NOT NULL
);
CREATE OR REPLACE FUNCTION tokentrack_probe.record_hold() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $probe$
DECLARE
    -- Read as JSON: no dependency on the budgets version's columns (its rollback drops them).
    v_new jsonb := to_jsonb(NEW);
    v_holds jsonb := to_jsonb(NEW) -> 'holds';
    v_kind text := CASE WHEN TG_OP = 'INSERT' THEN 'reserve' ELSE 'extend' END;
    v_budget record;
    v_period tokentrack.usage_periods%ROWTYPE;
    v_held bigint;
BEGIN
    IF NOT v_new ? 'holds' THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        IF NEW.reserved_tokens = OLD.reserved_tokens
           AND (v_new -> 'reserved_cost_micros') = (to_jsonb(OLD) -> 'reserved_cost_micros') THEN
            RETURN NULL;  -- not an extension (billing, expiry)
        END IF;
        -- The account's active period, which an extension is checked against.
        SELECT p.* INTO v_period FROM tokentrack.usage_periods AS p
        WHERE p.account_id = NEW.account_id AND p.status = 'active' FOR NO KEY UPDATE;
        SELECT COALESCE(sum(rr.reserved_tokens), 0) INTO v_held
        FROM tokentrack.report_reservations AS rr
        WHERE rr.account_id = NEW.account_id AND rr.status = 'active' AND rr.expires_at > now();
        INSERT INTO tokentrack_probe.extensions
            (reservation_id, reserved_tokens, period_id, tokens_limit, tokens_used, held)
        VALUES (NEW.id, NEW.reserved_tokens, v_period.id, v_period.tokens_limit,
                v_period.tokens_used, v_held);
    END IF;
    IF jsonb_typeof(v_holds) IS DISTINCT FROM 'array' THEN
        RETURN NULL;
    END IF;
    PERFORM FROM tokentrack.budgets AS b
    WHERE b.account_id = NEW.account_id
      AND b.id IN (SELECT h.budget_id FROM jsonb_to_recordset(v_holds) AS h (budget_id uuid))
    ORDER BY b.id FOR NO KEY UPDATE;
    FOR v_budget IN
        SELECT b.id, b.unit, b.limit_amount, h.window_start
        FROM jsonb_to_recordset(v_holds) AS h (budget_id uuid, window_start timestamptz)
        JOIN tokentrack.budgets AS b ON b.account_id = NEW.account_id AND b.id = h.budget_id
        ORDER BY b.id
    LOOP
        INSERT INTO tokentrack_probe.holds (reservation_id, kind, reserved_tokens, budget_id,
            window_start, unit, limit_amount, used, held)
        SELECT NEW.id, v_kind, NEW.reserved_tokens, v_budget.id, v_budget.window_start,
            v_budget.unit, v_budget.limit_amount,
            COALESCE((SELECT w.used FROM tokentrack.budget_windows AS w
                      WHERE w.account_id = NEW.account_id AND w.budget_id = v_budget.id
                        AND w.window_start = v_budget.window_start), 0),
            COALESCE((SELECT sum(CASE WHEN v_budget.unit = 'tokens' THEN rr.reserved_tokens
                                      ELSE COALESCE(rr.reserved_cost_micros, 0) END)
                      FROM tokentrack.report_reservations AS rr
                      WHERE rr.account_id = NEW.account_id AND rr.status = 'active'
                        AND rr.expires_at > now()
                        AND EXISTS (SELECT FROM jsonb_to_recordset(rr.holds)
                                        AS x (budget_id uuid, window_start timestamptz)
                                    WHERE x.budget_id = v_budget.id
                                      AND x.window_start = v_budget.window_start)), 0);
    END LOOP;
    RETURN NULL;
END
$probe$;
DROP TRIGGER IF EXISTS zz_probe_hold ON tokentrack.report_reservations;
CREATE TRIGGER zz_probe_hold AFTER INSERT ON tokentrack.report_reservations
FOR EACH ROW EXECUTE FUNCTION tokentrack_probe.record_hold();
DROP TRIGGER IF EXISTS zz_probe_raise ON tokentrack.report_reservations;
CREATE TRIGGER zz_probe_raise AFTER UPDATE ON tokentrack.report_reservations
FOR EACH ROW EXECUTE FUNCTION tokentrack_probe.record_hold();
"""


async def has_budgets(conn: asyncpg.Connection) -> bool:
    """The database has the budgets version (20261210000000)."""
    return bool(await conn.fetchval("SELECT to_regclass('tokentrack.budgets') IS NOT NULL"))


async def install_grant_probe(conn: asyncpg.Connection) -> None:
    """Record, inside every granting transaction, what the account held (invariant 3) and,
    where budgets exist, what every budget window it holds had (invariant 7)."""
    await conn.execute(PROBE_SQL)
    if await has_budgets(conn):
        await conn.execute(HOLD_PROBE_SQL)


async def has_grant_probe(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass('tokentrack_probe.grants') IS NOT NULL"))


async def has_hold_probe(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass('tokentrack_probe.holds') IS NOT NULL"))


# Each entry: invariant number, what a returned row means, the query listing offending rows.
CHECKS: list[tuple[int, str, str]] = [
    # 1. No double billing.
    (
        1,
        "step billed by a ledger row that does not bill it (wrong kind, period or report)",
        f"""
        SELECT s.id, s.report_id, s.step_name, s.billing_entry_id
        FROM tokentrack.report_step_usage AS s
        LEFT JOIN tokentrack.usage_ledger AS l ON l.id = s.billing_entry_id
        WHERE s.billed_at IS NOT NULL AND (
            l.id IS NULL OR l.kind NOT IN {BILLING_KINDS!r}
            OR l.period_id <> s.billed_period_id OR l.report_id IS DISTINCT FROM s.report_id
            OR (s.late AND l.kind <> 'late_step') OR (NOT s.late AND l.kind = 'late_step'))
        """,
    ),
    (
        1,
        "report settled by more than one ledger row",
        """
        SELECT report_id, count(*) AS settlements FROM tokentrack.usage_ledger
        WHERE kind IN ('report_billed', 'report_expired')
        GROUP BY report_id HAVING count(*) > 1
        """,
    ),
    (
        1,
        "late_step ledger row that does not bill exactly one step",
        """
        SELECT l.id, count(s.id) AS steps
        FROM tokentrack.usage_ledger AS l
        LEFT JOIN tokentrack.report_step_usage AS s ON s.billing_entry_id = l.id
        WHERE l.kind = 'late_step'
        GROUP BY l.id HAVING count(s.id) <> 1
        """,
    ),
    (
        1,
        "billing ledger row whose tokens differ from the steps it billed",
        f"""
        SELECT l.id, l.kind, l.tokens, COALESCE(sum(s.total_tokens), 0) AS steps_total
        FROM tokentrack.usage_ledger AS l
        LEFT JOIN tokentrack.report_step_usage AS s ON s.billing_entry_id = l.id
        WHERE l.kind IN {BILLING_KINDS!r}
        GROUP BY l.id, l.kind, l.tokens
        HAVING l.tokens <> COALESCE(sum(s.total_tokens), 0)
        """,
    ),
    (
        1,
        "finished reservation whose billed_tokens, status or period disagree with its ledger row",
        """
        SELECT rr.id, rr.report_id, rr.status, rr.billed_tokens, l.kind, l.tokens, l.period_id
        FROM tokentrack.report_reservations AS rr
        LEFT JOIN tokentrack.usage_ledger AS l
          ON l.report_id = rr.report_id AND l.kind IN ('report_billed', 'report_expired')
        WHERE (rr.status = 'active') <> (l.id IS NULL)
           OR (rr.status <> 'active' AND (
                l.tokens <> rr.billed_tokens OR l.period_id <> rr.period_id
                OR l.kind <> CASE rr.status WHEN 'completed' THEN 'report_billed'
                                            ELSE 'report_expired' END))
        """,
    ),
    (
        1,
        "step billed into another period than its reservation's",
        """
        SELECT s.id, s.billed_period_id, rr.period_id
        FROM tokentrack.report_step_usage AS s
        JOIN tokentrack.report_reservations AS rr ON rr.report_id = s.report_id
        WHERE s.billed_period_id IS NOT NULL AND s.billed_period_id <> rr.period_id
        """,
    ),
    (
        1,
        "billed report whose token_usage.totalTokens differs from its billed steps",
        """
        WITH billed AS (
            SELECT report_id, sum(total_tokens) AS tokens FROM tokentrack.report_step_usage
            WHERE billed_at IS NOT NULL GROUP BY report_id
        )
        SELECT r.id, r.token_usage ->> 'totalTokens' AS total, COALESCE(b.tokens, 0) AS billed
        FROM tokentrack.reports AS r
        JOIN tokentrack.report_reservations AS rr ON rr.report_id = r.id
        LEFT JOIN billed AS b ON b.report_id = r.id
        WHERE rr.status <> 'active'
          AND (r.token_usage ->> 'totalTokens')::bigint IS DISTINCT FROM COALESCE(b.tokens, 0)
        """,
    ),
    # 2. No lost billing.
    (
        2,
        "unbilled step of a report whose reservation is no longer active",
        """
        SELECT s.id, s.report_id, s.step_name, rr.status
        FROM tokentrack.report_step_usage AS s
        JOIN tokentrack.report_reservations AS rr ON rr.report_id = s.report_id
        WHERE s.billed_at IS NULL AND rr.status <> 'active'
        """,
    ),
    (
        2,
        "period whose tokens_used is not its billed steps plus its increments",
        """
        WITH billed AS (
            SELECT billed_period_id AS id, sum(total_tokens) AS tokens
            FROM tokentrack.report_step_usage WHERE billed_period_id IS NOT NULL
            GROUP BY billed_period_id
        ), added AS (
            SELECT period_id AS id, sum(tokens) AS tokens FROM tokentrack.usage_ledger
            WHERE kind IN ('increment', 'adjustment') GROUP BY period_id
        )
        SELECT p.id, p.tokens_used, b.tokens AS steps_total, i.tokens AS increments
        FROM tokentrack.usage_periods AS p
        LEFT JOIN billed AS b ON b.id = p.id
        LEFT JOIN added AS i ON i.id = p.id
        WHERE p.tokens_used <> COALESCE(b.tokens, 0) + COALESCE(i.tokens, 0)
        """,
    ),
    (
        2,
        "period whose reports_count is not its complete billed reports plus its increments",
        """
        WITH complete AS (
            SELECT rr.period_id AS id, count(*) AS reports
            FROM tokentrack.report_reservations AS rr
            JOIN tokentrack.reports AS r ON r.id = rr.report_id
            WHERE rr.status <> 'active' AND r.status = 'complete'
            GROUP BY rr.period_id
        ), added AS (
            SELECT period_id AS id, sum(reports) AS reports FROM tokentrack.usage_ledger
            WHERE kind IN ('increment', 'adjustment') GROUP BY period_id
        )
        SELECT p.id, p.reports_count, c.reports AS complete, i.reports AS increments
        FROM tokentrack.usage_periods AS p
        LEFT JOIN complete AS c ON c.id = p.id
        LEFT JOIN added AS i ON i.id = p.id
        WHERE p.reports_count <> COALESCE(c.reports, 0) + COALESCE(i.reports, 0)
        """,
    ),
    # 5. No orphans.
    (
        5,
        "step whose report, account or reservation is missing or belongs to another account",
        """
        SELECT s.id, s.report_id, s.account_id
        FROM tokentrack.report_step_usage AS s
        LEFT JOIN tokentrack.reports AS r ON r.id = s.report_id
        LEFT JOIN tokentrack.accounts AS a ON a.id = s.account_id
        LEFT JOIN tokentrack.report_reservations AS rr ON rr.report_id = s.report_id
        WHERE r.id IS NULL OR a.id IS NULL OR rr.id IS NULL
           OR r.account_id <> s.account_id OR rr.account_id <> s.account_id
        """,
    ),
    (
        5,
        "reservation whose report, account or period is missing or belongs to another account",
        """
        SELECT rr.id, rr.report_id, rr.account_id
        FROM tokentrack.report_reservations AS rr
        LEFT JOIN tokentrack.reports AS r ON r.id = rr.report_id
        LEFT JOIN tokentrack.accounts AS a ON a.id = rr.account_id
        LEFT JOIN tokentrack.usage_periods AS p ON p.id = rr.period_id
        WHERE r.id IS NULL OR a.id IS NULL OR p.id IS NULL
           OR r.account_id <> rr.account_id OR p.account_id <> rr.account_id
        """,
    ),
    (
        5,
        "ledger row whose period or report belongs to another account",
        """
        SELECT l.id, l.account_id, p.account_id AS period_account, r.account_id AS report_account
        FROM tokentrack.usage_ledger AS l
        LEFT JOIN tokentrack.usage_periods AS p ON p.id = l.period_id
        LEFT JOIN tokentrack.reports AS r ON r.id = l.report_id
        WHERE p.id IS NULL OR p.account_id <> l.account_id
           OR (l.report_id IS NOT NULL AND (r.id IS NULL OR r.account_id <> l.account_id))
        """,
    ),
    (
        5,
        "account with more than one active period",
        """
        SELECT account_id, count(*) FROM tokentrack.usage_periods WHERE status = 'active'
        GROUP BY account_id HAVING count(*) > 1
        """,
    ),
]

SETTLED_CHECKS: list[tuple[int, str, str]] = [
    (
        2,
        "reservation still active after every report was finalized or expired and swept",
        "SELECT id, report_id, expires_at FROM tokentrack.report_reservations"
        " WHERE status = 'active'",
    ),
    (
        2,
        "step still unbilled after every report was finalized or expired and swept",
        "SELECT id, report_id, step_name FROM tokentrack.report_step_usage WHERE billed_at IS NULL",
    ),
]

SWEPT_CHECKS: list[tuple[int, str, str]] = [
    (
        4,
        "reservation active past its expires_at after the sweep ran",
        "SELECT id, report_id, expires_at FROM tokentrack.report_reservations"
        " WHERE status = 'active' AND expires_at <= now()",
    ),
]

PROBE_CHECKS: list[tuple[int, str, str]] = [
    (
        3,
        "grant that took tokens_used plus active reservations above tokens_limit",
        "SELECT reservation_id, tokens_limit, tokens_used, held FROM tokentrack_probe.grants"
        " WHERE tokens_used + held > tokens_limit",
    ),
    (
        3,
        "reservation granted without passing the probe",
        "SELECT rr.id FROM tokentrack.report_reservations AS rr"
        " LEFT JOIN tokentrack_probe.grants AS g ON g.reservation_id = rr.id"
        " WHERE g.reservation_id IS NULL",
    ),
]

# Invariant 7, where the budgets exist (the Python half is _check_budget_windows).
BUDGET_PROBE_CHECKS: list[tuple[int, str, str]] = [
    (
        7,
        "grant or extension that took a budget window's used plus active holds above its limit",
        "SELECT reservation_id, kind, budget_id, window_start, limit_amount, used, held"
        " FROM tokentrack_probe.holds WHERE used + held > limit_amount",
    ),
    (
        7,
        "budget window held by a reservation whose grant did not pass the probe",
        "SELECT rr.id, h.budget_id, h.window_start FROM tokentrack.report_reservations AS rr"
        " CROSS JOIN LATERAL jsonb_to_recordset(rr.holds)"
        "   AS h (budget_id uuid, window_start timestamptz)"
        " WHERE rr.holds IS NOT NULL AND NOT EXISTS (SELECT FROM tokentrack_probe.holds AS p"
        "   WHERE p.reservation_id = rr.id AND p.kind = 'reserve'"
        "   AND p.budget_id = h.budget_id AND p.window_start = h.window_start)",
    ),
    (
        3,
        "extension that took the active period's tokens_used plus active reservations above its"
        " limit",
        "SELECT reservation_id, reserved_tokens, tokens_limit, tokens_used, held"
        " FROM tokentrack_probe.extensions WHERE tokens_used + held > tokens_limit",
    ),
]

V1_STATE = {
    "usage_periods": "SELECT t::text FROM tokentrack.usage_periods AS t ORDER BY id",
    "reports": "SELECT t::text FROM tokentrack.reports AS t ORDER BY id",
    "usage_ledger": (
        "SELECT (id, account_id, period_id, kind, tokens, reports, report_id, is_chat)::text"
        " FROM tokentrack.usage_ledger ORDER BY id"
    ),
    "increment_usage": (
        "SELECT pg_get_functiondef('tokentrack.increment_usage(uuid,integer,boolean,boolean)'"
        "::regprocedure)"
    ),
}


async def v1_state(conn: asyncpg.Connection) -> dict[str, list[str]]:
    """Version 1's data and increment_usage, as text (invariant 6 compares two of these)."""
    return {name: [r[0] for r in await conn.fetch(query)] for name, query in V1_STATE.items()}


def _rows(rows: Iterable[asyncpg.Record], limit: int = 5) -> str:
    shown = [dict(r) for r in list(rows)[:limit]]
    return ", ".join(str({k: str(v) for k, v in row.items()}) for row in shown)


async def check_invariants(
    conn: asyncpg.Connection,
    *,
    settled: bool = False,
    swept: bool = False,
    grants: Sequence[Mapping[str, Any]] = (),
    extensions: Sequence[Mapping[str, Any]] = (),
    v1_before: Mapping[str, list[str]] | None = None,
) -> list[str]:
    """Violations of the six invariants in the whole database (empty list: all hold).

    ``settled``: every report was finalized or expired and then swept (invariant 2 in full).
    ``swept``: the sweep ran after the last expiry was moved (invariant 4).
    ``grants``: answers of granted reservations, checked against the probe (invariants 3, 7).
    ``extensions``: answers of granted extensions, checked against the probe (3, 7).
    ``v1_before``: ``v1_state()`` from before a version change (invariant 6).
    """
    checks = list(CHECKS)
    if settled:
        checks += SETTLED_CHECKS
    if swept:
        checks += SWEPT_CHECKS
    probe = await has_grant_probe(conn)
    if probe:
        checks += PROBE_CHECKS
    budgets = await has_budgets(conn)
    hold_probe = budgets and await has_hold_probe(conn)
    if hold_probe:
        checks += BUDGET_PROBE_CHECKS
    violations: list[str] = []
    for number, meaning, query in checks:
        rows = await conn.fetch(query)
        if rows:
            violations.append(f"invariant {number}: {meaning}: {len(rows)} row(s): {_rows(rows)}")

    if grants:
        violations += await _check_grant_answers(conn, grants, probe)
    if hold_probe and (grants or extensions):
        violations += await _check_hold_answers(conn, grants, extensions)

    # One snapshot for reconcile() and the rows the budget windows are recomputed from (the
    # stress checker runs while the workload writes).
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        reconciled = json.loads(await conn.fetchval("SELECT tokentrack.reconcile(NULL)"))
        if budgets:
            violations += await _check_budget_windows(conn, reconciled)
    # 6. Existing data intact: every period explained by the append-only ledger...
    if reconciled.get("ok") is not True:
        violations.append(f"invariant 6: reconcile() is not ok: {reconciled['discrepancies']}")
    # ...and, across a version change, version 1's rows and increment_usage unchanged.
    if v1_before is not None:
        now = await v1_state(conn)
        for name, before in v1_before.items():
            if now.get(name) != before:
                violations.append(f"invariant 6: {name} changed across the version change")
    return violations


async def _check_grant_answers(
    conn: asyncpg.Connection, grants: Sequence[Mapping[str, Any]], probe: bool
) -> list[str]:
    violations = []
    recorded = {}
    if probe:
        rows = await conn.fetch(
            "SELECT reservation_id::text AS id, tokens_limit, tokens_used, held"
            " FROM tokentrack_probe.grants"
        )
        recorded = {r["id"]: r for r in rows}
    for answer in grants:
        available = answer.get("available_tokens")
        if not isinstance(available, int) or available < 0:
            violations.append(f"invariant 3: grant answered available_tokens {available!r}")
        row = recorded.get(str(answer.get("reservation_id")))
        if probe and row is None:
            violations.append(f"invariant 3: granted reservation not in the database: {answer}")
        elif row is not None and available > row["tokens_limit"] - row["tokens_used"] - row["held"]:
            # The probe runs a moment after the function's own sum, under the same period
            # lock: tokens_used cannot change in between and no reservation can join, but
            # one may leave (its expiry moved into the past), so the probe may see less held.
            violations.append(
                "invariant 3: the grant answered more available_tokens than limit - used - "
                f"held at grant time: answer {available}, probe limit {row['tokens_limit']} "
                f"used {row['tokens_used']} held {row['held']}"
            )
    return violations


async def _check_hold_answers(
    conn: asyncpg.Connection,
    grants: Sequence[Mapping[str, Any]],
    extensions: Sequence[Mapping[str, Any]],
) -> list[str]:
    """Invariant 7 for the answers: no "budgets" entry of a grant or an extension promised
    more than limit - used - held in that window when the probe looked (the same argument as
    invariant 3: only a hold that left in between can make the probe see less held)."""
    violations = []
    rows = await conn.fetch(
        "SELECT reservation_id::text AS id, kind, reserved_tokens, budget_id::text AS budget,"
        " window_start, limit_amount, used, held FROM tokentrack_probe.holds"
    )
    probed = {
        (r["id"], r["kind"], r["reserved_tokens"], r["budget"], r["window_start"]): r for r in rows
    }
    periods = {
        (r["id"], r["reserved_tokens"]): r
        for r in await conn.fetch(
            "SELECT reservation_id::text AS id, reserved_tokens, tokens_limit, tokens_used, held"
            " FROM tokentrack_probe.extensions"
        )
    }
    answers = [("reserve", a) for a in grants] + [("extend", a) for a in extensions]
    for kind, answer in answers:
        reservation, reserved = str(answer.get("reservation_id")), answer.get("reserved_tokens")
        if kind == "extend":
            row = periods.get((reservation, reserved))
            available = answer.get("available_tokens")
            if row is None:
                violations.append(f"invariant 3: extension not in the probe: {answer}")
            elif not isinstance(available, int) or not (
                0 <= available <= row["tokens_limit"] - row["tokens_used"] - row["held"]
            ):
                violations.append(
                    f"invariant 3: the extension answered available_tokens {available!r}, the"
                    f" probe saw limit {row['tokens_limit']} used {row['tokens_used']}"
                    f" held {row['held']}"
                )
        for entry in answer.get("budgets") or ():
            start = parse_time(entry.get("window_start"))
            row = probed.get((reservation, kind, reserved, str(entry.get("budget_id")), start))
            available = entry.get("available")
            if not isinstance(available, int) or available < 0:
                violations.append(f"invariant 7: a {kind} answered available {available!r}")
            elif row is None:
                violations.append(
                    f"invariant 7: a {kind}'s budget window not in the probe: {entry}"
                )
            elif available > row["limit_amount"] - row["used"] - row["held"]:
                violations.append(
                    f"invariant 7: a {kind} answered more available than limit - used - held"
                    f" at grant time: answer {entry}, probe limit {row['limit_amount']}"
                    f" used {row['used']} held {row['held']}"
                )
    return violations


async def _check_budget_windows(
    conn: asyncpg.Connection, reconciled: Mapping[str, Any]
) -> list[str]:
    """Invariant 7's second half, recomputed in Python from the rows (one snapshot): every
    budget window's used is the billed tokens (tokens budgets) or cost (cost budgets) of the
    steps of the reports whose reservations hold it, late steps included; every held window has
    its row and every row a holder; each starts where its budget's windows start; and
    reconcile() checked every window."""
    violations: list[str] = []
    budgets = {
        str(r["id"]): r
        for r in await conn.fetch(
            "SELECT account_id, id, unit, budget_window, timezone, created_at"
            " FROM tokentrack.budgets"
        )
    }
    windows: dict[tuple[str, datetime], int] = {
        (str(r["budget_id"]), r["window_start"]): r["used"]
        for r in await conn.fetch(
            "SELECT budget_id, window_start, used FROM tokentrack.budget_windows"
        )
    }
    billed = {
        r["report_id"]: (r["tokens"], r["cost"])
        for r in await conn.fetch(
            "SELECT s.report_id, sum(s.total_tokens)::bigint AS tokens,"
            " sum(COALESCE(s.cost_micros, 0))::bigint AS cost"
            " FROM tokentrack.report_step_usage AS s"
            " JOIN tokentrack.report_reservations AS rr ON rr.report_id = s.report_id"
            " WHERE s.billed_at IS NOT NULL AND rr.holds IS NOT NULL GROUP BY s.report_id"
        )
    }
    expected: dict[tuple[str, datetime], int] = {}
    for row in await conn.fetch(
        "SELECT id, report_id, account_id, holds::text AS holds"
        " FROM tokentrack.report_reservations WHERE holds IS NOT NULL"
    ):
        holds = json.loads(row["holds"])
        tokens, cost = billed.get(row["report_id"], (0, 0))
        ids = []
        for hold in holds:
            budget_id, start = hold.get("budget_id"), parse_time(hold.get("window_start"))
            budget = budgets.get(str(budget_id))
            if budget is None or start is None or budget["account_id"] != row["account_id"]:
                violations.append(
                    f"invariant 7: reservation {row['id']} holds {hold}: not a window of a"
                    " budget of its account"
                )
                continue
            ids.append(budget_id)
            key = (str(budget_id), start)
            if key not in windows:
                violations.append(
                    f"invariant 7: reservation {row['id']} holds {hold}, which has no row"
                )
            amount = tokens if budget["unit"] == "tokens" else cost
            expected[key] = expected.get(key, 0) + amount
        if ids != sorted(set(ids)):
            violations.append(
                f"invariant 7: reservation {row['id']}'s holds are not one per budget in id"
                f" order: {holds}"
            )
    for (budget_id, start), used in sorted(windows.items(), key=str):
        budget = budgets[budget_id]
        if (budget_id, start) not in expected:
            violations.append(
                f"invariant 7: budget window ({budget_id}, {start}) that no reservation holds"
            )
        elif used != expected[(budget_id, start)]:
            violations.append(
                f"invariant 7: budget window ({budget_id}, {start}) used {used}, but the billed"
                f" {budget['unit']} of the reports holding it add up to"
                f" {expected[(budget_id, start)]}"
            )
        if budget["budget_window"] == "total":
            should = budget["created_at"]
        else:
            should = window_start(budget["budget_window"], budget["timezone"], start)
        if start != should:
            violations.append(
                f"invariant 7: budget window ({budget_id}, {start}) does not start where the"
                f" {budget['budget_window']} windows of {budget['timezone']} start ({should})"
            )
    checked = reconciled.get("budget_windows_checked")
    if checked != len(windows):
        violations.append(
            f"invariant 7: reconcile() checked {checked} budget windows of {len(windows)}"
        )
    return violations
