"""Plans, not timings: the hot paths and the monitoring queries read large tables by index.

A database with a realistic history (30,000 billed reports over a year, each with its
reservation, a step and its ledger row; 1,000 accounts with a live report each; 300 reservations
past their expiry that the sweep has not reached yet) is built once for the module and
ANALYZEd, with the planner's default settings (``enable_seqscan`` stays on).

The functions are then called through each of their paths, each in a transaction that is
rolled back, with ``auto_explain`` (``log_nested_statements``) sending the plan of every
statement they run, foreign-key checks included, back to the test: the plans that the
functions really use, custom (the first calls of a session) and generic (``plan_cache_mode =
force_generic_plan``, what PL/pgSQL settles on for statements it runs often). No plan may read
a whole large table: no sequential scan, and no index scan that leaves the index's leading
column unbounded (a walk of the whole index), unless the index is partial (its predicate
bounds it, as for the active reservations).

The monitoring figures, tokentrack.health() (what tokentrack monitor reads), are checked the
same way (tests/ops/test_monitor.py checks their values). reconcile(one account) reads the
account's periods by index; reconcile() of everything is an audit and reads all.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from tokentrack_client.testing import PostgresServer, run_in_thread
from tokentrack_client.testing.pytest_plugin import TemplateDatabase

HISTORY = 30_000
ACCOUNTS = 1_000
DUE = 300
TABLES = {
    "accounts",
    "usage_periods",
    "reports",
    "usage_ledger",
    "report_reservations",
    "report_step_usage",
}


SEED_SQL = f"""
INSERT INTO tokentrack.accounts (id)
SELECT ('00000000-0000-0000-0000-' || lpad(a::text, 12, '0'))::uuid
FROM generate_series(1, {ACCOUNTS}) AS a;

INSERT INTO tokentrack.usage_periods (account_id, tokens_limit, period_start)
SELECT id, 1000000000000, now() - interval '400 days' FROM tokentrack.accounts;

-- History: one report every 365 days / {HISTORY}, billed: reservation, one step, ledger row.
CREATE TEMP TABLE seed ON COMMIT DROP AS
SELECT
    g,
    gen_random_uuid() AS report_id,
    p.account_id,
    p.id AS period_id,
    now() - g * (interval '365 days' / {HISTORY}) AS created_at,
    CASE WHEN g % 50 = 0 THEN 'failed' ELSE 'complete' END AS status
FROM generate_series(1, {HISTORY}) AS g
INNER JOIN tokentrack.usage_periods AS p
    ON p.account_id = ('00000000-0000-0000-0000-'
        || lpad((1 + g % {ACCOUNTS})::text, 12, '0'))::uuid;

INSERT INTO tokentrack.reports (id, account_id, status, token_usage, created_at)
SELECT report_id, account_id, status, '{{"totalTokens": 1500}}', created_at FROM seed;

INSERT INTO tokentrack.report_reservations (
    report_id, account_id, period_id, status, reserved_tokens, billed_tokens,
    created_at, expires_at, finalized_at
)
SELECT report_id, account_id, period_id, 'completed', 20000, 1500,
    created_at, created_at + interval '2 hours', created_at + interval '10 minutes'
FROM seed;

WITH entries AS (
    INSERT INTO tokentrack.usage_ledger (account_id, period_id, kind, tokens, reports, report_id)
    SELECT account_id, period_id, 'report_billed', 1500,
        CASE WHEN status = 'complete' THEN 1 ELSE 0 END, report_id
    FROM seed
    RETURNING id, report_id, period_id, account_id
)
INSERT INTO tokentrack.report_step_usage (
    report_id, account_id, step_name, input_tokens, output_tokens, total_tokens,
    billed_at, billed_period_id, billing_entry_id
)
SELECT report_id, account_id, 'AN0', 1200, 300, 1500, now(), period_id, id FROM entries;

UPDATE tokentrack.usage_periods AS p
SET tokens_used = t.tokens, reports_count = t.reports
FROM (
    SELECT period_id, sum(tokens) AS tokens, sum(reports) AS reports
    FROM tokentrack.usage_ledger GROUP BY period_id
) AS t
WHERE p.id = t.period_id;

-- Live: one report per account with an active reservation and three unbilled steps; and
-- {DUE} reservations past their expiry, each with one unbilled step.
CREATE TEMP TABLE live ON COMMIT DROP AS
SELECT gen_random_uuid() AS report_id, p.account_id, p.id AS period_id, a <= {DUE} AS due
FROM generate_series(1, {ACCOUNTS} + {DUE}) AS a
INNER JOIN tokentrack.usage_periods AS p
    ON p.account_id = ('00000000-0000-0000-0000-'
        || lpad((1 + a % {ACCOUNTS})::text, 12, '0'))::uuid;

INSERT INTO tokentrack.reports (id, account_id, status)
SELECT report_id, account_id, 'processing' FROM live;

INSERT INTO tokentrack.report_reservations (
    report_id, account_id, period_id, reserved_tokens, created_at, expires_at
)
SELECT report_id, account_id, period_id, 20000,
    CASE WHEN due THEN now() - interval '3 hours' ELSE now() END,
    CASE WHEN due THEN now() - interval '1 hour' ELSE now() + interval '2 hours' END
FROM live;

INSERT INTO tokentrack.report_step_usage (
    report_id, account_id, step_name, input_tokens, output_tokens, total_tokens
)
SELECT report_id, account_id, s.name, 1000, 200, 1200
FROM live, unnest(ARRAY['AN0', 'AN1.5', 'AN1.7']) AS s (name)
WHERE NOT due OR s.name = 'AN0';
"""


@dataclass(frozen=True)
class Sample:
    """Rows of the seeded database that the scenarios call the functions with."""

    account: uuid.UUID
    other_account: uuid.UUID
    live_report: uuid.UUID
    second_live_report: uuid.UUID
    billed_report: uuid.UUID
    billed_account: uuid.UUID


async def _seed(server: PostgresServer, dsn: str) -> Sample:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            # A synthetic bulk load, consistent by construction: no per-row foreign-key checks.
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(SEED_SQL)
        await conn.execute("VACUUM ANALYZE")
        live = await conn.fetch(
            "SELECT rr.report_id, rr.account_id FROM tokentrack.report_reservations AS rr"
            " WHERE rr.status = 'active' AND rr.expires_at > now() ORDER BY rr.account_id LIMIT 2"
        )
        billed = await conn.fetchrow(
            "SELECT report_id, account_id FROM tokentrack.report_reservations"
            " WHERE status = 'completed' LIMIT 1"
        )
        assert len(live) == 2
        assert billed is not None
        return Sample(
            account=live[0]["account_id"],
            other_account=live[1]["account_id"],
            live_report=live[0]["report_id"],
            second_live_report=live[1]["report_id"],
            billed_report=billed["report_id"],
            billed_account=billed["account_id"],
        )
    finally:
        await conn.close()


@dataclass(frozen=True)
class History:
    dsn: str
    sample: Sample


@pytest.fixture(scope="module")
def history(pg_server: PostgresServer, tokentrack_template: TemplateDatabase) -> Iterator[History]:
    """A database with tokentrack and a realistic history, ANALYZEd (module-wide, read-only:
    every scenario rolls back)."""
    name = f"tt_explain_{uuid.uuid4().hex[:12]}"

    async def create() -> History:
        dsn = await pg_server.create_database(name, template=tokentrack_template.template_dbname)
        return History(dsn=dsn, sample=await _seed(pg_server, dsn))

    try:
        yield run_in_thread(create)
    finally:
        run_in_thread(lambda: pg_server.drop_database(name))


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


@dataclass
class Explainer:
    """A connection whose statements, nested ones included, log their plans to the test."""

    conn: asyncpg.Connection
    plans: list[dict[str, Any]]
    indexes: dict[str, tuple[str, bool]]  # index name -> (leading column, partial)

    async def call(self, sql: str, *args: Any) -> dict[str, Any]:
        raw = await self.conn.fetchval(sql, *args)
        answer = json.loads(raw) if isinstance(raw, str) else {}
        assert isinstance(answer, dict)
        return answer

    def whole_table_reads(self) -> list[str]:
        """Every scan, in every captured plan, that reads a whole tokentrack table or index."""
        found = []
        for document in self.plans:
            text = " ".join(document.get("Query Text", "").split())[:160]
            for node in _nodes(document["Plan"]):
                relation = node.get("Relation Name")
                if node["Node Type"] == "Seq Scan" and relation in TABLES:
                    found.append(f"Seq Scan on {relation} in: {text}")
                index = node.get("Index Name")
                if index is None or index not in self.indexes:
                    continue
                leading, partial = self.indexes[index]
                if not partial and f"({leading} " not in node.get("Index Cond", ""):
                    found.append(
                        f"whole-index scan of {index} "
                        f"({node.get('Index Cond', 'no condition')}) in: {text}"
                    )
        return found


@pytest.fixture
async def explainer(request: pytest.FixtureRequest, history: History) -> AsyncIterator[Explainer]:
    """A fresh session (so PL/pgSQL plans its statements anew) with auto_explain on.

    Parametrized indirectly with the plan mode: ``custom`` (the default: the first calls of a
    session) or ``generic`` (``plan_cache_mode = force_generic_plan``).
    """
    mode = getattr(request, "param", "custom")
    conn = await asyncpg.connect(history.dsn)
    plans: list[dict[str, Any]] = []

    def listener(_: Any, message: Any) -> None:
        text = str(message.message)
        if "plan:" in text:
            document = json.loads(text.split("plan:", 1)[1])
            if document.get("Query Text", "").lstrip().upper().startswith("EXPLAIN"):
                return
            plans.append(document)

    indexes = {
        r["name"]: (r["leading"], r["partial"])
        for r in await conn.fetch(
            "SELECT c.relname AS name, a.attname AS leading, x.indpred IS NOT NULL AS partial"
            " FROM pg_index AS x JOIN pg_class AS c ON c.oid = x.indexrelid"
            " JOIN pg_attribute AS a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]"
            " WHERE c.relnamespace = 'tokentrack'::regnamespace"
        )
    }
    try:
        await conn.execute("LOAD 'auto_explain'")
        await conn.execute(
            "SET auto_explain.log_min_duration = 0;"
            " SET auto_explain.log_nested_statements = on;"
            " SET auto_explain.log_format = json;"
            " SET client_min_messages = log"
        )
        if mode == "generic":
            await conn.execute("SET plan_cache_mode = force_generic_plan")
        conn.add_log_listener(listener)
        yield Explainer(conn, plans, indexes)
    finally:
        await conn.close()


# --------------------------------------------------------------------------------------------
# The functions, through each of their paths
# --------------------------------------------------------------------------------------------

Scenario = Callable[[Explainer, Sample], Awaitable[None]]


async def reserve(x: Explainer, s: Sample) -> None:
    report = uuid.uuid4()
    sql = "SELECT tokentrack.try_reserve_tokens($1, $2, 1000)::text"
    assert (await x.call(sql, s.account, report))["existing"] is False
    assert (await x.call(sql, s.account, report))["existing"] is True  # the same reservation
    refused = await x.call(sql, s.other_account, report)  # report of another account
    assert refused["error"] == "report_account_mismatch"


async def persist_step(x: Explainer, s: Sample) -> None:
    sql = "SELECT tokentrack.persist_step_usage($1, $2, $3, 1000, 200, NULL, 'gpt-4o')::text"
    assert (await x.call(sql, s.live_report, s.account, "AN2"))["duplicate"] is False
    assert (await x.call(sql, s.live_report, s.account, "AN2"))["duplicate"] is True
    late = await x.call(sql, s.billed_report, s.billed_account, "AN9")
    assert late["late"] is True
    refused = await x.call(sql, uuid.uuid4(), s.account, "AN2")
    assert refused["error"] == "reservation_not_found"


async def finalize(x: Explainer, s: Sample) -> None:
    sql = "SELECT tokentrack.finalize_report_usage($1, $2)::text"
    assert (await x.call(sql, s.live_report, s.account))["already_finalized"] is False
    assert (await x.call(sql, s.live_report, s.account))["already_finalized"] is True
    refused = await x.call(sql, s.live_report, s.other_account)
    assert refused["error"] == "report_account_mismatch"


async def finish(x: Explainer, s: Sample) -> None:
    sql = "SELECT tokentrack.finish_report($1, $2, $3)::text"
    assert (await x.call(sql, s.second_live_report, s.other_account, "complete"))["success"]
    # A report billed before it had an outcome is counted when it completes.
    await x.call("SELECT tokentrack.finalize_report_usage($1, $2)::text", s.live_report, s.account)
    assert (await x.call(sql, s.live_report, s.account, "complete"))["success"]
    refused = await x.call(sql, s.live_report, s.account, "failed")
    assert refused["error"] == "report_finalized"


async def sweep(x: Explainer, s: Sample) -> None:
    answer = await x.call("SELECT tokentrack.expire_reservations(100)::text")
    assert answer["expired"] == 100


async def reconcile_one_account(x: Explainer, s: Sample) -> None:
    assert (await x.call("SELECT tokentrack.reconcile($1)::text", s.account))["ok"] is True


async def reconcile_one_account_without_step_billing_indexes(x: Explainer, s: Sample) -> None:
    """Version 20261214000000 drops the partial indexes of report_step_usage on
    billing_entry_id and billed_period_id (write cost): reconcile(one account) reaches the steps
    through the ledger's report_id and the account's steps, never by a scan of them all. The
    DROP is rolled back with the scenario's transaction (a no-op when they are gone already)."""
    await x.conn.execute(
        "DROP INDEX IF EXISTS tokentrack.report_step_usage_billing_entry_idx;"
        " DROP INDEX IF EXISTS tokentrack.report_step_usage_billed_period_idx"
    )
    for account in (s.account, s.billed_account):
        assert (await x.call("SELECT tokentrack.reconcile($1)::text", account))["ok"] is True


async def reconcile_recent(x: Explainer, s: Sample) -> None:
    """The incremental check, before the point ever moved (everything after it: an audit of
    everything, skipped) and after: only the rows after the point, by index, one account or
    all. The point's rows are rolled back with the scenario."""
    await x.conn.execute(
        "DROP INDEX IF EXISTS tokentrack.report_step_usage_billing_entry_idx;"
        " DROP INDEX IF EXISTS tokentrack.report_step_usage_billed_period_idx"
    )
    await x.conn.execute(
        "INSERT INTO tokentrack.reconcile_point (through_entry)"
        " SELECT max(id) - 50 FROM tokentrack.usage_ledger;"
        " INSERT INTO tokentrack.reconcile_periods (account_id, period_id, tokens, reports)"
        " SELECT l.account_id, l.period_id, sum(l.tokens), sum(l.reports)"
        " FROM tokentrack.usage_ledger AS l"
        " WHERE l.id <= (SELECT through_entry FROM tokentrack.reconcile_point)"
        " GROUP BY l.account_id, l.period_id"
    )
    # Of every account: every active period (one per account, the whole usage_periods here,
    # which is not history), and only the 50 ledger rows after the point; its plans are not
    # checked. Of one account: by index only.
    everything = await x.call("SELECT tokentrack.reconcile_recent()::text")
    assert (everything["ok"], everything["entries_checked"]) == (True, 50)
    assert everything["periods_checked"] == ACCOUNTS
    x.plans.clear()
    for account in (s.account, s.billed_account):
        one = await x.call("SELECT tokentrack.reconcile_recent($1)::text", account)
        assert (one["ok"], one["periods_checked"]) == (True, 1)


async def health(x: Explainer, s: Sample) -> None:
    for hours in (24, 1):  # one statement per call: two calls for three plans or more
        figures = await x.call("SELECT tokentrack.health($1)::text", hours)
        assert figures["active_reservations"]["count"] == ACCOUNTS + DUE
        assert figures["active_reservations"]["past_expiry"] == DUE


# Generic plans too for the hot paths, which PL/pgSQL runs often enough to settle on one.
# reconcile() is checked with custom plans only: its `p_account_id IS NULL OR p.account_id =
# p_account_id` makes any generic plan read every period, so the plan cache keeps custom ones.
# So is health(): a generic plan of `created_at >= $1` cannot know that the window is a small
# part of the reports and reads them all; that estimate costs far more than the custom plans,
# so the plan cache keeps custom ones (and a window covering most reports should read them all).
SCENARIOS: list[Any] = [
    pytest.param(scenario, mode, id=f"{mode}-{name}", marks=marks)
    for name, scenario, modes, marks in (
        ("try_reserve_tokens", reserve, ("custom", "generic"), ()),
        ("persist_step_usage", persist_step, ("custom", "generic"), ()),
        ("finalize_report_usage", finalize, ("custom", "generic"), ()),
        ("finish_report", finish, ("custom", "generic"), ()),
        ("expire_reservations", sweep, ("custom", "generic"), ()),
        ("reconcile_one_account", reconcile_one_account, ("custom",), ()),
        (
            "reconcile_one_account_without_step_billing_indexes",
            reconcile_one_account_without_step_billing_indexes,
            ("custom",),
            (),
        ),
        ("reconcile_recent", reconcile_recent, ("custom",), ()),
        ("health", health, ("custom",), ()),
    )
    for mode in modes
]


@pytest.mark.parametrize(("scenario", "explainer"), SCENARIOS, indirect=["explainer"])
async def test_functions_read_large_tables_by_index(
    scenario: Scenario, explainer: Explainer, history: History
) -> None:
    async with _rolled_back(explainer.conn):
        await scenario(explainer, history.sample)
    nested = [p for p in explainer.plans if "tokentrack." in p.get("Query Text", "")]
    assert len(nested) >= 3, "auto_explain sent no plans of the statements inside the functions"
    assert explainer.whole_table_reads() == []


@asynccontextmanager
async def _rolled_back(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """A transaction that is always rolled back: the module's database stays as seeded."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        yield
    finally:
        await transaction.rollback()


def test_seeded_history_is_consistent(history: History) -> None:
    """The seed is realistic and healthy: reconcile() finds nothing to report."""

    async def check() -> dict[str, Any]:
        conn = await asyncpg.connect(history.dsn)
        try:
            counts = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM tokentrack.report_reservations) AS reservations,"
                " (SELECT count(*) FROM tokentrack.report_step_usage) AS steps,"
                " (SELECT tokentrack.reconcile()::jsonb -> 'ok') AS ok"
            )
            assert counts is not None
            return dict(counts)
        finally:
            await conn.close()

    counts = run_in_thread(check)
    assert counts["reservations"] == HISTORY + ACCOUNTS + DUE
    assert counts["steps"] == HISTORY + 3 * ACCOUNTS + DUE
    assert json.loads(counts["ok"]) is True
