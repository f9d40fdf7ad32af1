"""Notifications through the client: ``claim_notifications`` / ``ack_notification`` with typed
results and refusals, and ``tracker.notifications(consumer)``: woken by a real NOTIFY,
falling back to polling, listening again after its connection is terminated, acknowledging
when the loop asks for the next one (never what the loop left), on a pool and on a single
connection."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from client_fixtures import FAST_RETRY
from sqlkit import Connect, call, new_account
from tokentrack_client import (
    ConnectionLost,
    InvalidArgument,
    Notification,
    NotificationAck,
    NotificationClaimed,
    NotificationNotFound,
    NotificationStream,
    TokenTracker,
)
from tokentrack_client.retry import NO_RETRY

BOUND = 20.0
"""A safety bound (seconds) on waits that end as soon as what they wait for happened."""


async def cross(conn: asyncpg.Connection, thresholds: list[int], reserve: int = 1_000) -> uuid.UUID:
    """A new account whose day budget of 1,000 tokens crosses ``thresholds`` at once."""
    account = await new_account(conn, 1_000_000)
    answer = await call(
        conn,
        "set_budget",
        account,
        "team:a",
        "tokens",
        "day",
        1_000,
        json.dumps({"thresholds": thresholds}),
    )
    assert answer["success"] is True
    raw = await conn.fetchval(
        "SELECT tokentrack.reserve($1, $2, $3::jsonb, ARRAY['team:a'])::text",
        account,
        uuid.uuid4(),
        json.dumps({"tokens": reserve}),
    )
    assert json.loads(raw)["success"] is True
    return uuid.UUID(answer["budget_id"])


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Wait until ``check()`` is true (polling, at most :data:`BOUND` seconds)."""
    for _ in range(int(BOUND / 0.02)):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the condition never became true")


async def acked(conn: asyncpg.Connection, notification_id: int) -> str | None:
    by: str | None = await conn.fetchval(
        "SELECT acked_by FROM tokentrack.notifications WHERE id = $1", notification_id
    )
    return by


class Consumer:
    """Runs ``async for n in stream`` in a task: each notification goes to ``received``; the
    loop body then waits for ``proceed`` (so the test sees it before it is acknowledged)."""

    def __init__(self, stream: NotificationStream, *, stop_after: int | None = None) -> None:
        self.stream = stream
        self.received: asyncio.Queue[Notification] = asyncio.Queue()
        self.proceed = asyncio.Event()
        self.proceed.set()
        self.stop_after = stop_after
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        count = 0
        async for notification in self.stream:
            await self.received.put(notification)
            await self.proceed.wait()
            count += 1
            if self.stop_after is not None and count >= self.stop_after:
                break

    async def next(self) -> Notification:
        return await asyncio.wait_for(self.received.get(), BOUND)

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task
        await self.stream.aclose()


# --------------------------------------------------------------------------------------------
# claim_notifications / ack_notification
# --------------------------------------------------------------------------------------------


async def test_claim_and_ack_answer_typed_results_and_refusals(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    budget_id = await cross(conn, [50, 100])
    claimed = await tracker.claim_notifications("alerts", 10, lease=30)
    assert [(n.threshold, n.used, n.limit, n.attempts) for n in claimed] == [
        (50, 1_000, 1_000, 1),
        (100, 1_000, 1_000, 1),
    ]
    first = claimed[0]
    assert (first.budget_id, first.subject, first.unit, first.window) == (
        budget_id,
        "team:a",
        "tokens",
        "day",
    )
    assert first.lease_until > first.created_at
    assert first.as_json()["budget_id"] == str(budget_id)
    assert await tracker.claim_notifications("other") == ()
    with pytest.raises(NotificationClaimed) as caught:
        await tracker.ack_notification(first.id, "other")
    assert caught.value.claimed_by == "alerts"
    assert caught.value.lease_until == first.lease_until
    done = await tracker.ack_notification(first.id, "alerts")
    assert isinstance(done, NotificationAck)
    assert (done.id, done.duplicate, done.acked_by) == (first.id, False, "alerts")
    again = await tracker.ack_notification(first.id, "alerts")
    assert (again.duplicate, again.acked_at) == (True, done.acked_at)
    with pytest.raises(NotificationNotFound):
        await tracker.ack_notification(first.id + 1_000, "alerts")


@pytest.mark.parametrize(
    ("call_it", "argument"),
    [
        (lambda t: t.claim_notifications(" "), "consumer"),
        (lambda t: t.claim_notifications("c", 0), "limit"),
        (lambda t: t.claim_notifications("c", 1001), "limit"),
        (lambda t: t.claim_notifications("c", lease=0), "lease"),
        (lambda t: t.claim_notifications("c", lease=True), "lease"),
        (lambda t: t.ack_notification(0, "c"), "notification_id"),
        (lambda t: t.ack_notification(1, ""), "consumer"),
    ],
)
async def test_claim_and_ack_check_their_arguments_first(
    tracker: TokenTracker, call_it: Callable[[TokenTracker], Awaitable[Any]], argument: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await call_it(tracker)
    assert caught.value.argument == argument


def test_the_stream_checks_its_arguments(tracker: TokenTracker) -> None:
    for kwargs, argument in (
        ({"batch": 0}, "batch"),
        ({"lease": -1}, "lease"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"listen": 1}, "listen"),
    ):
        with pytest.raises(InvalidArgument) as caught:
            tracker.notifications("c", **kwargs)
        assert caught.value.argument == argument
    with pytest.raises(InvalidArgument):
        tracker.notifications("")


# --------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------


async def test_the_stream_is_woken_by_notify_and_acks_when_the_loop_asks_for_the_next(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    # A poll interval far beyond the bound: only a NOTIFY can wake the stream in time.
    stream = tracker.notifications("alerts", poll_interval=3_600)
    consumer = Consumer(stream)
    try:
        await eventually(lambda: _true(stream.listening))
        await asyncio.sleep(0)  # the stream is waiting (nothing was due)
        consumer.proceed.clear()
        await cross(conn, [80])
        first = await consumer.next()
        assert (first.threshold, first.attempts) == (80, 1)
        assert await acked(conn, first.id) is None  # its loop body has not returned yet
        consumer.proceed.set()
        await eventually(lambda: _is(acked(conn, first.id), "alerts"))
        # A second crossing, later: woken again.
        await cross(conn, [100])
        second = await consumer.next()
        assert second.threshold == 100
        await eventually(lambda: _is(acked(conn, second.id), "alerts"))
        assert stream.reconnects == 0
    finally:
        await consumer.stop()
    listeners = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND query LIKE 'LISTEN%' AND state = 'idle'"
    )
    assert listeners == 0  # closing the stream released (and reset) its connection


async def test_leaving_the_loop_leaves_the_current_notification_to_be_handed_out_again(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    await cross(conn, [50, 80, 100])
    stream = tracker.notifications("quits", batch=2, lease=0.3, listen=False, poll_interval=0.05)
    seen: list[Notification] = []
    async with stream:
        async for notification in stream:
            seen.append(notification)
            if len(seen) == 2:
                break  # the second one's body did not finish normally
    assert [n.threshold for n in seen] == [50, 80]
    assert await acked(conn, seen[0].id) == "quits"
    assert await acked(conn, seen[1].id) is None
    # Once the lease lapsed another consumer gets it (and the one never claimed).
    await eventually(lambda: _later_than_lease(conn, seen[1].id))
    again = await tracker.claim_notifications("takes-over")
    assert [(n.id, n.attempts) for n in again] == [(seen[1].id, 2), (seen[1].id + 1, 1)]


async def test_explicit_acks_without_auto_ack(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    await cross(conn, [50, 100])
    stream = tracker.notifications("manual", auto_ack=False, listen=False, poll_interval=0.05)
    seen: list[Notification] = []
    async with stream:
        async for notification in stream:
            seen.append(notification)
            if notification.threshold == 50:
                assert (await stream.ack(notification)).duplicate is False
            if len(seen) == 2:
                break
    assert await acked(conn, seen[0].id) == "manual"
    assert await acked(conn, seen[1].id) is None  # never acknowledged: auto_ack is off


async def test_without_listen_the_stream_polls(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    stream = tracker.notifications("poller", listen=False, poll_interval=0.05)
    consumer = Consumer(stream)
    try:
        await asyncio.sleep(0.1)
        assert stream.listening is False
        await cross(conn, [80])
        notification = await consumer.next()
        assert notification.threshold == 80
        await eventually(lambda: _is(acked(conn, notification.id), "poller"))
    finally:
        await consumer.stop()


async def test_the_stream_listens_again_after_its_connection_is_terminated(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    stream = tracker.notifications("survives", poll_interval=3_600)
    consumer = Consumer(stream)
    try:
        await eventually(lambda: _true(stream.listening))
        pid = await conn.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
        )
        assert pid is not None
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid) is True
        await eventually(lambda: _true(stream.reconnects == 1 and stream.listening))
        # Listening on its new connection: a NOTIFY still wakes it long before any poll.
        await cross(conn, [80])
        notification = await consumer.next()
        assert notification.threshold == 80
        await eventually(lambda: _is(acked(conn, notification.id), "survives"))
    finally:
        await consumer.stop()


async def test_on_a_single_connection_the_stream_listens_on_it(
    connect: Connect, conn: asyncpg.Connection
) -> None:
    single = await connect()
    tracker = TokenTracker(single, retry=NO_RETRY)
    stream = tracker.notifications("single", poll_interval=3_600)
    consumer = Consumer(stream)
    try:
        await eventually(lambda: _true(stream.listening))
        await cross(conn, [80])
        notification = await consumer.next()
        await eventually(lambda: _is(acked(conn, notification.id), "single"))
        # Its one connection lost: the stream cannot replace it and raises.
        await conn.execute("SELECT pg_terminate_backend($1)", single.get_server_pid())
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(consumer.task, BOUND)
    finally:
        if not consumer.task.done():
            await consumer.stop()


async def test_the_stream_over_a_fast_retry_pool_survives_a_terminated_claim_connection(
    pool: asyncpg.Pool[Any], conn: asyncpg.Connection
) -> None:
    """Terminating every backend but the test's own (the claims' pool connections too): the
    stream's calls are retried on new connections and it goes on."""
    tracker = TokenTracker(pool, retry=FAST_RETRY)
    stream = tracker.notifications("robust", poll_interval=0.05)
    consumer = Consumer(stream)
    try:
        await cross(conn, [50])
        first = await consumer.next()
        await eventually(lambda: _is(acked(conn, first.id), "robust"))
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        await cross(conn, [50])
        second = await consumer.next()
        await eventually(lambda: _is(acked(conn, second.id), "robust"))
        await eventually(lambda: _true(stream.listening))
    finally:
        await consumer.stop()


async def _true(value: bool) -> bool:
    return value


async def _is(value: Awaitable[object], expected: object) -> bool:
    return await value == expected


async def _later_than_lease(conn: asyncpg.Connection, notification_id: int) -> bool:
    lapsed: bool = await conn.fetchval(
        "SELECT lease_until <= clock_timestamp() FROM tokentrack.notifications WHERE id = $1",
        notification_id,
    )
    return lapsed
