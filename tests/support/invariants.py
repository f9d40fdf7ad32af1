"""The six guarantees of docs/API.md, checked against a database: ``check_invariants``.

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
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import asyncpg

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


async def install_grant_probe(conn: asyncpg.Connection) -> None:
    """Record, inside every granting transaction, what the account held (invariant 3)."""
    await conn.execute(PROBE_SQL)


async def has_grant_probe(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass('tokentrack_probe.grants') IS NOT NULL"))


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

# Since version 20261212000000 (applied when tokentrack.notifications exists).
NOTIFICATION_CHECKS: list[tuple[int, str, str]] = [
    (
        9,
        "notification whose recorded used + held did not reach its threshold of the limit",
        """
        SELECT n.id, n.budget_id, n.window_start, n.threshold, n.used, n.limit_amount
        FROM tokentrack.notifications AS n
        WHERE n.limit_amount = 0
            OR n.used::numeric * 100 < n.limit_amount::numeric * n.threshold
        """,
    ),
    (
        9,
        "notification of a window no reservation or adjustment ever opened",
        """
        SELECT n.id, n.budget_id, n.window_start
        FROM tokentrack.notifications AS n
        LEFT JOIN tokentrack.budget_windows AS w
            ON w.account_id = n.account_id AND w.budget_id = n.budget_id
            AND w.window_start = n.window_start
        WHERE w.budget_id IS NULL
        """,
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
    v1_before: Mapping[str, list[str]] | None = None,
) -> list[str]:
    """Violations of the six invariants (and, where its table exists, of invariant 9's
    recorded notifications) in the whole database (empty list: all hold).

    ``settled``: every report was finalized or expired and then swept (invariant 2 in full).
    ``swept``: the sweep ran after the last expiry was moved (invariant 4).
    ``grants``: answers of granted reservations, checked against the probe (invariant 3).
    ``v1_before``: ``v1_state()`` from before a version change (invariant 6).
    """
    checks = list(CHECKS)
    if settled:
        checks += SETTLED_CHECKS
    if swept:
        checks += SWEPT_CHECKS
    if await conn.fetchval("SELECT to_regclass('tokentrack.notifications') IS NOT NULL"):
        checks += NOTIFICATION_CHECKS
    probe = await has_grant_probe(conn)
    if probe:
        checks += PROBE_CHECKS
    violations: list[str] = []
    for number, meaning, query in checks:
        rows = await conn.fetch(query)
        if rows:
            violations.append(f"invariant {number}: {meaning}: {len(rows)} row(s): {_rows(rows)}")

    if grants:
        violations += await _check_grant_answers(conn, grants, probe)

    # 6. Existing data intact: every period explained by the append-only ledger...
    reconciled = json.loads(await conn.fetchval("SELECT tokentrack.reconcile(NULL)"))
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
