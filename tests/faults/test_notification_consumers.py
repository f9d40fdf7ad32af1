"""Consumers of notifications killed mid-claim: a notification is delivered at least once and
acknowledged once.

* A consumer process (the client's ``tracker.notifications`` stream) killed with SIGKILL
  while its loop body delivers a notification: the notifications it claimed stay leased to
  it, then another consumer gets every one of them once the (short) lease lapses.
* A consumer whose connection is terminated in the middle of its claim transaction: nothing
  was committed, so the notifications are free at once.
* A consumer whose connection is terminated after its claim committed, before acknowledging:
  handed out again when the lease lapses.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import uuid

import asyncpg

from sqlkit import Connect, call, new_account

CONSUMER = """
import asyncio, sys
import asyncpg
from tokentrack_client import TokenTracker

async def main() -> None:
    pool = await asyncpg.create_pool(sys.argv[1], min_size=1, max_size=2)
    tracker = TokenTracker(pool)
    async for n in tracker.notifications("doomed", lease=1.0, poll_interval=0.05):
        print(n.id, flush=True)
        await asyncio.Event().wait()  # delivering forever: killed here

asyncio.run(main())
"""


async def cross_three(conn: asyncpg.Connection) -> list[int]:
    account = await new_account(conn, 1_000_000)
    await call(
        conn,
        "set_budget",
        account,
        None,
        "tokens",
        "day",
        100,
        json.dumps({"thresholds": [50, 80, 100]}),
    )
    raw = await conn.fetchval(
        "SELECT tokentrack.reserve($1, $2, '{\"tokens\": 100}'::jsonb)::text",
        account,
        uuid.uuid4(),
    )
    assert json.loads(raw)["success"] is True
    rows = await conn.fetch(
        "SELECT id FROM tokentrack.notifications WHERE account_id = $1 ORDER BY id", account
    )
    return [r["id"] for r in rows]


async def claim(conn: asyncpg.Connection, consumer: str) -> list[dict[str, object]]:
    raw = await conn.fetchval("SELECT tokentrack.claim_notifications($1, 100)::text", consumer)
    found: list[dict[str, object]] = json.loads(raw)["notifications"]
    return found


async def until_all_lapsed(conn: asyncpg.Connection, ids: list[int]) -> None:
    for _ in range(400):
        if await conn.fetchval(
            "SELECT bool_and(lease_until <= clock_timestamp()) FROM tokentrack.notifications"
            " WHERE id = ANY($1::bigint[])",
            ids,
        ):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the leases did not lapse")


async def take_over(conn: asyncpg.Connection, ids: list[int], attempts: int) -> None:
    """Another consumer claims exactly ``ids`` (each on its ``attempts``-th handing out),
    acknowledges them, and nothing is left to claim."""
    again = await claim(conn, "survivor")
    assert [(n["id"], n["attempts"]) for n in again] == [(i, attempts) for i in ids]
    for notification_id in ids:
        answer = await call(conn, "ack_notification", notification_id, "survivor")
        assert (answer["success"], answer["duplicate"]) == (True, False)
    assert await claim(conn, "survivor") == []
    assert await claim(conn, "anyone") == []
    states = await conn.fetch(
        "SELECT acked_by, count(*) AS n FROM tokentrack.notifications GROUP BY acked_by"
    )
    assert [(r["acked_by"], r["n"]) for r in states] == [("survivor", len(ids))]


async def test_a_consumer_process_killed_while_delivering_has_its_claims_handed_out_again(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    ids = await cross_three(conn)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CONSUMER,
        db_dsn,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line.strip(), (await process.stderr.read()) if process.stderr else b""
        assert int(line) == ids[0]
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)
        await process.wait()
    assert process.returncode == -signal.SIGKILL
    leased = await conn.fetch(
        "SELECT claimed_by, attempts, acked_at FROM tokentrack.notifications ORDER BY id"
    )
    assert [tuple(r) for r in leased] == [("doomed", 1, None)] * 3  # its batch, unacknowledged
    assert await claim(conn, "survivor") == []  # its leases are live: not yet
    await until_all_lapsed(conn, ids)
    await take_over(conn, ids, attempts=2)


async def test_a_consumer_terminated_inside_its_claim_transaction_frees_them_at_once(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    ids = await cross_three(conn)
    doomed = await connect()
    transaction = doomed.transaction()
    await transaction.start()
    assert len(await claim(doomed, "doomed")) == 3  # locked, leased, not committed
    assert await claim(conn, "survivor") == []  # SKIP LOCKED: the rows are the doomed one's
    await conn.execute("SELECT pg_terminate_backend($1)", doomed.get_server_pid())
    for _ in range(400):  # until the server has ended that backend (its transaction rolled back)
        if not await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", doomed.get_server_pid()
        ):
            break
        await asyncio.sleep(0.05)
    await take_over(conn, ids, attempts=1)


async def test_a_consumer_terminated_after_its_claim_committed_loses_them_when_the_lease_lapses(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    ids = await cross_three(conn)
    doomed = await connect()
    raw = await doomed.fetchval(
        "SELECT tokentrack.claim_notifications('doomed', 100, interval '300 milliseconds')::text"
    )
    assert len(json.loads(raw)["notifications"]) == 3
    await conn.execute("SELECT pg_terminate_backend($1)", doomed.get_server_pid())
    assert await claim(conn, "survivor") == []
    await until_all_lapsed(conn, ids)
    await take_over(conn, ids, attempts=2)
