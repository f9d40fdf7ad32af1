"""Contract, invariant 6: version 2 and its rollback leave version 1's data and behaviour intact."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlparse

import asyncpg

from sqlkit import call
from tokentrack_client import migrate

V1 = "20251219000000"

# Rows of version 1's tables as text; the ledger without created_at (it is now() of each call).
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


def _v1_only(tmp_path: Path) -> Path:
    """A copy of the SQL directory that holds version 1 alone."""
    source = migrate.default_sql_dir()
    target = tmp_path / "sql"
    for sub in ("schema", "rollback", "functions"):
        (target / sub).mkdir(parents=True)
        for path in (source / sub).glob("*.sql"):
            text = path.read_text()
            if path.name.startswith(V1) or f"-- version: {V1}" in text:
                shutil.copy(path, target / sub / path.name)
    return target


async def _state(dsn: str) -> dict[str, list[str]]:
    conn = await asyncpg.connect(dsn)
    try:
        return {name: [r[0] for r in await conn.fetch(q)] for name, q in V1_STATE.items()}
    finally:
        await conn.close()


async def _increments(dsn: str, accounts: list[uuid.UUID]) -> list[str]:
    """The same sequence of increment_usage calls, answers as the raw jsonb text."""
    conn = await asyncpg.connect(dsn)
    try:
        answers = []
        for i, account in enumerate(accounts):
            for tokens, is_report, is_chat in (
                (100 + i, True, False),
                (7, False, True),
                (0, False, False),
            ):
                answers.append(
                    await conn.fetchval(
                        "SELECT tokentrack.increment_usage($1, $2, $3, $4)::text",
                        account,
                        tokens,
                        is_report,
                        is_chat,
                    )
                )
        return answers
    finally:
        await conn.close()


async def test_version_2_and_its_rollback_leave_version_1_intact(
    make_database: Callable[..., Awaitable[str]], tmp_path: Path
) -> None:
    base = await make_database()
    await migrate.install(base, sql_dir=_v1_only(tmp_path))
    conn = await asyncpg.connect(base)
    accounts = [uuid.uuid4() for _ in range(3)]
    for n, account in enumerate(accounts):
        await call(conn, "open_usage_period", account, 10_000 * (n + 1), None)
        await call(conn, "increment_usage", account, 500, True, False)
        for status in ("pending", "complete", "failed"):
            await conn.execute(
                "INSERT INTO tokentrack.reports (id, account_id, mode, status, token_usage)"
                " VALUES ($1, $2, 'hybrid', $3, '{\"totalTokens\": 12}')",
                uuid.uuid4(),
                account,
                status,
            )
    idle = uuid.uuid4()
    await conn.execute("INSERT INTO tokentrack.accounts (id) VALUES ($1)", idle)
    await conn.close()
    template = urlparse(base).path.lstrip("/")

    v1_only = await make_database(template)
    with_v2 = await make_database(template)
    rolled_back = await make_database(template)
    before = await _state(v1_only)

    await migrate.install(with_v2)
    assert await _state(with_v2) == before

    await migrate.install(rolled_back)
    # Every version after version 1 (version 2 included, not only the newest); their tables
    # hold no rows here, so no archive is needed.
    later = len(migrate.load_versions()) - 1
    result = await migrate.rollback(rolled_back, steps=later)
    assert [v.version for v in result.versions][-1] == "20260108000000"
    assert await _state(rolled_back) == before

    calls = [*accounts, idle, uuid.uuid4()]  # with one without a period, one unknown
    expected = await _increments(v1_only, calls)
    assert await _increments(with_v2, calls) == expected
    assert await _increments(rolled_back, calls) == expected
    after = await _state(v1_only)
    assert after != before  # the calls did change the periods...
    assert await _state(with_v2) == after  # ...identically in every version
    assert await _state(rolled_back) == after
