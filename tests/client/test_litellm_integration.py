"""``tokentrack_client.integrations.litellm``: LiteLLM calls reserved before the provider is
called and billed exactly once, however they end.

Offline: every call is LiteLLM's own ``acompletion`` answered by its ``mock_response`` (or a
stream of our own where a test needs a provider that stalls or breaks half way), and LiteLLM
reads its bundled price map (``LITELLM_LOCAL_MODEL_COST_MAP``), never the network. The
database is real (the session's PostgreSQL, a fresh database per test).
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before litellm is imported

import asyncio
import gc
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import litellm
import pytest

from client_fixtures import report_state
from sqlkit import assert_reconciled, new_account, period
from tokentrack_client import InsufficientTokens, ReportCancelled, TokenTracker
from tokentrack_client.integrations.litellm import TrackedLiteLLM, TrackedStream
from tokentrack_client.usage import Usage

litellm.suppress_debug_info = True  # no "Give Feedback / Get Help" banner on mocked errors

# Importing LiteLLM warns (pydantic) about ReadOnly items of some of its TypedDicts.
pytestmark = pytest.mark.filterwarnings("ignore:Items? .*`ReadOnly` qualifier:UserWarning")

MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]
REPLY = "The sea keeps every secret it is told, and tells them all back at low tide."
MAX_TOKENS = 200


def prompt_tokens() -> int:
    return int(litellm.token_counter(model=MODEL, messages=MESSAGES))


def text_tokens(text: str) -> int:
    return int(litellm.token_counter(model=MODEL, text=text, count_response_tokens=True))


def response_with_classes() -> litellm.ModelResponse:
    """A provider's answer whose usage has every class: cache reads and reasoning."""
    return litellm.ModelResponse(
        model=MODEL,
        choices=[
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": REPLY},
            }
        ],
        usage={
            "prompt_tokens": 1_200,
            "completion_tokens": 300,
            "total_tokens": 1_500,
            "prompt_tokens_details": {"cached_tokens": 1_000},
            "completion_tokens_details": {"reasoning_tokens": 120},
        },
    )


class Provider:
    """The ``completion`` a test passes: LiteLLM's ``acompletion``, counted; it can hold every
    call at a gate, or answer with a stream of its own."""

    def __init__(
        self,
        gate: asyncio.Event | None = None,
        stream: Any = None,
        on_call: Callable[[], None] | None = None,
    ) -> None:
        self.calls = 0
        self.on_call = on_call
        self.kwargs: list[dict[str, Any]] = []
        self.entered = asyncio.Event()
        self.gate = gate
        self.stream = stream

    async def __call__(self, **kwargs: Any) -> Any:
        self.calls += 1
        self.kwargs.append(kwargs)
        self.entered.set()
        if self.on_call is not None:
            self.on_call()
        if self.gate is not None:
            await self.gate.wait()
        if self.stream is not None:
            return self.stream
        return await litellm.acompletion(**kwargs)


async def mock_chunks(text: str) -> list[Any]:
    """The content chunks LiteLLM's mock stream makes of ``text`` (3 characters each)."""
    stream = await litellm.acompletion(
        model=MODEL, messages=MESSAGES, mock_response=text, stream=True
    )
    return [chunk async for chunk in stream if chunk.choices and chunk.choices[0].delta.content]


class StallingStream:
    """A provider stream that delivers ``chunks`` and then waits forever, or raises ``error``."""

    def __init__(self, chunks: list[Any], error: Exception | None = None) -> None:
        self.chunks = chunks
        self.error = error
        self.stalled = asyncio.Event()
        self.closed = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._run()

    async def _run(self) -> AsyncIterator[Any]:
        for chunk in self.chunks:
            yield chunk
        if self.error is not None:
            raise self.error
        self.stalled.set()
        await asyncio.Event().wait()
        yield None  # never reached

    async def aclose(self) -> None:
        self.closed = True


def received_text(chunks: list[Any]) -> str:
    return "".join(chunk.choices[0].delta.content for chunk in chunks)


async def wait_until_ended(conn: asyncpg.Connection, report_id: uuid.UUID) -> dict[str, Any]:
    """The report's state once it has an outcome (a few seconds at most)."""
    for _ in range(200):
        state = await report_state(conn, report_id)
        if state["status"] not in (None, "processing"):
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"report {report_id} was never ended: {state}")


async def set_price(conn: asyncpg.Connection, model: str, prices: dict[str, Any]) -> None:
    answer = json.loads(
        await conn.fetchval(
            "SELECT tokentrack.set_model_price($1, $2::jsonb)::text", model, json.dumps(prices)
        )
    )
    assert answer["success"] is True, answer


async def held(conn: asyncpg.Connection, account_id: uuid.UUID) -> int:
    """The tokens the account's active reservations hold."""
    return int(
        await conn.fetchval(
            "SELECT coalesce(sum(reserved_tokens), 0) FROM tokentrack.report_reservations"
            " WHERE account_id = $1 AND status = 'active'",
            account_id,
        )
    )


async def ledger_of(conn: asyncpg.Connection, report_id: uuid.UUID) -> list[tuple[str, int]]:
    rows = await conn.fetch(
        "SELECT kind, tokens FROM tokentrack.usage_ledger WHERE report_id = $1 ORDER BY id",
        report_id,
    )
    return [(row["kind"], row["tokens"]) for row in rows]


# --------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------


def test_the_estimate_is_the_prompt_plus_n_times_the_output_limit(tracker: TokenTracker) -> None:
    llm = TrackedLiteLLM(tracker, default_max_tokens=500)
    prompt = prompt_tokens()
    assert prompt > 5
    assert llm.estimate_tokens(model=MODEL, messages=MESSAGES, max_tokens=200) == prompt + 200
    assert llm.estimate_tokens(model=MODEL, messages=MESSAGES) == prompt + 500
    assert (
        llm.estimate_tokens(model=MODEL, messages=MESSAGES, max_completion_tokens=300, n=2)
        == prompt + 600
    )
    both = {"max_tokens": 100, "max_completion_tokens": 400}
    assert llm.estimate_tokens(model=MODEL, messages=MESSAGES, **both) == prompt + 400
    with pytest.raises(TypeError, match="model="):
        llm.estimate_tokens(messages=MESSAGES)
    with pytest.raises(ValueError, match="max_tokens"):
        llm.estimate_tokens(model=MODEL, messages=MESSAGES, max_tokens=0)
    with pytest.raises(ValueError, match="default_max_tokens"):
        TrackedLiteLLM(tracker, default_max_tokens=0)


# --------------------------------------------------------------------------------------------
# A report of its own per call
# --------------------------------------------------------------------------------------------


async def test_a_call_reserves_first_then_bills_the_response_once_with_its_classes(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    seen_reserved: list[int] = []

    async def provider(**kwargs: Any) -> Any:
        # The reservation is already held when the provider is called.
        seen_reserved.append(await held(conn, account))
        return await litellm.acompletion(**kwargs)

    llm = TrackedLiteLLM(tracker, default_max_tokens=1_000, completion=provider)
    report_id = uuid.uuid4()
    response = await llm.acompletion(
        account_id=account,
        report_id=report_id,
        step_name="answer",
        model=MODEL,
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        mock_response=response_with_classes(),
    )

    assert response.choices[0].message.content == REPLY
    assert seen_reserved == [prompt_tokens() + MAX_TOKENS]
    state = await report_state(conn, report_id)
    assert state["status"] == "complete"
    assert state["reservation"] == {
        "status": "completed",
        "reserved_tokens": prompt_tokens() + MAX_TOKENS,
        "billed_tokens": 1_500,
    }
    assert list(state["steps"]) == ["answer"]
    step = await conn.fetchrow(
        "SELECT * FROM tokentrack.report_step_usage WHERE report_id = $1", report_id
    )
    assert step is not None
    assert step["model"] == MODEL
    assert (step["input_tokens"], step["output_tokens"]) == (1_200, 300)
    assert step["total_tokens"] == 1_500
    assert (step["cached_input_tokens"], step["reasoning_tokens"]) == (1_000, 120)
    assert state["token_usage"]["cachedInputTokens"] == 1_000
    assert state["token_usage"]["reasoningTokens"] == 120
    assert await ledger_of(conn, report_id) == [("report_billed", 1_500)]
    row = await period(conn, account)
    assert (row["tokens_used"], row["reports_count"], await held(conn, account)) == (1_500, 1, 0)
    await assert_reconciled(conn)


async def test_the_step_is_priced_by_the_requests_model(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    # Micros per million tokens; reasoning defaults to the output price.
    await set_price(conn, MODEL, {"input": 150_000, "cached_input": 75_000, "output": 600_000})
    llm = TrackedLiteLLM(tracker, default_max_tokens=1_000)
    report_id = uuid.uuid4()
    await llm.acompletion(
        account_id=account,
        report_id=report_id,
        model=MODEL,
        messages=MESSAGES,
        mock_response=response_with_classes(),
    )
    cost = await conn.fetchval(
        "SELECT cost_micros FROM tokentrack.report_step_usage WHERE report_id = $1", report_id
    )
    # (1,200 - 1,000) x 0.15 + 1,000 x 0.075 + (300 - 120) x 0.6 + 120 x 0.6 = 285 micros
    assert cost == 285
    assert (await report_state(conn, report_id))["token_usage"]["costMicros"] == 285


async def test_a_refused_reservation_never_reaches_the_provider(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, MAX_TOKENS)  # less than prompt + max_tokens
    provider = Provider()
    llm = TrackedLiteLLM(tracker, default_max_tokens=1_000, completion=provider)
    report_id = uuid.uuid4()
    for stream in (False, True):
        with pytest.raises(InsufficientTokens) as refused:
            await llm.acompletion(
                account_id=account,
                report_id=report_id,
                model=MODEL,
                messages=MESSAGES,
                max_tokens=MAX_TOKENS,
                stream=stream,
                mock_response=REPLY,
            )
        assert refused.value.requested_tokens == prompt_tokens() + MAX_TOKENS
    assert provider.calls == 0
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.reports") == 0
    await assert_reconciled(conn)


@pytest.mark.parametrize(
    ("mock_error", "raised_as"),
    [
        (Exception("the provider is down"), litellm.InternalServerError),
        ("litellm.RateLimitError", litellm.RateLimitError),
    ],
    ids=["exception", "rate-limit"],
)
async def test_a_provider_error_fails_the_report_bills_it_once_and_propagates(
    tracker: TokenTracker, conn: asyncpg.Connection, mock_error: Any, raised_as: type[Exception]
) -> None:
    account = await new_account(conn, 100_000)
    llm = TrackedLiteLLM(tracker, default_max_tokens=1_000)
    report_id = uuid.uuid4()
    with pytest.raises(raised_as) as raised:
        await llm.acompletion(
            account_id=account,
            report_id=report_id,
            model=MODEL,
            messages=MESSAGES,
            max_tokens=MAX_TOKENS,
            mock_response=mock_error,
        )
    state = await report_state(conn, report_id)
    assert state["status"] == "failed"
    assert state["error_message"] == str(raised.value)
    assert state["steps"] == {}  # the provider answered an error: nothing was generated
    assert state["reservation"]["status"] != "active"
    assert await ledger_of(conn, report_id) == [("report_billed", 0)]
    row = await period(conn, account)
    assert (row["tokens_used"], await held(conn, account)) == (0, 0)
    await assert_reconciled(conn)


async def test_a_task_cancelled_mid_call_is_cancelled_billed_once_and_holds_nothing(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    provider = Provider()
    llm = TrackedLiteLLM(tracker, default_max_tokens=1_000, completion=provider)
    report_id = uuid.uuid4()
    task = asyncio.create_task(
        llm.acompletion(
            account_id=account,
            report_id=report_id,
            model=MODEL,
            messages=MESSAGES,
            max_tokens=MAX_TOKENS,
            mock_response=REPLY,
            mock_delay=60,  # LiteLLM's mock sleeps: the provider is "generating"
        )
    )
    await asyncio.wait_for(provider.entered.wait(), 10)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    state = await report_state(conn, report_id)
    assert state["status"] == "cancelled"
    assert state["reservation"]["status"] != "active"
    # Counted: the prompt was sent, no text came back.
    assert {name: s["total_tokens"] for name, s in state["steps"].items()} == {
        "completion": prompt_tokens()
    }
    assert await ledger_of(conn, report_id) == [("report_billed", prompt_tokens())]
    row = await period(conn, account)
    assert (row["tokens_used"], await held(conn, account)) == (prompt_tokens(), 0)
    await assert_reconciled(conn)


async def test_a_response_that_arrives_as_the_task_is_cancelled_is_billed_in_full(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)

    async def answered_then_cancelled(**kwargs: Any) -> Any:
        response = await litellm.acompletion(**kwargs)
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # lands on the next await: the step's write
        return response

    llm = TrackedLiteLLM(tracker, default_max_tokens=1_000, completion=answered_then_cancelled)
    report_id = uuid.uuid4()
    with pytest.raises(asyncio.CancelledError):
        await llm.acompletion(
            account_id=account,
            report_id=report_id,
            model=MODEL,
            messages=MESSAGES,
            mock_response=response_with_classes(),
        )
    state = await report_state(conn, report_id)
    assert state["status"] == "cancelled"
    assert {name: s["total_tokens"] for name, s in state["steps"].items()} == {"completion": 1_500}
    assert await ledger_of(conn, report_id) == [("report_billed", 1_500)]
    await assert_reconciled(conn)


# --------------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------------


async def test_a_stream_read_to_its_end_records_the_final_chunks_usage(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    provider = Provider()
    llm = TrackedLiteLLM(tracker, default_max_tokens=1_000, completion=provider)
    report_id = uuid.uuid4()
    stream = await llm.acompletion(
        account_id=account,
        report_id=report_id,
        model=MODEL,
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},  # the caller wants the usage chunk too
        mock_response=REPLY,
    )
    assert isinstance(stream, TrackedStream)
    assert (await report_state(conn, report_id))["status"] == "processing"
    chunks = [chunk async for chunk in stream]

    final = chunks[-1]
    assert final.usage is not None
    assert not final.choices
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert stream.outcome == "complete"
    assert stream.usage == Usage.from_litellm(final)
    assert stream.usage.output_tokens == text_tokens(REPLY)
    assert stream.record is not None
    state = await report_state(conn, report_id)
    assert state["status"] == "complete"
    expected = stream.usage.input_tokens + stream.usage.output_tokens
    assert {name: s["total_tokens"] for name, s in state["steps"].items()} == {
        "completion": expected
    }
    assert await ledger_of(conn, report_id) == [("report_billed", expected)]
    await assert_reconciled(conn)


async def test_the_usage_chunk_is_injected_and_kept_from_a_caller_that_did_not_ask(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    provider = Provider()
    llm = TrackedLiteLLM(tracker, default_max_tokens=1_000, completion=provider)
    stream = await llm.acompletion(
        account_id=account,
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        mock_response=REPLY,
    )
    chunks = [chunk async for chunk in stream]
    assert provider.kwargs[0]["stream_options"] == {"include_usage": True}
    assert all(chunk.choices for chunk in chunks)  # no usage-only chunk for this caller
    assert stream.outcome == "complete"
    assert stream.usage is not None
    assert stream.usage.output_tokens == text_tokens(REPLY)
    state = await report_state(conn, stream.report.report_id)
    assert state["status"] == "complete"
    assert state["reservation"]["reserved_tokens"] == prompt_tokens() + 1_000  # the default


@pytest.mark.parametrize("how", ["aclose", "async with", "garbage collected"])
async def test_a_stream_abandoned_half_way_is_cancelled_and_billed_once_with_the_partial_count(
    tracker: TokenTracker, conn: asyncpg.Connection, how: str
) -> None:
    account = await new_account(conn, 100_000)
    llm = TrackedLiteLLM(tracker, default_max_tokens=1_000)
    report_id = uuid.uuid4()
    received: list[Any] = []
    stream = await llm.acompletion(
        account_id=account,
        report_id=report_id,
        model=MODEL,
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        stream=True,
        mock_response=REPLY,
    )
    if how == "async with":
        async with stream:
            async for chunk in stream:
                received.append(chunk)
                if len(received) == 4:
                    break
    else:
        async for chunk in stream:
            received.append(chunk)
            if len(received) == 4:
                break
        if how == "aclose":
            await stream.aclose()
        else:
            del stream
            gc.collect()

    state = await wait_until_ended(conn, report_id)
    text = received_text(received)
    assert len(text) == 12
    assert REPLY.startswith(text)
    partial = prompt_tokens() + text_tokens(text)
    assert state["status"] == "cancelled"
    assert state["reservation"]["status"] != "active"
    assert {name: s["total_tokens"] for name, s in state["steps"].items()} == {
        "completion": partial
    }
    assert partial < prompt_tokens() + text_tokens(REPLY)
    assert await ledger_of(conn, report_id) == [("report_billed", partial)]
    row = await period(conn, account)
    assert (row["tokens_used"], await held(conn, account)) == (partial, 0)
    await assert_reconciled(conn)


async def test_a_consumer_cancelled_while_reading_is_cancelled_and_billed_what_it_received(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    chunks = (await mock_chunks(REPLY))[:5]
    provider_stream = StallingStream(chunks)
    llm = TrackedLiteLLM(
        tracker, default_max_tokens=1_000, completion=Provider(stream=provider_stream)
    )
    report_id = uuid.uuid4()
    received: list[Any] = []

    async def consume() -> None:
        stream = await llm.acompletion(
            account_id=account, report_id=report_id, model=MODEL, messages=MESSAGES, stream=True
        )
        async for chunk in stream:
            received.append(chunk)

    task = asyncio.create_task(consume())
    await asyncio.wait_for(provider_stream.stalled.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert provider_stream.closed  # the provider's stream (its connection) was closed
    partial = prompt_tokens() + text_tokens(received_text(received))
    state = await report_state(conn, report_id)
    assert len(received) == 5
    assert state["status"] == "cancelled"
    assert {name: s["total_tokens"] for name, s in state["steps"].items()} == {
        "completion": partial
    }
    assert await ledger_of(conn, report_id) == [("report_billed", partial)]
    assert await held(conn, account) == 0
    await assert_reconciled(conn)


async def test_a_provider_error_mid_stream_fails_the_report_with_the_partial_count(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    chunks = (await mock_chunks(REPLY))[:3]
    overloaded = litellm.InternalServerError("overloaded", "openai", MODEL)
    broken = StallingStream(chunks, error=overloaded)
    llm = TrackedLiteLLM(tracker, default_max_tokens=1_000, completion=Provider(stream=broken))
    report_id = uuid.uuid4()
    stream = await llm.acompletion(
        account_id=account, report_id=report_id, model=MODEL, messages=MESSAGES, stream=True
    )
    received: list[Any] = []

    async def read() -> None:
        async for chunk in stream:
            received.append(chunk)

    with pytest.raises(litellm.InternalServerError):
        await read()

    partial = prompt_tokens() + text_tokens(received_text(received))
    state = await report_state(conn, report_id)
    assert stream.outcome == "failed"
    assert state["status"] == "failed"
    assert "overloaded" in state["error_message"]
    assert {name: s["total_tokens"] for name, s in state["steps"].items()} == {
        "completion": partial
    }
    assert await ledger_of(conn, report_id) == [("report_billed", partial)]
    await assert_reconciled(conn)


async def test_a_stream_cancelled_from_outside_is_billed_late_and_says_so_at_its_end(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    llm = TrackedLiteLLM(tracker, default_max_tokens=1_000)
    report_id = uuid.uuid4()
    stream = await llm.acompletion(
        account_id=account,
        report_id=report_id,
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        mock_response=REPLY,
    )
    received = [await anext(stream)]
    cancelled = await tracker.cancel_report(report_id, account)  # the cancel button
    assert cancelled.billed_tokens == 0

    async def read_on() -> None:
        async for chunk in stream:
            received.append(chunk)

    with pytest.raises(ReportCancelled):
        await read_on()
    assert stream.usage is not None
    assert stream.record is not None
    assert stream.record.late
    full = stream.usage.input_tokens + stream.usage.output_tokens
    state = await report_state(conn, report_id)
    assert state["status"] == "cancelled"
    assert await ledger_of(conn, report_id) == [("report_billed", 0), ("late_step", full)]
    await assert_reconciled(conn)


# --------------------------------------------------------------------------------------------
# Steps of the caller's own report
# --------------------------------------------------------------------------------------------


async def test_calls_are_steps_of_the_callers_report(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    provider = Provider()
    llm = TrackedLiteLLM(tracker, default_max_tokens=1_000, completion=provider)
    report_id = uuid.uuid4()
    estimate = 2 * llm.estimate_tokens(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS)
    async with tracker.track_report(account, report_id, estimate) as report:
        response = await llm.step(
            report, "outline", model=MODEL, messages=MESSAGES, mock_response=response_with_classes()
        )
        assert response.choices[0].message.content == REPLY
        stream = await llm.step(
            report, "draft", model=MODEL, messages=MESSAGES, stream=True, mock_response=REPLY
        )
        async with stream:
            text = "".join([c.choices[0].delta.content or "" async for c in stream])
        assert text == REPLY
        assert stream.outcome == "complete"
        assert (await report_state(conn, report_id))["status"] == "processing"

    assert provider.calls == 2
    assert report.status == "complete"
    state = await report_state(conn, report_id)
    draft = prompt_tokens() + text_tokens(REPLY)
    assert {name: s["total_tokens"] for name, s in state["steps"].items()} == {
        "outline": 1_500,
        "draft": draft,
    }
    assert state["reservation"] == {
        "status": "completed",
        "reserved_tokens": estimate,
        "billed_tokens": 1_500 + draft,
    }
    with pytest.raises(RuntimeError, match="already finished"):
        await llm.step(report, "late", model=MODEL, messages=MESSAGES, mock_response=REPLY)
    assert provider.calls == 2
    await assert_reconciled(conn)


async def test_a_stream_closed_after_the_callers_report_ended_is_billed_late(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    llm = TrackedLiteLLM(tracker, default_max_tokens=1_000)
    report_id = uuid.uuid4()
    received: list[Any] = []
    async with tracker.track_report(account, report_id, 5_000) as report:
        stream = await llm.step(
            report, "draft", model=MODEL, messages=MESSAGES, stream=True, mock_response=REPLY
        )
        async for chunk in stream:
            received.append(chunk)
            if len(received) == 2:
                break
    assert report.status == "complete"
    assert report.settlement is not None
    assert report.settlement.billed_tokens == 0

    await stream.aclose()  # too late for the report: recorded late, billed at once
    partial = prompt_tokens() + text_tokens(received_text(received))
    assert stream.outcome == "abandoned"
    assert stream.record is not None
    assert stream.record.late
    state = await report_state(conn, report_id)
    assert state["status"] == "complete"
    assert state["steps"]["draft"]["total_tokens"] == partial
    assert state["steps"]["draft"]["late"]
    assert await ledger_of(conn, report_id) == [("report_billed", 0), ("late_step", partial)]
    assert (await period(conn, account))["tokens_used"] == partial
    await assert_reconciled(conn)


# --------------------------------------------------------------------------------------------
# Concurrency: exactly as many calls as the budget holds reach the provider
# --------------------------------------------------------------------------------------------


async def test_fifty_concurrent_calls_on_a_budget_of_twenty_reservations(
    pool: asyncpg.Pool[Any], conn: asyncpg.Connection
) -> None:
    tracker = TokenTracker(pool)  # several real connections, truly concurrent
    gate = asyncio.Event()
    all_decided = asyncio.Event()  # every call has reached the provider or been refused
    refused = 0

    def decided() -> None:
        if refused + provider.calls == 50:
            all_decided.set()

    provider = Provider(gate=gate, on_call=decided)
    llm = TrackedLiteLLM(tracker, default_max_tokens=1_000, completion=provider)
    kwargs: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS}
    estimate = llm.estimate_tokens(**kwargs)
    account = await new_account(conn, 20 * estimate)

    async def one() -> Any:
        nonlocal refused
        try:
            return await llm.acompletion(account_id=account, mock_response=REPLY, **kwargs)
        except InsufficientTokens:
            refused += 1
            decided()
            raise

    tasks = [asyncio.create_task(one()) for _ in range(50)]
    # Every admitted call is held at the provider (holding its reservation) until all 50 have
    # either reached it or been refused.
    await asyncio.wait_for(all_decided.wait(), 60)
    assert (provider.calls, refused) == (20, 30)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)

    responses = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(responses) == 20
    assert len(errors) == 30
    assert all(isinstance(e, InsufficientTokens) for e in errors)
    billed = sum(r.usage.total_tokens for r in responses)
    row = await period(conn, account)
    assert (row["tokens_used"], row["reports_count"], await held(conn, account)) == (billed, 20, 0)
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.reports") == 20
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM tokentrack.report_reservations WHERE status = 'active'"
        )
        == 0
    )
    assert (await tracker.reconcile()).ok
    await assert_reconciled(conn)


# --------------------------------------------------------------------------------------------
# LiteLLM stays optional
# --------------------------------------------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_base_package_never_imports_litellm() -> None:
    done = run_python(
        "import sys, tokentrack_client, tokentrack_client.integrations, tokentrack_client.cli\n"
        "assert 'litellm' not in sys.modules, 'litellm was imported'\n"
    )
    assert done.returncode == 0, done.stderr


def test_without_litellm_the_integration_says_what_to_install() -> None:
    done = run_python(
        "import sys\n"
        "sys.modules['litellm'] = None  # as if it were not installed\n"
        "import tokentrack_client.integrations.litellm\n"
    )
    assert done.returncode != 0
    assert "ImportError" in done.stderr
    assert "pip install 'tokentrack[litellm]'" in done.stderr
