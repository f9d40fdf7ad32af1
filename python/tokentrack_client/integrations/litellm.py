"""LiteLLM calls billed exactly once: :class:`TrackedLiteLLM` wraps ``litellm.acompletion``.

::

    from tokentrack_client.integrations.litellm import TrackedLiteLLM

    llm = TrackedLiteLLM(tracker, default_max_tokens=1_000)
    response = await llm.acompletion(account_id=account, model="gpt-4o-mini",
                                     messages=[{"role": "user", "content": "Hello"}],
                                     max_tokens=200)

Each call reserves its worst case *before* the provider is called (a refusal such as
:class:`~tokentrack_client.InsufficientTokens` is raised and the provider never sees the
request), records the provider's usage as one step with its token classes and model (so its
cost is computed by ``record_step``), and ends its report exactly once, whatever happens:
the call returns, the provider raises, the task is cancelled, or a stream is abandoned half
way. :meth:`TrackedLiteLLM.step` does the same inside a report of the caller's own
(``async with tracker.track_report(...) as report``), as one step of it.

Why a wrapper, and not a LiteLLM callback (``CustomLogger``)
-----------------------------------------------------------

LiteLLM offers two extension points for accounting: wrapping the call, or registering a
``CustomLogger`` whose ``async_log_success_event`` / ``async_log_failure_event`` run after
the call. Only the wrapper can make the accounting exact:

* **Reserve before the call.** A budget must refuse a request before the provider bills it.
  A callback hears of the call only once it is made (``log_pre_api_call`` cannot refuse it);
  the refusing hooks (``async_pre_call_hook``) belong to LiteLLM's proxy, not to the SDK.
  The wrapper awaits the reservation, and the provider call happens only once it is granted.
* **Callbacks are best effort.** LiteLLM runs the success handlers in background tasks
  (``litellm_core_utils/logging_worker.py`` in litellm 1.110.2: "best-effort with bounded
  queues", a time limit per callback), so an event can be dropped or arrive after the
  process that should record it is gone, and handlers have run twice or raced each other:
  BerriAI/litellm#15740 (``/v1/responses`` spend logged twice), #34875 (streaming: the sync
  and async success handlers race on the call's details, callbacks read
  ``response_cost=None`` and record $0), #34953 (streaming ``/v1/messages`` dropped every
  success callback: spend lost). The wrapper records the usage in the caller's own task,
  awaited, before the call returns, and ``record_step`` is idempotent per (report, step
  name): a retried write answers ``duplicate`` instead of counting twice.
* **Cancellation.** A cancelled request raises ``CancelledError`` (a ``BaseException``),
  which ``except Exception`` cleanup misses; LiteLLM's own proxy leaked its budget
  reservations that way (BerriAI/litellm#27639, phantom reservations pinning the counter;
  #30519/#30522, released on cancellation since). No callback runs when a caller abandons a
  stream half way. The wrapper ends its report through :class:`~tokentrack_client.ReportTracker`,
  whose outcome is written behind a shield, and its stream iterator settles on every exit:
  exhausted, broken out of, closed, garbage-collected, or cancelled.

What is recorded
----------------

* **A response**: its usage (``Usage.from_litellm``) as the step; the report (when it is the
  call's own) is ``complete``.
* **The provider raises before answering**: no step (nothing was generated); the report is
  ``failed`` and the exception propagates.
* **A stream read to its end**: the final chunk's usage (``include_usage`` is injected), or
  the counted figure when the provider sent none; ``complete``.
* **A stream abandoned** (``break`` then ``aclose()``, ``async with`` left early, the stream
  garbage-collected or closed at loop shutdown): the counted figure; ``cancelled``.
* **The task cancelled**, during the call or while reading the stream: the counted figure
  (the prompt alone before the first chunk, and for a call without ``stream``);
  ``cancelled``, and ``CancelledError`` propagates.
* **The provider raises in the middle of a stream**: the counted figure; ``failed``, and the
  exception propagates.

**Counted** means: ``input_tokens`` is the prompt's count by ``litellm.token_counter(model,
messages, tools)`` (taken once, before the call, for the estimate), ``output_tokens`` the
count by ``litellm.token_counter(model, text=...)`` of every piece of text the stream
delivered (content, reasoning content, tool-call names and arguments, over every choice),
``reasoning_tokens`` that of the reasoning content. It is the best figure available when the
provider's own count never arrives; the provider may bill somewhat more (message framing,
tokens generated after the disconnect that were never received). A text the tokenizer cannot
count is counted as its number of characters, which no tokenizer undercounts.

The reservation is ``prompt + n * max_tokens`` (``max_completion_tokens``, whichever is
larger when both are given; ``default_max_tokens`` when neither is): the worst case of a call
that stops at its limit. The integration never changes the request's ``max_tokens``: a call
without one can exceed its estimate, and is billed what it used.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, TypeAlias, overload

try:
    import litellm
except ImportError as exc:  # test_without_litellm_the_integration_says_what_to_install
    raise ImportError(
        "tokentrack_client.integrations.litellm needs LiteLLM, which tokentrack does not "
        "install by itself: pip install 'tokentrack[litellm]' (or pip install litellm)"
    ) from exc

from tokentrack_client.client import TokenTracker
from tokentrack_client.errors import TokenTrackError
from tokentrack_client.results import StepRecord
from tokentrack_client.tracking import ReportEnded, ReportTracker, run_to_completion
from tokentrack_client.usage import Usage
from tokentrack_client.validation import IdLike, check_count, check_text

__all__ = ["Completion", "TrackedLiteLLM", "TrackedStream"]

logger = logging.getLogger("tokentrack_client")

Completion: TypeAlias = Callable[..., Awaitable[Any]]
"""What calls the provider: ``litellm.acompletion`` or anything with its signature."""

_STARTED: Final = object()
"""The first value of a stream's inner generator: taken before the stream is handed out, so
that the generator is inside its ``try`` (and known to the event loop's shutdown) from then on."""


@dataclass(frozen=True)
class _Call:
    """One call, checked and estimated before anything is reserved or sent."""

    kwargs: dict[str, Any]
    model: str
    step_name: str
    stream: bool
    prompt_tokens: int
    estimate: int
    caller_wants_usage: bool


class TrackedLiteLLM:
    """``litellm.acompletion`` with a reservation before the call and one step after it.

    ``tracker``: the :class:`~tokentrack_client.TokenTracker` that reserves and records.
    ``default_max_tokens``: the output tokens to reserve for a call that gives neither
    ``max_tokens`` nor ``max_completion_tokens`` (the request itself is not changed).
    ``completion``: what calls the provider, ``litellm.acompletion`` by default (looked up at
    each call); a wrapper of it may be passed, for example to route or to count calls.
    """

    def __init__(
        self,
        tracker: TokenTracker,
        *,
        default_max_tokens: int,
        completion: Completion | None = None,
    ) -> None:
        self.tracker = tracker
        self.default_max_tokens: int = check_count(
            "default_max_tokens", default_max_tokens, minimum=1
        )
        self._completion = completion

    # ----------------------------------------------------------------------------------------
    # The estimate
    # ----------------------------------------------------------------------------------------

    def estimate_tokens(self, **litellm_kwargs: Any) -> int:
        """The tokens a call with these ``litellm.acompletion`` arguments reserves: the
        prompt's count (``litellm.token_counter`` over ``messages`` and ``tools``) plus ``n``
        times ``max_tokens`` (or ``max_completion_tokens``, or ``default_max_tokens``).

        Useful to size the estimate of a report of your own that makes such calls.
        """
        return self._prepare("completion", litellm_kwargs).estimate

    def _prepare(self, step_name: str, litellm_kwargs: Mapping[str, Any]) -> _Call:
        kwargs = dict(litellm_kwargs)
        model = kwargs.get("model")
        messages = kwargs.get("messages")
        if not isinstance(model, str) or not model.strip():
            raise TypeError("acompletion needs model= (a LiteLLM model name)")
        if messages is None:
            raise TypeError("acompletion needs messages=")
        # Checked now, so that a bad name fails before the provider is paid, not after.
        check_text("step_name", step_name, required=True)
        check_text("model", model, required=False)
        limits = [
            check_count(key, kwargs[key], minimum=1)
            for key in ("max_tokens", "max_completion_tokens")
            if kwargs.get(key) is not None
        ]
        max_output = max(limits) if limits else self.default_max_tokens
        choices = kwargs.get("n")
        choices = 1 if choices is None else check_count("n", choices, minimum=1)
        prompt_tokens = _count_prompt(model, messages, kwargs.get("tools"))
        stream = bool(kwargs.get("stream"))
        caller_wants_usage = False
        if stream:
            options = kwargs.get("stream_options") or {}
            caller_wants_usage = options.get("include_usage") is True
            kwargs["stream_options"] = {**options, "include_usage": True}
        return _Call(
            kwargs=kwargs,
            model=model,
            step_name=step_name,
            stream=stream,
            prompt_tokens=prompt_tokens,
            estimate=max(1, prompt_tokens + choices * max_output),
            caller_wants_usage=caller_wants_usage,
        )

    # ----------------------------------------------------------------------------------------
    # A report of its own per call
    # ----------------------------------------------------------------------------------------

    @overload
    async def acompletion(
        self,
        *,
        account_id: IdLike,
        report_id: IdLike | None = None,
        step_name: str = "completion",
        stream: Literal[False] = False,
        **litellm_kwargs: Any,
    ) -> Any: ...

    @overload
    async def acompletion(
        self,
        *,
        account_id: IdLike,
        report_id: IdLike | None = None,
        step_name: str = "completion",
        stream: Literal[True],
        **litellm_kwargs: Any,
    ) -> TrackedStream: ...

    async def acompletion(
        self,
        *,
        account_id: IdLike,
        report_id: IdLike | None = None,
        step_name: str = "completion",
        stream: bool = False,
        **litellm_kwargs: Any,
    ) -> Any:
        """One ``litellm.acompletion`` call as a report of its own (``report_id``, a new
        UUID by default), billed once.

        Reserves :meth:`estimate_tokens` first: a refusal (``InsufficientTokens``,
        ``NoActivePeriod``, ...) is raised before the provider is called. Without
        ``stream``, returns LiteLLM's ``ModelResponse`` once its usage is recorded as the
        step ``step_name`` and the report is ``complete``; a provider error marks the report
        ``failed`` and propagates; a cancellation records the prompt's counted tokens and
        ends it ``cancelled``. With ``stream=True``, returns a :class:`TrackedStream` once
        the stream is open; the report ends when the stream does (see the module's table).
        """
        call = self._prepare(step_name, {**litellm_kwargs, "stream": stream})
        report_uuid = uuid.uuid4() if report_id is None else report_id
        report = self.tracker.track_report(account_id, report_uuid, call.estimate)
        if not call.stream:
            async with report:
                return await self._respond(report, call)
        await report.__aenter__()
        try:
            return await self._open_stream(report, call, owns_report=True)
        except BaseException as exc:
            await report.__aexit__(type(exc), exc, exc.__traceback__)
            raise

    # ----------------------------------------------------------------------------------------
    # One step of the caller's report
    # ----------------------------------------------------------------------------------------

    @overload
    async def step(
        self,
        report: ReportTracker,
        step_name: str,
        /,
        *,
        stream: Literal[False] = False,
        **litellm_kwargs: Any,
    ) -> Any: ...

    @overload
    async def step(
        self,
        report: ReportTracker,
        step_name: str,
        /,
        *,
        stream: Literal[True],
        **litellm_kwargs: Any,
    ) -> TrackedStream: ...

    async def step(
        self,
        report: ReportTracker,
        step_name: str,
        /,
        *,
        stream: bool = False,
        **litellm_kwargs: Any,
    ) -> Any:
        """One ``litellm.acompletion`` call as the step ``step_name`` of ``report`` (a
        :class:`~tokentrack_client.ReportTracker` the caller entered): nothing more is
        reserved (the report's estimate covers its steps) and the report is not ended.

        Without ``stream``, returns the ``ModelResponse`` once its usage is recorded; a
        provider error records nothing and propagates (the caller's block then marks the
        report failed); a cancellation records the prompt's counted tokens, then
        ``CancelledError`` propagates. With ``stream=True``, returns a
        :class:`TrackedStream` that records the step when the stream ends: close it (read it
        to the end, ``async with``, or ``aclose()``) before the report's block ends, or an
        abandoned stream's step comes too late to be recorded. ``ReportCancelled`` is raised,
        after the step is recorded, when the report was cancelled from outside meanwhile.
        """
        if report.reservation is None:
            raise RuntimeError("step() needs the report to be entered: `async with ... as report`")
        if report.status is not None:
            raise RuntimeError(f"report {report.report_id} is already finished")
        call = self._prepare(step_name, {**litellm_kwargs, "stream": stream})
        if not call.stream:
            return await self._respond(report, call)
        return await self._open_stream(report, call, owns_report=False)

    # ----------------------------------------------------------------------------------------
    # The call
    # ----------------------------------------------------------------------------------------

    def _provider(self) -> Completion:
        completion: Completion = (
            self._completion if self._completion is not None else litellm.acompletion
        )
        return completion

    async def _call_provider(self, report: ReportTracker, call: _Call) -> Any:
        """The provider's answer; a cancellation records the prompt's counted tokens first."""
        try:
            return await self._provider()(**call.kwargs)
        except (asyncio.CancelledError, KeyboardInterrupt):
            counted = Usage(input_tokens=call.prompt_tokens)
            await _record_shielded(self.tracker, report, call, counted)
            raise

    async def _respond(self, report: ReportTracker, call: _Call) -> Any:
        response = await self._call_provider(report, call)
        usage = Usage.from_litellm(response)
        # The provider has answered (and billed): a cancellation from here on must not cut
        # the step's write short, so it runs to its end and the cancellation follows.
        await run_to_completion(_record(self.tracker, report, call, usage))
        return response

    async def _open_stream(
        self, report: ReportTracker, call: _Call, *, owns_report: bool
    ) -> TrackedStream:
        stream = await self._call_provider(report, call)
        state = _StreamState(self.tracker, report, call, owns_report=owns_report)
        inner = _follow(stream, state)
        await inner.__anext__()  # to _STARTED: from here on every exit settles the stream
        return TrackedStream(inner, state)


def _count_prompt(model: str, messages: Any, tools: Any) -> int:
    """The prompt's tokens by LiteLLM's tokenizer for ``model`` (its error propagates: the
    estimate must not be guessed)."""
    if tools:
        return int(litellm.token_counter(model=model, messages=messages, tools=tools))
    return int(litellm.token_counter(model=model, messages=messages))


def _count_text(model: str, text: str) -> int:
    """The tokens of generated ``text``; its length in characters if it cannot be counted
    (at least one character per token: never an undercount)."""
    if not text:
        return 0
    try:
        return int(litellm.token_counter(model=model, text=text, count_response_tokens=True))
    except Exception as exc:  # a tokenizer failure must not leave the report open
        logger.warning(
            "tokentrack: could not count the text received from %s (%s): billing its %d characters",
            model,
            exc,
            len(text),
        )
        return len(text)


async def _record(
    tracker: TokenTracker, report: ReportTracker, call: _Call, usage: Usage
) -> StepRecord:
    """Record ``usage`` as the call's step of ``report``.

    A report of the caller's whose block ended while the call was still running (a stream
    closed after it, a call in a task the block did not wait for) no longer takes steps; the
    step is then recorded straight through ``record_step``, which bills it at once as late
    usage, rather than lost.
    """
    try:
        return await report.step(call.step_name, usage=usage, model=call.model)
    except RuntimeError:  # step() refused before writing anything: the block has ended
        if report.reservation is None:
            raise
        logger.warning(
            "tokentrack: report %s ended before its step %r did: recording it late",
            report.report_id,
            call.step_name,
        )
        return await tracker.record_step(
            report.report_id, report.account_id, call.step_name, usage, call.model
        )


async def _record_shielded(
    tracker: TokenTracker, report: ReportTracker, call: _Call, usage: Usage
) -> StepRecord | None:
    """Record the counted usage of a cancelled call to the end even if the task is cancelled
    again meanwhile; a failure is logged (the caller is propagating its cancellation)."""
    try:
        return await run_to_completion(_record(tracker, report, call, usage))
    except TokenTrackError as exc:
        logger.error(
            "tokentrack: report %s: the step %r of a cancelled call could not be recorded: %s",
            report.report_id,
            call.step_name,
            exc,
        )
        return None


# --------------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------------


class _StreamState:
    """What a stream has delivered so far, and how it ended. Held by the inner generator and
    by :class:`TrackedStream`, never pointing back at either: dropping the
    :class:`TrackedStream` leaves the generator unreferenced, so the event loop's finalizer
    closes it (and settles the report) at once."""

    def __init__(
        self, tracker: TokenTracker, report: ReportTracker, call: _Call, *, owns_report: bool
    ) -> None:
        self.tracker = tracker
        self.report = report
        self.call = call
        self.owns_report = owns_report
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.final: Any = None
        self.outcome: str | None = None
        self.usage: Usage | None = None
        self.record: StepRecord | None = None

    def observe(self, chunk: Any) -> bool:
        """Take the chunk's text and usage; True if the consumer is to see it."""
        if getattr(chunk, "usage", None) is not None:
            self.final = chunk
        choices = getattr(chunk, "choices", None) or ()
        for choice in choices:
            delta = getattr(choice, "delta", None)
            if delta is None:
                continue
            _collect(self.text, getattr(delta, "content", None))
            reasoning = getattr(delta, "reasoning_content", None)
            _collect(self.reasoning, reasoning)
            for tool_call in getattr(delta, "tool_calls", None) or ():
                function = _field(tool_call, "function")
                _collect(self.text, _field(function, "name"))
                _collect(self.text, _field(function, "arguments"))
            function_call = getattr(delta, "function_call", None)
            _collect(self.text, _field(function_call, "name"))
            _collect(self.text, _field(function_call, "arguments"))
        # The usage-only last chunk was asked for by the integration, not by the caller.
        return bool(choices) or self.call.caller_wants_usage or self.final is not chunk

    def counted(self) -> Usage:
        """The best figure without the provider's: the prompt and the text received."""
        model = self.call.model
        reasoning = _count_text(model, "".join(self.reasoning))
        output = _count_text(model, "".join(self.text)) + reasoning
        return Usage(
            input_tokens=self.call.prompt_tokens,
            output_tokens=output,
            reasoning_tokens=reasoning,
        )

    async def settle(self, outcome: str, exc: BaseException | None, stream: Any) -> None:
        """Record the step (the provider's usage when complete, else counted) and, for a
        report of its own, end it. Runs once, behind a shield (``run_to_completion``)."""
        self.outcome = outcome
        if outcome != "complete":
            await _close_quietly(stream)
        error: BaseException | None = None
        usage = (
            Usage.from_litellm(self.final)
            if outcome == "complete" and self.final is not None
            else self.counted()
        )
        self.usage = usage
        try:
            self.record = await _record(self.tracker, self.report, self.call, usage)
        except TokenTrackError as failed:
            if isinstance(failed, ReportEnded):  # recorded (late), then told to stop
                self.record = failed.step
            if outcome == "complete":
                error = failed
            elif not isinstance(failed, ReportEnded):
                logger.error(
                    "tokentrack: report %s: the step %r of a stream %s could not be recorded: %s",
                    self.report.report_id,
                    self.call.step_name,
                    outcome,
                    failed,
                )
        if self.owns_report:
            ending = error if error is not None else exc
            if outcome == "abandoned":
                ending = asyncio.CancelledError()
            await self.report.__aexit__(None if ending is None else type(ending), ending, None)
        if error is not None:
            raise error


def _collect(parts: list[str], value: object) -> None:
    if isinstance(value, str) and value:
        parts.append(value)


def _field(obj: object, name: str) -> object:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


async def _close_quietly(stream: Any) -> None:
    """Close the provider's stream (its HTTP connection) on an early exit; best effort."""
    close = getattr(stream, "aclose", None)
    if close is None:
        return
    try:
        await close()
    except Exception as exc:
        logger.debug("tokentrack: closing the LiteLLM stream failed: %s", exc)


async def _follow(stream: Any, state: _StreamState) -> AsyncGenerator[Any, None]:
    """Yield the provider's chunks to the consumer; settle exactly once however it ends."""
    try:
        yield _STARTED
        async for chunk in stream:
            if state.observe(chunk):
                yield chunk
    except GeneratorExit:  # aclose(), `async with` left, garbage collected, loop shutdown
        await run_to_completion(state.settle("abandoned", None, stream))
        raise
    except (asyncio.CancelledError, KeyboardInterrupt) as exc:
        await run_to_completion(state.settle("cancelled", exc, stream))
        raise
    except BaseException as exc:
        await run_to_completion(state.settle("failed", exc, stream))
        raise
    else:
        await run_to_completion(state.settle("complete", None, stream))


class TrackedStream:
    """The chunks of a streamed call (LiteLLM's ``ModelResponseStream``), as an async
    iterator that records the call's usage once, when the stream ends.

    Read it with ``async for``. Read to its end, it records the final chunk's usage (the
    integration sets ``stream_options={"include_usage": True}``; that usage-only chunk is
    passed on only when the caller asked for it too). Left early, it records what was
    received, counted (see the module's docs): ``aclose()`` or ``async with stream:`` settles
    at once; a stream that is merely dropped settles when it is garbage-collected (in
    CPython, when its last reference goes) or at the latest when the event loop shuts down
    its async generators (``asyncio.run`` does).

    ``report``: the :class:`~tokentrack_client.ReportTracker` it records into.
    ``outcome``: ``None`` while open, then ``complete``, ``abandoned``, ``cancelled`` or
    ``failed``. ``usage``: the :class:`~tokentrack_client.Usage` recorded; ``record``: the
    :class:`~tokentrack_client.StepRecord` (``None`` if recording failed).
    """

    def __init__(self, inner: AsyncGenerator[Any, None], state: _StreamState) -> None:
        self._inner = inner
        self._state = state

    @property
    def report(self) -> ReportTracker:
        return self._state.report

    @property
    def outcome(self) -> str | None:
        return self._state.outcome

    @property
    def usage(self) -> Usage | None:
        return self._state.usage

    @property
    def record(self) -> StepRecord | None:
        return self._state.record

    def __aiter__(self) -> TrackedStream:
        return self

    async def __anext__(self) -> Any:
        return await self._inner.__anext__()

    async def aclose(self) -> None:
        """Stop reading: close the provider's stream and record what was received."""
        await self._inner.aclose()

    async def __aenter__(self) -> TrackedStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
