"""``tokentrack notifications --consumer NAME [--follow] [--limit N]``: deliver notifications.

Each notification is printed as one JSON line (:meth:`~tokentrack_client.Notification.as_json`)
and acknowledged right after the line is written and flushed (``ack_notification``), so a
consumer killed between the two prints it again later: delivery is at least once. Without
``--follow`` it claims at most ``--limit`` (default 100) once and stops; with ``--follow`` it
runs the client's :meth:`~tokentrack_client.TokenTracker.notifications` stream (LISTEN for
``NOTIFY tokentrack_notifications``, polling every ``--poll-interval`` seconds, listening
again after losing its connection: a pool of at most 2 connections) until interrupted, or
until it delivered ``--limit`` notifications when that is given.

A notification whose lease lapsed while it was printed and that another consumer claimed
meanwhile is not acknowledged here (``notification_claimed``): a notice on stderr says so.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Final

import asyncpg

from tokentrack_client import connection
from tokentrack_client.client import TokenTracker
from tokentrack_client.connection import CLOSE_TIMEOUT, describe_target
from tokentrack_client.contract import LEASE_MAX, NOTIFICATIONS_CLAIM_MAX
from tokentrack_client.errors import (
    InvalidArgument,
    NotificationClaimed,
    Refusal,
    TokenTrackError,
)
from tokentrack_client.ops._common import OpsError, connected, require_installed
from tokentrack_client.results import Notification
from tokentrack_client.retry import NO_RETRY
from tokentrack_client.validation import check_count, check_seconds, check_text

__all__ = ["DEFAULT_LIMIT", "deliver"]

DEFAULT_LIMIT: Final = 100
"""How many notifications ``tokentrack notifications`` claims without ``--follow``."""

_APPLICATION: Final = "tokentrack notifications"


def _argument(exc: InvalidArgument) -> OpsError:
    return OpsError(f"--{(exc.argument or 'argument').replace('_', '-')}: {exc}")


async def deliver(
    dsn: str,
    consumer: str,
    *,
    follow: bool,
    limit: int | None,
    lease: float | None,
    poll_interval: float,
    line: Callable[[str], None],
    notice: Callable[[str], None],
) -> int:
    """Claim, print (``line``) and acknowledge notifications for ``consumer``; return how
    many were printed. ``notice`` gets the one-line notices (an acknowledgement refused)."""
    try:
        check_text("consumer", consumer, required=True)
        if limit is not None:
            check_count("limit", limit, minimum=1, maximum=2**31 - 1)
        if lease is not None:
            check_seconds("lease", lease, maximum=LEASE_MAX)
        check_seconds("poll_interval", poll_interval, maximum=LEASE_MAX)
    except InvalidArgument as exc:
        raise _argument(exc) from exc
    async with connected(dsn, _APPLICATION) as conn:
        await require_installed(conn, table="notifications")
        if not follow:
            tracker = TokenTracker(conn, retry=NO_RETRY)
            count = min(limit or DEFAULT_LIMIT, NOTIFICATIONS_CLAIM_MAX)
            try:
                claimed = await tracker.claim_notifications(consumer, count, lease=lease)
            except TokenTrackError as exc:
                raise OpsError(f"{describe_target(dsn)}: {exc}") from exc
            for notification in claimed:
                await _print_and_ack(tracker, notification, consumer, dsn, line, notice)
            return len(claimed)
    return await _follow(dsn, consumer, limit, lease, poll_interval, line, notice)


async def _follow(
    dsn: str,
    consumer: str,
    limit: int | None,
    lease: float | None,
    poll_interval: float,
    line: Callable[[str], None],
    notice: Callable[[str], None],
) -> int:
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=2,
            timeout=connection.connect_timeout(),
            server_settings={"application_name": _APPLICATION},
        )
    except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
        raise OpsError(f"cannot connect to {describe_target(dsn)}: {exc}") from exc
    delivered = 0
    try:
        tracker = TokenTracker(pool)
        stream = tracker.notifications(
            consumer,
            batch=min(limit or 10, 10),
            lease=lease,
            poll_interval=poll_interval,
            auto_ack=False,
        )
        async with stream:
            async for notification in stream:
                await _print_and_ack(tracker, notification, consumer, dsn, line, notice)
                delivered += 1
                if limit is not None and delivered >= limit:
                    break
    except TokenTrackError as exc:
        raise OpsError(f"{describe_target(dsn)}: {exc}") from exc
    finally:
        try:
            await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT)
        except (TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresError, OSError):
            pool.terminate()
    return delivered


async def _print_and_ack(
    tracker: TokenTracker,
    notification: Notification,
    consumer: str,
    dsn: str,
    line: Callable[[str], None],
    notice: Callable[[str], None],
) -> None:
    line(json.dumps(notification.as_json(), sort_keys=True))
    try:
        await tracker.ack_notification(notification.id, consumer)
    except NotificationClaimed as exc:
        notice(
            f"notification {notification.id} was not acknowledged: its lease lapsed and "
            f"{exc.claimed_by} claimed it meanwhile"
        )
    except Refusal as exc:
        notice(f"notification {notification.id} was not acknowledged: {exc}")
    except TokenTrackError as exc:
        raise OpsError(f"{describe_target(dsn)}: {exc}") from exc
