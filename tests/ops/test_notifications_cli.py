"""``tokentrack notifications --consumer NAME [--follow] [--limit N]`` against a real database:
one JSON line per notification, each acknowledged after it was printed, at most --limit,
--follow waiting for crossings that happen while it runs; one-line errors (exit 2)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg

from ops_history import CliResult, tokentrack
from sqlkit import call, new_account


async def cross(conn: asyncpg.Connection, thresholds: list[int]) -> uuid.UUID:
    account = await new_account(conn, 1_000_000)
    answer = await call(
        conn,
        "set_budget",
        account,
        None,
        "tokens",
        "day",
        100,
        json.dumps({"thresholds": thresholds}),
    )
    raw = await conn.fetchval(
        "SELECT tokentrack.reserve($1, $2, '{\"tokens\": 100}'::jsonb)::text",
        account,
        uuid.uuid4(),
    )
    assert json.loads(raw)["success"] is True
    return uuid.UUID(answer["budget_id"])


async def _notifications(db_dsn: str, *args: str) -> CliResult:
    return await tokentrack("notifications", *args, "--database-url", db_dsn)


def _lines(result: CliResult) -> list[dict[str, Any]]:
    assert (result.code, result.err) == (0, ""), result
    return [json.loads(line) for line in result.out.splitlines()]


async def test_prints_one_json_line_per_notification_and_acknowledges_it(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    budget_id = await cross(conn, [50, 80, 100])
    first = _lines(await _notifications(db_dsn, "--consumer", "cli", "--limit", "2"))
    assert [n["threshold"] for n in first] == [50, 80]
    assert first[0] == {
        "id": first[0]["id"],
        "account_id": first[0]["account_id"],
        "budget_id": str(budget_id),
        "subject": None,
        "unit": "tokens",
        "window": "day",
        "window_start": first[0]["window_start"],
        "threshold": 50,
        "used": 100,
        "limit": 100,
        "created_at": first[0]["created_at"],
        "attempts": 1,
    }
    acked = await conn.fetch(
        "SELECT threshold, acked_by FROM tokentrack.notifications ORDER BY threshold"
    )
    assert [(r["threshold"], r["acked_by"]) for r in acked] == [
        (50, "cli"),
        (80, "cli"),
        (100, None),
    ]
    rest = _lines(await _notifications(db_dsn, "--consumer", "cli"))
    assert [n["threshold"] for n in rest] == [100]
    assert _lines(await _notifications(db_dsn, "--consumer", "cli")) == []


async def test_follow_prints_crossings_as_they_happen(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    running = asyncio.create_task(
        _notifications(
            db_dsn, "--consumer", "follower", "--follow", "--limit", "3", "--poll-interval", "0.2"
        )
    )
    await asyncio.sleep(0.2)
    assert not running.done()  # nothing yet: it waits
    await cross(conn, [50, 100])
    await cross(conn, [100])
    result = await asyncio.wait_for(running, 30)
    lines = _lines(result)
    assert sorted(n["threshold"] for n in lines) == [50, 100, 100]
    open_ones = await conn.fetchval(
        "SELECT count(*) FROM tokentrack.notifications WHERE acked_at IS NULL"
    )
    assert open_ones == 0


async def test_refusals_are_one_line_and_exit_2(db_dsn: str, empty_db_dsn: str) -> None:
    blank = await _notifications(db_dsn, "--consumer", " ")
    assert (blank.code, blank.out) == (2, "")
    assert blank.err.count("\n") == 1, blank
    assert "consumer" in blank.err
    missing = await _notifications(empty_db_dsn, "--consumer", "c")
    assert (missing.code, missing.out) == (2, "")
    assert missing.err.count("\n") == 1, missing
    assert "tokentrack.notifications" in missing.err
    nowhere = await tokentrack("notifications", "--consumer", "c")
    assert nowhere.code == 2
