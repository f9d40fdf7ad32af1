"""Invariant 6 under random data: version 2 and its rollback leave version 1's data intact.

Each example starts from a database with version 1 alone and random version-1 history
(periods opened and switched, increment_usage calls, reports of every mode and status).
From it, three clones:

- ``v1``: stays at version 1;
- ``upgraded``: version 2 applied (version 1's rows and increment_usage unchanged, every
  invariant holds), rolled back at once, down to version 1 (unchanged again);
- ``worked``: version 2 applied, a random concurrent version-2 workload run and settled
  (checked by the oracle), then rolled back down to version 1 with ``archive`` (its tables
  hold the workload's rows, so a plain rollback is refused): version 1's rows are exactly
  what the workload left, and every period is still explained by the ledger. Installed
  again at the end, the archived rows come back and every invariant holds.

The same random increment_usage calls then answer identically (the raw jsonb) on ``v1`` and
``upgraded`` and leave identical rows; on ``worked`` they add exactly what they say.
Fewer examples than the other property tests: each one installs version 2 twice.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invariants import check_invariants, v1_state
from sqlkit import call
from tokentrack_client import migrate
from tokentrack_client.testing import PostgresServer
from workload import Harness, fresh_database, lanes_of

V1 = "20251219000000"
LATER = len(migrate.load_versions()) - 1  # rolling back this many versions leaves version 1
EXAMPLES = max(3, settings.default.max_examples // 4)


def v1_only_sql(target: Path) -> Path:
    """A copy of the SQL directory that holds version 1 alone."""
    source = migrate.default_sql_dir()
    for sub in ("schema", "rollback", "functions"):
        (target / sub).mkdir(parents=True)
        for path in (source / sub).glob("*.sql"):
            if path.name.startswith(V1) or f"-- version: {V1}" in path.read_text():
                shutil.copy(path, target / sub / path.name)
    return target


@pytest.fixture(scope="module")
def v1_template(
    pg_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A database with tokentrack version 1 alone, to clone examples from."""
    name = f"tt_v1_{uuid.uuid4().hex[:12]}"
    sql_dir = v1_only_sql(tmp_path_factory.mktemp("v1sql") / "sql")

    async def create() -> None:
        dsn = await pg_server.create_database(name)
        await migrate.install(dsn, sql_dir=sql_dir)

    asyncio.run(create())
    try:
        yield name
    finally:
        asyncio.run(pg_server.drop_database(name))


history_steps = st.one_of(
    st.tuples(st.just("open"), st.integers(0, 2), st.sampled_from((0, 100, 10_000))),
    st.tuples(
        st.just("increment"),
        st.integers(0, 3),  # 3: an account without a period
        st.integers(0, 5_000),
        st.booleans(),
        st.booleans(),
    ),
    st.tuples(
        st.just("report"),
        st.integers(0, 2),
        st.sampled_from(("standard", "dd", "discovery", "hybrid")),
        st.sampled_from(("pending", "processing", "complete", "failed", "cancelled")),
        st.one_of(st.none(), st.integers(0, 10_000)),
    ),
)
increments = st.lists(
    st.tuples(st.integers(0, 4), st.integers(0, 2_000), st.booleans(), st.booleans()),
    max_size=6,
)


async def write_history(dsn: str, steps: list[tuple[Any, ...]], accounts: list[uuid.UUID]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for account in accounts[:3]:
            await call(conn, "open_usage_period", account, 1_000, None)
        await conn.execute("INSERT INTO tokentrack.accounts (id) VALUES ($1)", accounts[3])
        for entry in steps:
            if entry[0] == "open":
                await call(conn, "open_usage_period", accounts[entry[1]], entry[2], None)
            elif entry[0] == "increment":
                _, who, tokens, is_report, is_chat = entry
                await call(conn, "increment_usage", accounts[who], tokens, is_report, is_chat)
            else:
                _, who, mode, status, total = entry
                usage = None if total is None else f'{{"totalTokens": {total}}}'
                await conn.execute(
                    "INSERT INTO tokentrack.reports (id, account_id, mode, status, token_usage)"
                    " VALUES ($1, $2, $3, $4, $5::jsonb)",
                    uuid.uuid4(),
                    accounts[who],
                    mode,
                    status,
                    usage,
                )
    finally:
        await conn.close()


async def run_increments(
    dsn: str, calls: list[tuple[int, int, bool, bool]], accounts: list[uuid.UUID]
) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [
            await conn.fetchval(
                "SELECT tokentrack.increment_usage($1, $2, $3, $4)::text",
                accounts[who],  # 4: an account that does not exist
                tokens,
                is_report,
                is_chat,
            )
            for who, tokens, is_report, is_chat in calls
        ]
    finally:
        await conn.close()


async def state(dsn: str) -> dict[str, list[str]]:
    conn = await asyncpg.connect(dsn)
    try:
        return await v1_state(conn)
    finally:
        await conn.close()


async def violations(dsn: str, **kwargs: Any) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return await check_invariants(conn, **kwargs)
    finally:
        await conn.close()


async def v2_rows(dsn: str) -> int:
    """Rows of version 2's tables (its billing tables)."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT (SELECT count(*) FROM tokentrack.report_reservations)"
                " + (SELECT count(*) FROM tokentrack.report_step_usage)"
            )
        )
    finally:
        await conn.close()


async def ledger_explains_usage(dsn: str) -> bool:
    """Without version 2 (no reconcile()), every period's counters equal its ledger rows."""
    conn = await asyncpg.connect(dsn)
    try:
        return not await conn.fetchval(
            "SELECT count(*) FROM tokentrack.usage_periods AS p"
            " CROSS JOIN LATERAL (SELECT COALESCE(sum(l.tokens), 0) AS tokens,"
            "   COALESCE(sum(l.reports), 0) AS reports"
            "   FROM tokentrack.usage_ledger AS l WHERE l.period_id = p.id) AS l"
            " WHERE p.tokens_used <> l.tokens OR p.reports_count <> l.reports"
        )
    finally:
        await conn.close()


@settings(max_examples=EXAMPLES)
@given(
    history=st.lists(history_steps, max_size=12),
    later=increments,
    rounds=st.lists(lanes_of(2, 4), min_size=1, max_size=3),
)
def test_version_2_and_its_rollback_leave_version_1_intact(
    pg_server: PostgresServer,
    v1_template: str,
    history: list[tuple[Any, ...]],
    later: list[tuple[int, int, bool, bool]],
    rounds: list[Any],
) -> None:
    accounts = [uuid.uuid4() for _ in range(5)]

    async def example() -> None:
        async with fresh_database(pg_server, v1_template) as base:
            await write_history(base, history, accounts)
            template = base.rsplit("/", 1)[1]
            async with (
                fresh_database(pg_server, template) as v1,
                fresh_database(pg_server, template) as upgraded,
                fresh_database(pg_server, template) as worked,
            ):
                before = await state(v1)

                await migrate.install(upgraded)
                assert await state(upgraded) == before
                assert await violations(upgraded, v1_before=before) == []
                await migrate.rollback(upgraded, steps=LATER)
                assert await state(upgraded) == before

                await migrate.install(worked)
                harness = await Harness.create(worked, [60, 150], 4, 5)
                try:
                    for lanes in rounds:
                        found = await harness.round(lanes)
                        assert found == [], "\n".join(found) + "\n" + harness.story()
                    found = await harness.settle(None)
                    assert found == [], "\n".join(found) + "\n" + harness.story()
                finally:
                    await harness.close()
                left = await state(worked)
                if await v2_rows(worked):
                    with pytest.raises(migrate.RollbackRefused):
                        await migrate.rollback(worked, steps=LATER)
                rolled = await migrate.rollback(worked, steps=LATER, archive=True)
                # The workload was settled: the archive has nothing left to bill.
                assert rolled.versions[-1].billed in (None, migrate.RollbackSweep(0, 0, 0))
                assert await state(worked) == left
                assert await ledger_explains_usage(worked)

                answers = await run_increments(v1, later, accounts)
                assert await run_increments(upgraded, later, accounts) == answers
                assert await state(upgraded) == await state(v1)
                await run_increments(worked, later, accounts)
                assert await ledger_explains_usage(worked)
                await migrate.install(worked)  # restores the archived reservations and steps
                assert await violations(worked, settled=True, swept=True) == []

    asyncio.run(example())
