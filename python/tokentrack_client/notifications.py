"""``tracker.notifications(consumer)``: the soft-threshold notifications as an async iterator.

::

    async with tracker.notifications("alerts") as stream:
        async for n in stream:
            await send_to_slack(n)        # acknowledged when the loop asks for the next one

The stream claims notifications for ``consumer`` (``claim_notifications``, a batch of at most
``batch`` at a time, each under a lease of ``lease`` seconds) and yields them one by one as
:class:`~tokentrack_client.Notification`. Delivery is at least once:

* A notification is acknowledged (``ack_notification``) when the loop body that received it
  returns and the loop asks for the next one, or earlier with ``await stream.ack(n)``. With
  ``auto_ack=False`` only :meth:`NotificationStream.ack` acknowledges.
* Leaving the loop (``break``, an exception, cancellation, the process dying) leaves the
  current notification, and the rest of its batch, unacknowledged: once their leases lapse,
  the next claim (this consumer's or another's) hands them out again. Choose ``lease`` longer
  than a batch takes to handle.

Waiting: when nothing is due, the stream waits for ``NOTIFY tokentrack_notifications`` (sent
when a crossing commits) on a dedicated connection that LISTENs, and claims again when one
arrives, or after ``poll_interval`` seconds at the latest (polling: a NOTIFY sent while the
connection was away is not lost, only late). With a pool the dedicated connection is one of
the pool's, held while the stream runs; when it is lost the stream polls and takes another
one at its next wait (``reconnects`` counts how often it listened again). With a single
connection the stream LISTENs on it (the calls share it); when that connection breaks the
stream raises :class:`~tokentrack_client.ConnectionLost`, as every call does. ``listen=False``
only polls (behind PgBouncer in transaction pooling mode, where LISTEN does not work).

Transient failures of a claim or an acknowledgement (the server restarting, a lost connection
that outlived the tracker's retry policy) are logged and the stream carries on after
``poll_interval``; a notification whose acknowledgement failed is handed out again when its
lease lapses. Every other error (permission denied, not installed) ends the iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Protocol

import asyncpg

from tokentrack_client.errors import CallTimeout, Refusal, TransientError
from tokentrack_client.results import Notification, NotificationAck

__all__ = ["CHANNEL", "DEFAULT_BATCH", "DEFAULT_POLL_INTERVAL", "NotificationStream"]

logger = logging.getLogger("tokentrack_client")

CHANNEL: Final = "tokentrack_notifications"
"""The channel a crossing NOTIFYs (after its transaction commits)."""

DEFAULT_BATCH: Final = 10
"""How many notifications the stream claims at a time."""

DEFAULT_POLL_INTERVAL: Final = 5.0
"""Seconds between claims when no NOTIFY arrives (and while the stream does not listen)."""


class _Tracker(Protocol):
    """What the stream needs of :class:`~tokentrack_client.TokenTracker`."""

    async def claim_notifications(
        self, consumer: str, limit: int = ..., *, lease: float | None = ...
    ) -> tuple[Notification, ...]: ...

    async def ack_notification(self, notification_id: int, consumer: str) -> NotificationAck: ...


@dataclass(frozen=True)
class ListenSource:
    """Where the stream gets its listening connection: ``acquire`` gives one, ``release``
    gives it back; ``replaceable`` is false for a tracker on a single connection (a lost one
    cannot be replaced), ``closed`` tells whether the tracker's own connection is gone."""

    acquire: Callable[[], Awaitable[Any]]
    release: Callable[[Any], Awaitable[None]]
    replaceable: bool
    closed: Callable[[], bool]


class _State:
    """The running stream's state, shared by :class:`NotificationStream` and its generator
    (the generator does not reference the stream, so a dropped stream is finalised at once)."""

    def __init__(self) -> None:
        self.wake = asyncio.Event()
        self.connection: Any = None
        self.lost = False
        self.listening = False
        self.reconnects = 0
        self.listened = False
        self.current: Notification | None = None
        self.current_acked = False


class NotificationStream:
    """An async iterator of :class:`~tokentrack_client.Notification` for one consumer; see
    the module's documentation. Made by :meth:`TokenTracker.notifications`; also an async
    context manager (``async with``) that closes it on exit, releasing its listening
    connection."""

    def __init__(
        self,
        tracker: _Tracker,
        source: ListenSource,
        consumer: str,
        *,
        batch: int,
        lease: float | None,
        poll_interval: float,
        listen: bool,
        auto_ack: bool,
    ) -> None:
        self._tracker = tracker
        self._consumer = consumer
        self._state = _State()
        self._generator = _run(
            tracker,
            source,
            self._state,
            consumer,
            batch=batch,
            lease=lease,
            poll_interval=poll_interval,
            listen=listen,
            auto_ack=auto_ack,
        )

    @property
    def consumer(self) -> str:
        """The consumer name the stream claims and acknowledges as."""
        return self._consumer

    @property
    def listening(self) -> bool:
        """Whether the stream LISTENs now (false while it only polls)."""
        return self._state.listening

    @property
    def reconnects(self) -> int:
        """How many times the stream listened again after losing its listening connection."""
        return self._state.reconnects

    def __aiter__(self) -> NotificationStream:
        return self

    async def __anext__(self) -> Notification:
        return await self._generator.__anext__()

    async def ack(self, notification: Notification) -> NotificationAck:
        """Acknowledge ``notification`` now (the stream then does not acknowledge it again).
        Raises :class:`~tokentrack_client.NotificationClaimed` when another consumer's live
        lease holds it (this one's lease lapsed and it was handed out again)."""
        done = await self._tracker.ack_notification(notification.id, self._consumer)
        if self._state.current is not None and self._state.current.id == notification.id:
            self._state.current_acked = True
        return done

    async def aclose(self) -> None:
        """Stop: release the listening connection; the current notification, unless it was
        acknowledged, is handed out again when its lease lapses."""
        await self._generator.aclose()

    async def __aenter__(self) -> NotificationStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


async def _run(
    tracker: _Tracker,
    source: ListenSource,
    state: _State,
    consumer: str,
    *,
    batch: int,
    lease: float | None,
    poll_interval: float,
    listen: bool,
    auto_ack: bool,
) -> AsyncGenerator[Notification, None]:
    def on_notify(*_args: object) -> None:
        state.wake.set()

    def on_lost(*_args: object) -> None:
        state.lost = True
        state.listening = False
        state.wake.set()

    async def start_listening() -> bool:
        try:
            connection = await source.acquire()
        except Exception as exc:  # the pool cannot give one now: poll, try again later
            logger.warning("tokentrack notifications: cannot listen (%s), polling", exc)
            return False
        try:
            await connection.add_listener(CHANNEL, on_notify)
            connection.add_termination_listener(on_lost)
        except Exception as exc:
            logger.warning("tokentrack notifications: LISTEN failed (%s), polling", exc)
            await _quietly(source.release(connection))
            return False
        state.connection, state.lost, state.listening = connection, False, True
        if state.listened:
            state.reconnects += 1
        state.listened = True
        return True

    async def stop_listening() -> None:
        connection, state.connection, state.listening = state.connection, None, False
        if connection is None:
            return
        if not _is_closed(connection):
            await _quietly(connection.remove_listener(CHANNEL, on_notify))
            connection.remove_termination_listener(on_lost)
        await _quietly(source.release(connection))

    async def claim() -> Sequence[Notification]:
        try:
            return await tracker.claim_notifications(consumer, batch, lease=lease)
        except (TransientError, CallTimeout) as exc:
            if not source.replaceable and source.closed():
                raise
            logger.warning("tokentrack notifications: claim failed (%s), retrying", exc)
            await asyncio.sleep(poll_interval)
            return ()

    async def acknowledge(notification: Notification) -> None:
        try:
            await tracker.ack_notification(notification.id, consumer)
        except (TransientError, CallTimeout, Refusal) as exc:
            if isinstance(exc, TransientError) and not source.replaceable and source.closed():
                raise
            logger.warning(
                "tokentrack notifications: acknowledging %d failed (%s); it is handed out "
                "again when its lease lapses",
                notification.id,
                exc,
            )

    async def wait() -> None:
        if listen:
            connection = state.connection
            if connection is not None and (state.lost or _is_closed(connection)):
                await stop_listening()
                if not source.replaceable:
                    return  # the tracker's one connection is gone: the next claim raises
            if state.connection is None and source.replaceable and await start_listening():
                return  # claim at once: a NOTIFY may have been missed while not listening
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.wake.wait(), poll_interval)

    try:
        if listen:
            await start_listening()
        while True:
            state.wake.clear()
            claimed = await claim()
            for notification in claimed:
                state.current, state.current_acked = notification, False
                yield notification
                if auto_ack and not state.current_acked:
                    await acknowledge(notification)
                state.current = None
            if len(claimed) < batch:
                await wait()
    finally:
        await stop_listening()


async def _quietly(call: Awaitable[object]) -> None:
    try:
        await call
    except Exception as exc:
        logger.debug("tokentrack notifications: %s", exc)


def _is_closed(connection: Any) -> bool:
    """Whether the connection is gone (a pool's proxy detaches itself when its connection
    breaks, and then answers every method with InterfaceError)."""
    try:
        closed: bool = connection.is_closed()
    except asyncpg.InterfaceError:
        return True
    return closed
