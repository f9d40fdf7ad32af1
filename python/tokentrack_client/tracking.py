"""``ReportTracker``: the report lifecycle as an async context manager.

::

    async with tracker.track_report(account_id, report_id, estimated_tokens=40_000) as report:
        for name in ("AN0", "AN2", "AN5"):
            reply = await llm.complete(name, ...)
            await report.step(name, input_tokens=reply.input_tokens,
                              output_tokens=reply.output_tokens, model=reply.model)

=====================================  =============================================
how the block ends                     what the report becomes
=====================================  =============================================
normally                               ``complete``, billed
an exception                           ``failed`` (the exception's message), billed;
                                       the exception propagates
the task is cancelled                  ``cancelled``, billed while shielded from the
                                       cancellation; ``CancelledError`` propagates
a step after ``cancel_report``         the step is recorded (billed late), then
                                       ``step()`` raises :class:`ReportCancelled`;
                                       the report stays ``cancelled``
a step past the reservation, with      the step is recorded, then ``step()`` raises
``on_overrun="raise"``                 :class:`ReservationExceeded`: ``failed``,
                                       billed (as any exception)
=====================================  =============================================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Iterable
from types import TracebackType
from typing import Final, Literal, Protocol, TypeAlias, TypeVar, cast

from tokentrack_client.answers import get_optional_int
from tokentrack_client.contract import ERROR_MESSAGE_MAX
from tokentrack_client.errors import (
    InvalidArgument,
    ReportFinalized,
    ReservationNotFound,
    TokenTrackError,
)
from tokentrack_client.results import Extension, Reservation, Settlement, StepRecord
from tokentrack_client.usage import Usage
from tokentrack_client.validation import (
    IdLike,
    check_count,
    check_estimate,
    check_id,
    check_mode,
    check_subjects,
)

__all__ = [
    "ON_OVERRUN",
    "OnOverrun",
    "ReportCalls",
    "ReportCancelled",
    "ReportEnded",
    "ReportTracker",
    "ReservationExceeded",
    "run_to_completion",
]

logger = logging.getLogger("tokentrack_client")

T = TypeVar("T")


class ReportEnded(TokenTrackError):
    """The report was given an outcome from outside while the generator was still running.

    Raised by :meth:`ReportTracker.step` *after* the step was recorded (and billed as late
    usage, so nothing is lost): spend no more tokens. ``status`` is the outcome the report
    has, ``step`` the result of the step just recorded.
    """

    def __init__(self, report_id: uuid.UUID, status: str, step: StepRecord | None = None) -> None:
        super().__init__(f"report {report_id} was ended from outside as {status}")
        self.report_id = report_id
        self.status = status
        self.step = step


class ReportCancelled(ReportEnded):
    """The report was cancelled from outside (``cancel_report``, a cancel button)."""


OnOverrun: TypeAlias = Literal["ignore", "raise"]
"""What :meth:`ReportTracker.step` does with a step that finds the report past its
reservation: ``ignore`` it (the :class:`StepRecord` says ``over_reservation``) or ``raise``
:class:`ReservationExceeded`."""

ON_OVERRUN: Final = ("ignore", "raise")
"""The values of :data:`OnOverrun`."""


class ReservationExceeded(TokenTrackError):
    """A step took the report's recorded tokens past its reservation
    (``track_report(..., on_overrun="raise")``).

    Raised by :meth:`ReportTracker.step` *after* the step was recorded (billing stays the
    actual usage, so nothing is lost); leaving the block with it marks the report ``failed``
    and bills it once, as any exception does. ``step`` is the step's :class:`StepRecord`,
    ``over_by`` how many tokens the report's recorded total is past its reservation,
    ``reserved_tokens`` what it reserved (extensions included) and ``recorded_tokens`` what
    its steps recorded.
    """

    def __init__(self, report_id: uuid.UUID, step: StepRecord) -> None:
        self.report_id = report_id
        self.step = step
        self.over_by: int = step.over_by or 0
        self.reserved_tokens: int | None = get_optional_int(step.answer, "reserved_tokens")
        self.recorded_tokens: int | None = get_optional_int(step.answer, "recorded_tokens")
        super().__init__(
            f"report {report_id} is {self.over_by} tokens over its reservation "
            f"({self.recorded_tokens} recorded, {self.reserved_tokens} reserved)"
        )


class ReportCalls(Protocol):
    """The calls a :class:`ReportTracker` makes; :class:`~tokentrack_client.TokenTracker`
    has them. (A protocol, so that this module needs nothing of the client's.)"""

    async def try_reserve(
        self,
        account_id: IdLike,
        report_id: IdLike,
        estimated_tokens: int,
        *,
        subjects: Iterable[str] = (),
        mode: str | None = None,
        cost_micros: int | None = None,
        model: str | None = None,
    ) -> Reservation: ...

    async def extend_reservation(
        self,
        report_id: IdLike,
        account_id: IdLike,
        tokens: int,
        *,
        cost_micros: int | None = None,
        model: str | None = None,
    ) -> Extension: ...

    async def persist_step(
        self,
        report_id: IdLike,
        account_id: IdLike,
        step_name: str,
        input_tokens: int,
        output_tokens: int,
        total_tokens: int | None = None,
        model: str | None = None,
    ) -> StepRecord: ...

    async def record_step(
        self,
        report_id: IdLike,
        account_id: IdLike,
        step_name: str,
        usage: Usage,
        model: str | None = None,
    ) -> StepRecord: ...

    async def finish_report(
        self,
        report_id: IdLike,
        account_id: IdLike,
        status: str,
        error_message: str | None = None,
    ) -> Settlement: ...


async def _wait_shielded(task: asyncio.Future[T]) -> bool:
    """Wait until ``task`` is done, shielded from cancellation; True if we were cancelled."""
    interrupted = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                interrupted = True
        except BaseException:  # the task's own exception: the caller reads it from the task
            break
    return interrupted


async def run_to_completion(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` to the end even if the calling task is cancelled meanwhile.

    The work runs in a task of its own behind :func:`asyncio.shield`; a cancellation of the
    caller does not interrupt it. Once it is done, a cancellation that arrived meanwhile is
    raised as ``CancelledError``; otherwise its result is returned (or its exception raised).
    """
    task = asyncio.ensure_future(awaitable)
    if await _wait_shielded(task):
        if not task.cancelled() and task.exception() is not None:
            logger.warning("tokentrack: shielded work failed: %s", task.exception())
        raise asyncio.CancelledError
    return task.result()


class ReportTracker:
    """One report's lifecycle; made by :meth:`TokenTracker.track_report`.

    Entering reserves the estimate (:meth:`TokenTracker.try_reserve`); :meth:`step` records
    each finished step; leaving sets the outcome and bills the report in one call
    (:meth:`TokenTracker.finish_report`). After the block, ``status`` is the report's outcome
    and ``settlement`` what it billed (``None`` when the report was ended from outside).

    Steps may be recorded concurrently (``asyncio.gather`` over parallel LLM calls). A block
    re-entered with the same ``report_id`` after a crash resumes the same reservation; steps
    recorded again with the same numbers are answered as duplicates.

    ``subjects``, ``mode``, ``cost_micros`` and ``model`` go to the reservation as
    :meth:`TokenTracker.try_reserve` takes them; ``on_overrun`` says what :meth:`step` does
    with a step that finds the report past its reservation (:data:`OnOverrun`).
    """

    def __init__(
        self,
        tracker: ReportCalls,
        account_id: IdLike,
        report_id: IdLike,
        estimated_tokens: int,
        *,
        subjects: Iterable[str] = (),
        mode: str | None = None,
        cost_micros: int | None = None,
        model: str | None = None,
        on_overrun: OnOverrun = "ignore",
    ) -> None:
        self._tracker = tracker
        self.account_id: uuid.UUID = check_id("account_id", account_id)
        self.report_id: uuid.UUID = check_id("report_id", report_id)
        self.estimated_tokens: int = check_count("estimated_tokens", estimated_tokens, minimum=1)
        self.subjects: tuple[str, ...] = check_subjects(subjects)
        self.mode: str | None = check_mode(mode)
        check_estimate(self.estimated_tokens, cost_micros, model)
        self._cost_micros = cost_micros
        self._model = model
        if on_overrun not in ON_OVERRUN:
            raise InvalidArgument(
                "on_overrun", f"on_overrun must be 'ignore' or 'raise', not {on_overrun!r}"
            )
        self.on_overrun: OnOverrun = on_overrun
        self.reservation: Reservation | None = None
        self.extensions: list[Extension] = []
        self.settlement: Settlement | None = None
        self.status: str | None = None
        self.steps: list[StepRecord] = []
        self._entered = False
        self._exited = False
        self._ended_from_outside: str | None = None

    @property
    def tokens_recorded(self) -> int:
        """Total tokens of the steps recorded through this tracker, with or without ``usage``
        (each step's ``total_tokens`` as the server recorded it; duplicates counted once)."""
        return sum(step.total_tokens for step in self.steps if not step.duplicate)

    @property
    def reserved_tokens(self) -> int | None:
        """What the reservation holds now: the last extension's ``reserved_tokens``, else the
        reservation's (``None`` before entering)."""
        if self.extensions:
            return self.extensions[-1].reserved_tokens
        return None if self.reservation is None else self.reservation.reserved_tokens

    @property
    def ended_from_outside(self) -> str | None:
        """The outcome the report was given from outside (e.g. ``cancelled``), if any."""
        return self._ended_from_outside

    async def __aenter__(self) -> ReportTracker:
        if self._entered:
            raise RuntimeError("a ReportTracker can be entered only once")
        self._entered = True
        try:
            self.reservation = await self._tracker.try_reserve(
                self.account_id,
                self.report_id,
                self.estimated_tokens,
                subjects=self.subjects,
                mode=self.mode,
                cost_micros=self._cost_micros,
                model=self._model,
            )
        except asyncio.CancelledError:
            # The reservation may have been granted just before the cancellation: end the
            # report so that the reservation does not hold the budget until it expires.
            try:
                await run_to_completion(self._cancel_after_interrupted_reserve())
            except TokenTrackError as exc:
                logger.warning("tokentrack: report %s: %s", self.report_id, exc)
            raise
        return self

    async def _cancel_after_interrupted_reserve(self) -> None:
        with contextlib.suppress(ReservationNotFound, ReportFinalized):
            await self._tracker.finish_report(self.report_id, self.account_id, "cancelled")

    async def step(
        self,
        name: str,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        total_tokens: int | None = None,
        model: str | None = None,
        *,
        usage: Usage | None = None,
    ) -> StepRecord:
        """Record one finished step (``total_tokens`` defaults to input + output).

        With ``usage`` (a :class:`Usage`: the tokens by class, e.g.
        ``Usage.from_anthropic(message)``) instead of the token counts, the step is recorded
        through :meth:`TokenTracker.record_step` and priced by ``model``; giving ``usage``
        together with ``input_tokens``, ``output_tokens`` or ``total_tokens`` raises
        :class:`InvalidArgument`.

        Returns the :class:`StepRecord`. When the report was ended from outside meanwhile
        (``cancel_report``), the step is still recorded and billed, then this raises
        :class:`ReportCancelled` (:class:`ReportEnded` for another outcome): stop spending
        tokens. Raises :class:`StepConflict` when the step was recorded before with other
        numbers, and :class:`InvalidArgument` for bad numbers. With ``on_overrun="raise"``,
        a step whose answer says the report is past its reservation (``over_reservation``)
        raises :class:`ReservationExceeded` once it is recorded.
        """
        self._require_running("step")
        if usage is not None:
            given = [
                label
                for label, value in (
                    ("input_tokens", input_tokens),
                    ("output_tokens", output_tokens),
                    ("total_tokens", total_tokens),
                )
                if value is not None
            ]
            if given:
                raise InvalidArgument(
                    "usage",
                    f"step() takes usage or the token counts, not both (got usage and "
                    f"{', '.join(given)})",
                )
            record = await self._tracker.record_step(
                self.report_id, self.account_id, name, usage, model
            )
        else:
            # A count left out (None) reaches persist_step's own check, which refuses it with
            # InvalidArgument naming it, as it did before usage= existed.
            record = await self._tracker.persist_step(
                self.report_id,
                self.account_id,
                name,
                cast(int, input_tokens),
                cast(int, output_tokens),
                total_tokens,
                model,
            )
        self.steps.append(record)
        if record.report_status is not None:
            self._ended_from_outside = record.report_status
            if record.report_status == "cancelled":
                raise ReportCancelled(self.report_id, record.report_status, record)
            raise ReportEnded(self.report_id, record.report_status, record)
        if record.over_reservation and self.on_overrun == "raise":
            raise ReservationExceeded(self.report_id, record)
        return record

    async def extend(
        self, tokens: int, *, cost_micros: int | None = None, model: str | None = None
    ) -> Extension:
        """Raise the report's reservation by ``tokens`` (and ``cost_micros``, or the tokens
        priced by ``model``) mid-report: :meth:`TokenTracker.extend_reservation`. Returns
        the :class:`Extension` (also appended to ``extensions``); raises its refusals
        (:class:`InsufficientTokens`, :class:`InsufficientBudget`, :class:`ReportFinalized`
        once the report was ended from outside), after which the report goes on with what it
        holds."""
        self._require_running("extend")
        extension = await self._tracker.extend_reservation(
            self.report_id, self.account_id, tokens, cost_micros=cost_micros, model=model
        )
        self.extensions.append(extension)
        return extension

    def _require_running(self, method: str) -> None:
        if not self._entered or self.reservation is None:
            raise RuntimeError(
                f"{method}() needs the report to be entered: `async with ... as report`"
            )
        if self._exited:
            raise RuntimeError(f"report {self.report_id} is already finished")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._exited = True
        if self._ended_from_outside is not None:
            # A step learnt that the report already has an outcome: it is billed; nothing to set.
            self.status = self._ended_from_outside
            return
        if exc is None:
            status, message = "complete", None
        elif isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
            status, message = "cancelled", None
        else:
            status, message = "failed", _error_message(exc)
        task = asyncio.ensure_future(self._finish(status, message))
        interrupted = await _wait_shielded(task)
        try:
            self.settlement = task.result()
            self.status = status
        except ReportFinalized as refused:
            # Ended from outside after the last step (e.g. cancelled): it is billed already.
            ended = refused.report_status or "unknown"
            self.status = self._ended_from_outside = ended
            if exc is None and not interrupted:
                if ended == "cancelled":
                    raise ReportCancelled(self.report_id, ended) from refused
                raise ReportEnded(self.report_id, ended) from refused
        except TokenTrackError as failed:
            if exc is None and not interrupted:
                raise
            # Keep the block's own exception; the reservation expires and the sweep bills it.
            logger.error(
                "tokentrack: report %s could not be marked %s: %s", self.report_id, status, failed
            )
            if exc is not None:
                exc.add_note(f"tokentrack: the report could not be marked {status}: {failed}")
        if interrupted and not isinstance(exc, asyncio.CancelledError):
            # Cancelled while the outcome was being recorded: honour it now that it is.
            raise asyncio.CancelledError

    async def _finish(self, status: str, message: str | None) -> Settlement:
        return await self._tracker.finish_report(self.report_id, self.account_id, status, message)


def _error_message(exc: BaseException) -> str:
    """The message kept on a failed report: the exception's text, else its type's name."""
    text = str(exc).strip() or type(exc).__name__
    if len(text) > ERROR_MESSAGE_MAX:
        text = text[: ERROR_MESSAGE_MAX - 1] + "…"
    return text.replace("\x00", "")
