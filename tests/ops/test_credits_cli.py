"""``tokentrack credits grant|list``, ``tokentrack adjust`` and ``tokentrack refund`` against a
real database: what they write and print (``--json``: the function's answer), retries with the
same key, and their one-line refusals (exit 2, nothing written)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
from test_budgets_cli import assert_one_line

from ops_history import CliResult, tokentrack
from securitykit import login_roles
from sqlkit import call, new_account


async def _run(db_dsn: str, *args: str) -> CliResult:
    return await tokentrack(*args, "--database-url", db_dsn)


async def _json(db_dsn: str, *args: str) -> dict[str, Any]:
    result = await _run(db_dsn, *args, "--json")
    assert (result.code, result.err) == (0, ""), result
    document = json.loads(result.out)
    assert isinstance(document, dict)
    return document


async def _budget(conn: asyncpg.Connection, account: uuid.UUID, limit: int) -> str:
    answer = await call(conn, "set_budget", account, None, "tokens", "day", limit, "{}")
    return str(answer["budget_id"])


async def _billed(conn: asyncpg.Connection, account: uuid.UUID, tokens: int) -> uuid.UUID:
    report = uuid.uuid4()
    answer = await call(conn, "try_reserve_tokens", account, report, tokens)
    assert answer["success"] is True, answer
    await call(conn, "persist_step_usage", report, account, "s", tokens, 0, None, None)
    await call(conn, "finish_report", report, account, "complete", None)
    return report


async def test_credits_grant_and_list(db_dsn: str, conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    budget = await _budget(conn, account, 100)
    grant = ("credits", "grant", "--account", str(account), "--budget", budget, "--amount", "25")
    first = await _run(db_dsn, *grant, "--key", "g1", "--reason", "promo")
    assert first.code == 0, first
    assert first.out.startswith(f"granted 25 tokens to budget {budget} without expiry")
    assert "is now 125" in first.out
    retry = await _json(db_dsn, *grant, "--key", "g1", "--reason", "promo")
    assert retry["duplicate"] is True
    assert retry["limit"] == 125
    expiring = await _json(
        db_dsn,
        *grant,
        "--key",
        "g2",
        "--reason",
        "trial",
        "--expires-at",
        "2999-01-01T00:00:00+00:00",
    )
    assert expiring["expires_at"].startswith("2999-01-01")
    conflict = await _run(db_dsn, *grant, "--key", "g1", "--reason", "another")
    assert_one_line(conflict, "(idempotency_conflict): nothing was written")
    missing = await _run(
        db_dsn,
        *grant[:4],
        "--budget",
        str(uuid.uuid4()),
        "--amount",
        "5",
        "--key",
        "g3",
        "--reason",
        "r",
    )
    assert_one_line(missing, "(budget_not_found)")
    naive = await _run(db_dsn, *grant, "--key", "g4", "--reason", "r", "--expires-at", "2999-01-01")
    assert_one_line(naive, "invalid expires_at: give its UTC offset")
    past = await _run(
        db_dsn, *grant, "--key", "g5", "--reason", "r", "--expires-at", "2000-01-01T00:00:00+00:00"
    )
    assert_one_line(past, "p_expires_at must be in the future")
    listed = await _json(db_dsn, "credits", "list", "--account", str(account))
    assert [(g["amount"], g["reason"], g["active"]) for g in listed["grants"]] == [
        (25, "trial", True),
        (25, "promo", True),
    ]
    table = await _run(db_dsn, "credits", "list", "--account", str(account), "--budget", budget)
    assert table.code == 0
    assert table.out.splitlines()[0].split() == [
        "grant",
        "budget",
        "amount",
        "granted_at",
        "expires_at",
        "counts",
        "reason",
    ]
    assert len(table.out.splitlines()) == 3
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.credit_grants") == 2


async def test_adjust_and_refund(db_dsn: str, conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    budget = await _budget(conn, account, 1_000)
    adjusted = await _run(
        db_dsn,
        "adjust",
        "--account",
        str(account),
        "--budget",
        budget,
        "--delta",
        "40",
        "--key",
        "a1",
        "--reason",
        "missed",
    )
    assert adjusted.code == 0, adjusted
    assert f"adjusted budget {budget}" in adjusted.out
    assert "by +40 tokens" in adjusted.out
    period = await _json(
        db_dsn, "adjust", "--account", str(account), "--delta", "7", "--key", "a2", "--reason", "x"
    )
    assert (period["used"], period["budget_id"]) == (7, None)
    below = await _run(
        db_dsn, "adjust", "--account", str(account), "--delta", "-8", "--key", "a3", "--reason", "x"
    )
    assert_one_line(below, "(negative_usage): nothing was written")
    zero = await _run(
        db_dsn, "adjust", "--account", str(account), "--delta", "0", "--key", "a4", "--reason", "x"
    )
    assert_one_line(zero, "invalid delta")

    report = await _billed(conn, account, 60)
    refund = ("refund", "--account", str(account), "--report", str(report))
    done = await _run(db_dsn, *refund, "--key", "r1", "--reason", "bug")
    assert done.code == 0, done
    assert done.out.startswith(f"refunded report {report}: 60 tokens")
    again = await _json(db_dsn, *refund, "--key", "r1", "--reason", "bug")
    assert again["duplicate"] is True
    assert again["tokens"] == 60
    twice = await _run(db_dsn, *refund, "--key", "r2", "--reason", "bug")
    assert_one_line(twice, "(already_refunded)")
    unknown = await _run(
        db_dsn,
        "refund",
        "--account",
        str(account),
        "--report",
        "not-a-uuid",
        "--key",
        "r3",
        "--reason",
        "bug",
    )
    assert_one_line(unknown, "invalid report")
    verdict = await call(conn, "reconcile", None)
    assert verdict["ok"] is True, verdict["discrepancies"]
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.usage_adjustments") == 2


async def test_the_service_role_may_correct_billing(db_dsn: str, conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    budget = await _budget(conn, account, 100)
    report = await _billed(conn, account, 10)
    async with login_roles(conn, db_dsn) as made:
        service = await made.create("credits", "tokentrack_service")
        url = made.dsn(service)
        base = ("--account", str(account))
        key = ("--key", "k", "--reason", "r")
        grant = await _json(
            url, "credits", "grant", *base, "--budget", budget, "--amount", "5", *key
        )
        assert grant["limit"] == 105
        assert (await _json(url, "adjust", *base, "--delta", "3", *key))["used"] == 13
        assert (await _json(url, "refund", *base, "--report", str(report), *key))["tokens"] == 10
        listed = await _json(url, "credits", "list", *base)
        assert listed["grants"][0]["granted_by"] == service
