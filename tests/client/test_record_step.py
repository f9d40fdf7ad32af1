"""Steps recorded by token class (``TokenTracker.record_step``, ``report.step(usage=...)``),
priced by the server, against the real database.

Prices are set as the schema owner (the fixtures' ``conn``). Every expected cost is worked
out by hand below from the contract's formula: (input - cached - cache write) x input +
cached x cached_input + cache write x cache_write + (output - reasoning) x output +
reasoning x reasoning, over 10^6, rounded half up once per step.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import pytest
from anthropic.types import Message
from openai.types.chat import ChatCompletion

from client_fixtures import report_state
from sqlkit import assert_reconciled, new_account, period
from tokentrack_client import (
    InvalidArgument,
    ReportCancelled,
    StepConflict,
    TokenTracker,
    Usage,
)

CLAUDE = "claude-sonnet-4-5"
CLAUDE_PRICES = {  # micros per million tokens
    "input": 3_000_000,
    "cached_input": 300_000,
    "cache_write": 3_750_000,
    "output": 15_000_000,
}
O3 = "o3-mini"
O3_PRICES = {
    "input": 1_100_000,
    "cached_input": 550_000,
    "output": 4_400_000,
    "reasoning": 5_000_000,
}

ANTHROPIC_MESSAGE = Message.model_validate(
    {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": CLAUDE,
        "content": [{"type": "text", "text": "The analysis."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 750,
            "cache_read_input_tokens": 5_000,
            "cache_creation_input_tokens": 2_000,
            "output_tokens": 300,
        },
    }
)
# 750 x 3 + 5,000 x 0.3 + 2,000 x 3.75 + 300 x 15 = 2,250 + 1,500 + 7,500 + 4,500
CLAUDE_COST = 15_750

OPENAI_COMPLETION = ChatCompletion.model_validate(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_764_000_000,
        "model": O3,
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "."}}
        ],
        "usage": {
            "prompt_tokens": 1_200,
            "completion_tokens": 900,
            "total_tokens": 2_100,
            "prompt_tokens_details": {"cached_tokens": 1_024},
            "completion_tokens_details": {"reasoning_tokens": 640},
        },
    }
)
# (1,200 - 1,024) x 1.1 + 1,024 x 0.55 + (900 - 640) x 4.4 + 640 x 5
#   = 193.6 + 563.2 + 1,144 + 3,200 = 5,100.8, rounded half up: 5,101
O3_COST = 5_101


async def set_price(conn: asyncpg.Connection, model: str, prices: dict[str, Any]) -> None:
    answer = json.loads(
        await conn.fetchval(
            "SELECT tokentrack.set_model_price($1, $2::jsonb)::text", model, json.dumps(prices)
        )
    )
    assert answer["success"] is True, answer


async def test_a_report_with_a_cache_step_and_a_reasoning_step_bills_classes_and_cost(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    await set_price(conn, CLAUDE, CLAUDE_PRICES)
    await set_price(conn, O3, O3_PRICES)
    account = await new_account(conn, 100_000)
    report_id = uuid.uuid4()
    anthropic = Usage.from_anthropic(ANTHROPIC_MESSAGE)
    openai = Usage.from_openai(OPENAI_COMPLETION)
    assert (anthropic.input_tokens, openai.reasoning_tokens) == (7_750, 640)
    async with tracker.track_report(account, report_id, 20_000) as report:
        an2 = await report.step("AN2", usage=anthropic, model=ANTHROPIC_MESSAGE.model)
        an3 = await report.step("AN3", usage=openai, model=OPENAI_COMPLETION.model)
        assert (an2.total_tokens, an2.cost_micros, an2.duplicate, an2.late) == (
            8_050,
            CLAUDE_COST,
            False,
            False,
        )
        assert (an3.total_tokens, an3.cost_micros) == (2_100, O3_COST)
        assert an3.answer["cost_micros"] == O3_COST
    assert report.status == "complete"
    assert report.tokens_recorded == 8_050 + 2_100
    state = await report_state(conn, report_id)
    usage = state["token_usage"]
    assert usage["totalTokens"] == 10_150
    assert usage["costMicros"] == CLAUDE_COST + O3_COST == 20_851
    assert usage["cachedInputTokens"] == 5_000 + 1_024
    assert usage["cacheWriteTokens"] == 2_000
    assert usage["reasoningTokens"] == 640
    assert {s: row["total_tokens"] for s, row in state["steps"].items()} == {
        "AN2": 8_050,
        "AN3": 2_100,
    }
    assert state["reservation"]["billed_tokens"] == 10_150
    assert (await period(conn, account))["tokens_used"] == 10_150
    await assert_reconciled(conn)


async def test_record_step_again_is_a_duplicate_and_other_usage_a_conflict(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    await set_price(conn, CLAUDE, CLAUDE_PRICES)
    account = await new_account(conn)
    report_id = uuid.uuid4()
    await tracker.try_reserve(account, report_id, 20_000)
    usage = Usage.from_anthropic(ANTHROPIC_MESSAGE)
    first = await tracker.record_step(report_id, account, "AN2", usage, CLAUDE)
    again = await tracker.record_step(str(report_id), str(account), "AN2", usage, CLAUDE)
    assert (again.step_id, again.duplicate, again.cost_micros) == (first.step_id, True, CLAUDE_COST)
    with pytest.raises(StepConflict):
        await tracker.record_step(
            report_id, account, "AN2", Usage(input_tokens=7_750, output_tokens=300), CLAUDE
        )
    settlement = await tracker.finish_report(report_id, account, "complete")
    assert settlement.billed_tokens == 8_050
    await assert_reconciled(conn)


async def test_an_unpriced_model_has_no_cost_and_is_billed_all_the_same(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn)
    report_id = uuid.uuid4()
    async with tracker.track_report(account, report_id, 10_000) as report:
        step = await report.step("AN0", usage=Usage(input_tokens=100, output_tokens=20))
        assert (step.total_tokens, step.cost_micros) == (120, None)
        priced_nowhere = await report.step(
            "AN1.5", usage=Usage(input_tokens=10, output_tokens=5), model="no-such-model"
        )
        assert priced_nowhere.cost_micros is None
    assert report.tokens_recorded == 135
    assert (await period(conn, account))["tokens_used"] == 135
    await assert_reconciled(conn)


async def test_persist_step_answers_a_cost_too(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    await set_price(conn, "gpt-4o", {"input": 2_500_000, "output": 10_000_000})
    account = await new_account(conn)
    report_id = uuid.uuid4()
    await tracker.try_reserve(account, report_id, 10_000)
    step = await tracker.persist_step(report_id, account, "AN0", 1_000, 200, model="gpt-4o")
    assert step.cost_micros == 1_000 * 2.5 + 200 * 10 == 4_500
    await tracker.finish_report(report_id, account, "complete")


async def test_step_takes_usage_or_the_counts_not_both(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn)
    report_id = uuid.uuid4()
    async with tracker.track_report(account, report_id, 10_000) as report:
        for counts in ({"input_tokens": 1}, {"output_tokens": 1}, {"total_tokens": 2}):
            with pytest.raises(InvalidArgument, match="not both") as refused:
                await report.step("AN0", usage=Usage(input_tokens=1), **counts)
            assert refused.value.argument == "usage"
        # without usage, a count left out is refused as before (the old required argument)
        with pytest.raises(InvalidArgument, match="input_tokens must be an integer, not None"):
            await report.step("AN0", output_tokens=5)
        with pytest.raises(InvalidArgument, match="output_tokens must be an integer") as missing:
            await report.step("AN0", 5)
        assert missing.value.argument == "output_tokens"
        assert report.steps == []
        old = await report.step("AN0", 10, 5, None, "gpt-4o")  # the positional form stands
        assert (old.total_tokens, old.cost_micros) == (15, None)
    assert state_steps(await report_state(conn, report_id)) == {"AN0": 15}


def state_steps(state: dict[str, Any]) -> dict[str, int]:
    return {s: row["total_tokens"] for s, row in state["steps"].items()}


async def test_record_step_refuses_what_is_not_a_usage(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn)
    report_id = uuid.uuid4()
    await tracker.try_reserve(account, report_id, 10_000)
    for wrong in ({"input_tokens": 5}, OPENAI_COMPLETION, None):
        with pytest.raises(InvalidArgument, match="usage must be a Usage") as refused:
            await tracker.record_step(report_id, account, "AN0", wrong, O3)  # type: ignore[arg-type]
        assert refused.value.argument == "usage"
    with pytest.raises(InvalidArgument) as blank:
        await tracker.record_step(report_id, account, " ", Usage(), O3)
    assert blank.value.argument == "step_name"
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.report_step_usage") == 0


async def test_the_server_refuses_a_broken_usage_naming_the_field(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    # A Usage cannot be made broken; forced past its checks, the server's own refusal
    # (SQLSTATE class 22) comes back as the same InvalidArgument.
    account = await new_account(conn)
    report_id = uuid.uuid4()
    await tracker.try_reserve(account, report_id, 10_000)
    broken = Usage(input_tokens=5, output_tokens=5)
    object.__setattr__(broken, "reasoning_tokens", 6)
    with pytest.raises(InvalidArgument, match="reasoning_tokens") as refused:
        await tracker.record_step(report_id, account, "AN0", broken, O3)
    assert str(refused.value.sqlstate).startswith("22")
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.report_step_usage") == 0


async def test_a_usage_step_after_cancel_report_is_billed_then_stops_the_generator(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    await set_price(conn, CLAUDE, CLAUDE_PRICES)
    account = await new_account(conn)
    report_id = uuid.uuid4()
    async with tracker.track_report(account, report_id, 20_000) as report:
        await tracker.cancel_report(report_id, account)
        with pytest.raises(ReportCancelled) as cancelled:
            await report.step("AN2", usage=Usage.from_anthropic(ANTHROPIC_MESSAGE), model=CLAUDE)
    assert cancelled.value.step is not None
    assert (cancelled.value.step.late, cancelled.value.step.cost_micros) == (True, CLAUDE_COST)
    assert report.tokens_recorded == 8_050
    assert (await period(conn, account))["tokens_used"] == 8_050
    await assert_reconciled(conn)
