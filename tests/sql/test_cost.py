"""Contract Part 2: token classes (record_step), prices (set_model_price) and each step's cost."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import asyncpg
import pytest

from sqlkit import (
    Connect,
    assert_reconciled,
    call,
    counts,
    new_account,
    reserve,
    step,
)

# Micros per million tokens, as a price list would say them: $3 / $0.30 / $3.75 / $15 per Mtok.
CLAUDE = {
    "input": 3_000_000,
    "cached_input": 300_000,
    "cache_write": 3_750_000,
    "output": 15_000_000,
}
# $2 input, $0.50 cached, $8 output; reasoning at the output price (the default).
O_SERIES = {"input": 2_000_000, "cached_input": 500_000, "output": 8_000_000}


def expected_cost(prices: dict[str, Any], usage: dict[str, int]) -> int:
    """The contract's formula, independently of the SQL: defaults, then one rounding half up."""
    p = {k: Decimal(str(v)) for k, v in prices.items()}
    p.setdefault("cached_input", p["input"])
    p.setdefault("cache_write", p["input"])
    p.setdefault("reasoning", p["output"])
    u = {
        k: usage.get(k, 0)
        for k in (
            "input_tokens",
            "cached_input_tokens",
            "cache_write_tokens",
            "output_tokens",
            "reasoning_tokens",
        )
    }
    total = (
        (u["input_tokens"] - u["cached_input_tokens"] - u["cache_write_tokens"]) * p["input"]
        + u["cached_input_tokens"] * p["cached_input"]
        + u["cache_write_tokens"] * p["cache_write"]
        + (u["output_tokens"] - u["reasoning_tokens"]) * p["output"]
        + u["reasoning_tokens"] * p["reasoning"]
    ) / Decimal(1_000_000)
    return int(total.quantize(Decimal(1), rounding=ROUND_HALF_UP))


async def set_price(
    conn: asyncpg.Connection, model: str, prices: dict[str, Any], effective_from: Any = None
) -> dict[str, Any]:
    if effective_from is None:
        return await call(conn, "set_model_price", model, json.dumps(prices))
    return await call(conn, "set_model_price", model, json.dumps(prices), effective_from)


async def record(
    conn: asyncpg.Connection,
    report: uuid.UUID,
    account: uuid.UUID,
    name: str,
    usage: dict[str, Any],
    model: str | None = None,
) -> dict[str, Any]:
    return await call(conn, "record_step", report, account, name, json.dumps(usage), model)


async def step_row(conn: asyncpg.Connection, step_id: str) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT * FROM tokentrack.report_step_usage WHERE id = $1", uuid.UUID(step_id)
    )
    assert row is not None
    return row


# An Anthropic step with cache reads and writes: Anthropic's input_tokens (750) excludes them,
# the canonical input counts them (750 + 5,000 + 2,000).
ANTHROPIC_STEP = {
    "input_tokens": 7_750,
    "cached_input_tokens": 5_000,
    "cache_write_tokens": 2_000,
    "output_tokens": 420,
}
# An OpenAI reasoning step: 1,200 prompt tokens of which 1,024 cached, 900 completion tokens of
# which 640 reasoning.
OPENAI_STEP = {
    "input_tokens": 1_200,
    "cached_input_tokens": 1_024,
    "output_tokens": 900,
    "reasoning_tokens": 640,
    "total_tokens": 2_100,
}


async def test_an_anthropic_cache_step_and_an_openai_reasoning_step_bill_their_classes_and_cost(
    conn: asyncpg.Connection,
) -> None:
    await set_price(conn, "claude-sonnet-4-5", CLAUDE)
    await set_price(conn, "o4-mini", O_SERIES)
    account = await new_account(conn)
    report, _ = await reserve(conn, account, 20_000)

    a = await record(conn, report, account, "AN0", ANTHROPIC_STEP, "claude-sonnet-4-5")
    claude_cost = expected_cost(CLAUDE, ANTHROPIC_STEP)
    # (750 x 3 + 5,000 x 0.3 + 2,000 x 3.75 + 420 x 15) micros = 17,550.
    assert claude_cost == 17_550
    assert a == {
        "success": True,
        "step_id": a["step_id"],
        "total_tokens": 8_170,
        "duplicate": False,
        "late": False,
        "cost_micros": claude_cost,
    }
    row = await step_row(conn, a["step_id"])
    assert (
        row["input_tokens"],
        row["cached_input_tokens"],
        row["cache_write_tokens"],
        row["output_tokens"],
        row["reasoning_tokens"],
        row["total_tokens"],
        row["cost_micros"],
    ) == (7_750, 5_000, 2_000, 420, 0, 8_170, claude_cost)

    o = await record(conn, report, account, "AN1", OPENAI_STEP, "o4-mini")
    openai_cost = expected_cost(O_SERIES, OPENAI_STEP)
    # 176 x 2 + 1,024 x 0.5 + 260 x 8 + 640 x 8 = 8,064 micros.
    assert openai_cost == 8_064
    assert (o["total_tokens"], o["cost_micros"]) == (2_100, openai_cost)

    done = await call(conn, "finish_report", report, account, "complete", None)
    assert done["billed_tokens"] == 8_170 + 2_100
    usage = json.loads(
        await conn.fetchval(
            "SELECT token_usage::text FROM tokentrack.reports WHERE id = $1", report
        )
    )
    assert {k: v for k, v in usage.items() if k != "billedAt"} == {
        "totalTokens": 10_270,
        "inputTokens": 8_950,
        "outputTokens": 1_320,
        "cachedInputTokens": 6_024,
        "cacheWriteTokens": 2_000,
        "reasoningTokens": 640,
        "costMicros": claude_cost + openai_cost,
        "unpricedSteps": 0,
        "steps": 2,
    }
    await assert_reconciled(conn)


async def test_a_price_change_in_the_middle_of_a_report_prices_each_step_by_its_completed_at(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    old = {"input": 1_000_000, "output": 2_000_000}
    new = {"input": 4_000_000, "output": 6_000_000}
    await set_price(conn, "gpt-4.1", old)
    account = await new_account(conn)
    report, _ = await reserve(conn, account, 10_000)
    usage = {"input_tokens": 1_000, "output_tokens": 500}
    first = await record(conn, report, account, "AN0", usage, "gpt-4.1")
    changed = await set_price(conn, "gpt-4.1", new)
    assert changed["duplicate"] is False
    second = await record(conn, report, account, "AN1", usage, "gpt-4.1")
    assert first["cost_micros"] == expected_cost(old, usage) == 2_000
    assert second["cost_micros"] == expected_cost(new, usage) == 7_000
    first_row, second_row = (
        await step_row(conn, first["step_id"]),
        await step_row(conn, second["step_id"]),
    )
    effective = datetime.fromisoformat(changed["effective_from"])
    assert first_row["completed_at"] < effective <= second_row["completed_at"]

    await call(conn, "finish_report", report, account, "complete", None)
    cost = await conn.fetchval(
        "SELECT (token_usage ->> 'costMicros')::bigint FROM tokentrack.reports WHERE id = $1",
        report,
    )
    assert cost == 9_000
    answer = await call(conn, "reconcile", account)
    assert (answer["ok"], answer["costs_checked"]) == (True, 2)


async def test_unpriced_steps_have_no_cost_still_count_and_are_refused_by_nothing(
    conn: asyncpg.Connection,
) -> None:
    await set_price(conn, "known", {"input": 1_000_000, "output": 1_000_000})
    account = await new_account(conn)
    report, _ = await reserve(conn, account, 1_000)
    unknown = await record(
        conn, report, account, "AN0", {"input_tokens": 10, "output_tokens": 5}, "unknown"
    )
    no_model = await record(conn, report, account, "AN1", {"input_tokens": 1, "output_tokens": 1})
    priced = await record(
        conn, report, account, "AN2", {"input_tokens": 3, "output_tokens": 3}, "known"
    )
    legacy = await step(conn, report, account, "AN3", 2, 2, None, "unknown")
    assert unknown["success"]
    assert no_model["success"]
    assert legacy["success"]
    assert unknown["cost_micros"] is None
    assert no_model["cost_micros"] is None
    assert priced["cost_micros"] == 6
    assert "cost_micros" not in legacy  # Part 1's answer, key for key
    settled = await call(conn, "finish_report", report, account, "complete", None)
    assert settled["billed_tokens"] == 15 + 2 + 6 + 4  # unpriced tokens bill as any
    usage = json.loads(
        await conn.fetchval(
            "SELECT token_usage::text FROM tokentrack.reports WHERE id = $1", report
        )
    )
    assert (usage["costMicros"], usage["unpricedSteps"]) == (6, 3)


async def test_persist_step_usage_prices_its_step_too_with_no_other_classes(
    conn: asyncpg.Connection,
) -> None:
    await set_price(conn, "gpt-4o", {"input": 2_500_000, "output": 10_000_000})
    account = await new_account(conn)
    report, _ = await reserve(conn, account, 2_000)  # within it: no over_reservation key
    answer = await step(conn, report, account, "AN0", 1_000, 100, None, "gpt-4o")
    assert set(answer) == {"success", "step_id", "total_tokens", "duplicate", "late"}
    row = await step_row(conn, answer["step_id"])
    assert (row["cached_input_tokens"], row["cache_write_tokens"], row["reasoning_tokens"]) == (
        0,
        0,
        0,
    )
    assert row["cost_micros"] == 3_500


async def test_cost_rounds_half_up_once(conn: asyncpg.Connection) -> None:
    # 500 micros per Mtok: 1,000 tokens cost exactly 0.5 micro (up to 1); 2,999 cost 1.4995
    # (down to 1); 3,000 cost 1.5 (up to 2). Fractional prices count exactly: 1.5 micros per
    # Mtok x 1,000,000 tokens = 1.5 micros (up to 2), where a float would not be exact.
    await set_price(conn, "half", {"input": 500, "output": 0})
    await set_price(conn, "frac", {"input": 1.5, "output": 0.25})
    account = await new_account(conn, 10_000_000)
    report, _ = await reserve(conn, account, 5_000_000)
    cases = [("half", 1_000, 1), ("half", 2_999, 1), ("half", 3_000, 2), ("frac", 1_000_000, 2)]
    for i, (model, tokens, cost) in enumerate(cases):
        answer = await record(conn, report, account, f"S{i}", {"input_tokens": tokens}, model)
        assert answer["cost_micros"] == cost, (model, tokens)
        assert expected_cost(await prices_of(conn, model), {"input_tokens": tokens}) == cost
    # Output and reasoning: 0.25 x 3,000,000 output = 0.75 micro, up to 1.
    answer = await record(conn, report, account, "S9", {"output_tokens": 3_000_000}, "frac")
    assert answer["cost_micros"] == 1


async def prices_of(conn: asyncpg.Connection, model: str) -> dict[str, Decimal]:
    row = await conn.fetchrow(
        "SELECT input, cached_input, cache_write, output, reasoning FROM tokentrack.model_prices"
        " WHERE model = $1 ORDER BY effective_from DESC LIMIT 1",
        model,
    )
    assert row is not None
    return dict(row)


async def test_an_exact_name_wins_over_patterns_and_the_most_specific_pattern_wins(
    conn: asyncpg.Connection,
) -> None:
    await set_price(conn, "gpt-4o*", {"input": 1_000_000, "output": 0})
    await set_price(conn, "gpt-4o-mini*", {"input": 2_000_000, "output": 0})
    await set_price(conn, "gpt-4o-mini-2024-07-18", {"input": 3_000_000, "output": 0})
    await set_price(conn, "a_b%*", {"input": 4_000_000, "output": 0})
    account = await new_account(conn, 1_000_000)
    report, _ = await reserve(conn, account, 100_000)
    cases = [
        ("gpt-4o-2024-08-06", 1),  # only gpt-4o* matches
        ("gpt-4o-mini-2024-09-09", 2),  # gpt-4o-mini* is more specific than gpt-4o*
        ("gpt-4o-mini-2024-07-18", 3),  # the exact name wins
        ("gpt-4o", 1),  # `*` matches the empty run too
        ("a_b%c", 4),  # _ and % in a pattern stand for themselves
        ("axb%c", None),
        ("aXb_c", None),
        ("GPT-4O", None),  # case-sensitive
    ]
    for i, (model, per_token) in enumerate(cases):
        answer = await record(conn, report, account, f"S{i}", {"input_tokens": 1_000_000}, model)
        assert answer["cost_micros"] == (None if per_token is None else per_token * 1_000_000), (
            model
        )


async def test_a_future_price_takes_effect_when_it_is_due(conn: asyncpg.Connection) -> None:
    await set_price(conn, "m", {"input": 1_000_000, "output": 0})
    later = datetime.now().astimezone() + timedelta(days=1)
    scheduled = await set_price(conn, "m", {"input": 9_000_000, "output": 0}, later)
    assert datetime.fromisoformat(scheduled["effective_from"]) == later
    account = await new_account(conn)
    report, _ = await reserve(conn, account)
    answer = await record(conn, report, account, "S0", {"input_tokens": 1_000}, "m")
    assert answer["cost_micros"] == 1_000  # the price of today
    # Asked again, the same schedule is a repeat, and other prices at that moment conflict.
    again = await set_price(conn, "m", {"input": 9_000_000, "output": 0}, later)
    assert (again["duplicate"], again["price_id"]) == (True, scheduled["price_id"])
    other = await set_price(conn, "m", {"input": 8_000_000, "output": 0}, later)
    assert other["success"] is False
    assert other["error"] == "price_conflict"


async def test_setting_the_price_in_effect_again_adds_nothing(conn: asyncpg.Connection) -> None:
    first = await set_price(conn, "m", {"input": 1_000_000, "output": 2_000_000})
    # Explicit defaults are the same prices.
    again = await set_price(
        conn,
        "m",
        {"input": 1_000_000.0, "output": 2_000_000, "cached_input": 1_000_000, "reasoning": 2e6},
    )
    assert again["duplicate"] is True
    assert again["price_id"] == first["price_id"]
    assert again["prices"] == {
        "input": 1_000_000,
        "cached_input": 1_000_000,
        "cache_write": 1_000_000,
        "output": 2_000_000,
        "reasoning": 2_000_000,
    }
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.model_prices") == 1


async def test_a_price_is_never_back_dated(conn: asyncpg.Connection) -> None:
    past = datetime.now().astimezone() - timedelta(minutes=1)
    with pytest.raises(asyncpg.PostgresError) as caught:
        await set_price(conn, "m", {"input": 1, "output": 1}, past)
    assert caught.value.sqlstate == "22023"
    assert "p_effective_from" in str(caught.value)
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.model_prices") == 0


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE tokentrack.model_prices SET input = 0",
        "DELETE FROM tokentrack.model_prices",
        "TRUNCATE tokentrack.model_prices",
    ],
)
async def test_prices_are_never_edited_in_place(conn: asyncpg.Connection, statement: str) -> None:
    await set_price(conn, "m", {"input": 1, "output": 1})
    with pytest.raises(asyncpg.PostgresError) as caught:
        await conn.execute(statement)
    assert caught.value.sqlstate == "55000"
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.model_prices") == 1


async def test_a_price_set_while_a_step_is_being_recorded_waits_for_it(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    """The step's transaction holds model_prices ROW SHARE from its price lookup to its commit;
    set_model_price's EXCLUSIVE waits, and dates the new price after that commit, so the
    step's stored cost stays the one in effect at its completed_at."""
    await set_price(conn, "m", {"input": 1_000_000, "output": 0})
    account = await new_account(conn)
    report, _ = await reserve(conn, account)
    recorder, pricer = await connect(), await connect()
    async with recorder.transaction():
        answer = await record(recorder, report, account, "S0", {"input_tokens": 1_000}, "m")
        assert answer["cost_micros"] == 1_000
        change = asyncio.ensure_future(set_price(pricer, "m", {"input": 5_000_000, "output": 0}))
        await asyncio.sleep(0.3)
        assert not change.done()  # waiting for the step's transaction
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND mode = 'ExclusiveLock'"
            " AND relation = 'tokentrack.model_prices'::regclass"
        )
        assert waiting == 1
    changed = await asyncio.wait_for(change, 10)
    row = await step_row(conn, answer["step_id"])
    assert row["completed_at"] < datetime.fromisoformat(changed["effective_from"])
    after = await record(conn, report, account, "S1", {"input_tokens": 1_000}, "m")
    assert after["cost_micros"] == 5_000
    await assert_reconciled(conn)


async def test_prices_changing_while_steps_race_leave_every_cost_explainable(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    account = await new_account(conn, 10_000_000)
    reports = [(await reserve(conn, account, 10_000))[0] for _ in range(4)]
    await set_price(conn, "m", {"input": 1_000_000, "output": 1_000_000})

    async def recorder(report: uuid.UUID) -> None:
        c = await connect()
        for i in range(40):
            await record(c, report, account, f"S{i}", {"input_tokens": 7, "output_tokens": 3}, "m")

    async def pricer() -> None:
        c = await connect()
        for i in range(20):
            await set_price(c, "m", {"input": 1_000_000 * (i + 2), "output": 1_000_000})
            await asyncio.sleep(0.005)

    await asyncio.gather(pricer(), *(recorder(r) for r in reports))
    answer = await call(conn, "reconcile", account)
    assert answer["ok"] is True, answer["discrepancies"]
    assert answer["costs_checked"] == 160
    costs = await conn.fetchval(
        "SELECT count(DISTINCT cost_micros) FROM tokentrack.report_step_usage"
        " WHERE account_id = $1",
        account,
    )
    assert costs > 1  # the steps did see several prices


async def test_reconcile_finds_a_stored_cost_that_does_not_follow_from_its_price(
    conn: asyncpg.Connection,
) -> None:
    await set_price(conn, "m", {"input": 1_000_000, "output": 1_000_000})
    account = await new_account(conn)
    report, _ = await reserve(conn, account)
    answer = await record(conn, report, account, "S0", {"input_tokens": 10}, "m")
    await record(conn, report, account, "S1", {"input_tokens": 10}, "m")
    # An unbilled step is not a billing record yet: an UPDATE gets through the guard.
    await conn.execute(
        "UPDATE tokentrack.report_step_usage SET cost_micros = 99 WHERE id = $1",
        uuid.UUID(answer["step_id"]),
    )
    verdict = await call(conn, "reconcile", account)
    assert verdict["ok"] is False
    assert verdict["costs_checked"] == 2
    assert verdict["discrepancies"] == [
        {
            "account_id": str(account),
            "check": "step_cost",
            "expected": 10,
            "actual": 99,
            "step_id": answer["step_id"],
        }
    ]


async def test_a_late_step_bills_its_classes_and_cost_at_once(conn: asyncpg.Connection) -> None:
    await set_price(conn, "claude", CLAUDE)
    account = await new_account(conn)
    report, _ = await reserve(conn, account, 20_000)
    first = await record(conn, report, account, "AN0", ANTHROPIC_STEP, "claude")
    await call(conn, "finish_report", report, account, "complete", None)
    late = await record(conn, report, account, "AN1", OPENAI_STEP, "claude")
    assert (late["late"], late["report_status"]) == (True, "complete")
    assert late["cost_micros"] == expected_cost(CLAUDE, OPENAI_STEP)
    usage = json.loads(
        await conn.fetchval(
            "SELECT token_usage::text FROM tokentrack.reports WHERE id = $1", report
        )
    )
    # The report's cost, as its totalTokens, counts the late step; the class sums, as
    # inputTokens and outputTokens, stay those of the steps billed with the reservation.
    assert usage["costMicros"] == first["cost_micros"] + late["cost_micros"]
    assert usage["totalTokens"] == 8_170 + 2_100
    assert (usage["inputTokens"], usage["cachedInputTokens"]) == (7_750, 5_000)
    assert (usage["cacheWriteTokens"], usage["reasoningTokens"]) == (2_000, 0)
    assert (usage["lateSteps"], usage["unpricedSteps"]) == (1, 0)
    await assert_reconciled(conn)


async def test_record_step_retries_and_conflicts_compare_every_class(
    conn: asyncpg.Connection,
) -> None:
    await set_price(conn, "m", {"input": 1_000_000, "output": 1_000_000})
    account = await new_account(conn)
    report, _ = await reserve(conn, account, 20_000)
    first = await record(conn, report, account, "AN0", ANTHROPIC_STEP, "m")
    before = await counts(conn)
    again = await record(conn, report, account, "AN0", ANTHROPIC_STEP, "m")
    assert again == {**first, "duplicate": True}
    other = await record(
        conn, report, account, "AN0", {**ANTHROPIC_STEP, "cached_input_tokens": 4_999}, "m"
    )
    assert other["success"] is False
    assert other["error"] == "step_conflict"
    assert other["recorded"] == {
        "input_tokens": 7_750,
        "cached_input_tokens": 5_000,
        "cache_write_tokens": 2_000,
        "output_tokens": 420,
        "reasoning_tokens": 0,
        "total_tokens": 8_170,
    }
    # Part 1's call for the same step: its numbers say no cached or cache-write tokens.
    legacy = await step(conn, report, account, "AN0", 7_750, 420)
    assert legacy["error"] == "step_conflict"
    assert legacy["recorded"] == {
        "input_tokens": 7_750,
        "output_tokens": 420,
        "total_tokens": 8_170,
    }
    assert await counts(conn) == before


async def test_absent_and_null_classes_are_zero(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    report, _ = await reserve(conn, account)
    answer = await record(
        conn,
        report,
        account,
        "S0",
        {"input_tokens": 4, "cached_input_tokens": None, "total_tokens": None},
    )
    row = await step_row(conn, answer["step_id"])
    assert (
        row["input_tokens"],
        row["cached_input_tokens"],
        row["output_tokens"],
        row["total_tokens"],
    ) == (
        4,
        0,
        0,
        4,
    )


USAGE_CASES: list[tuple[Any, str, str]] = [
    # p_usage, field named in the message, SQLSTATE
    (None, "p_usage", "22004"),
    ([1, 2], "p_usage", "22023"),
    ({"input_tokens": 1, "prompt_tokens": 1}, "p_usage.prompt_tokens", "22023"),
    ({"input_tokens": -1}, "p_usage.input_tokens", "22023"),
    ({"output_tokens": 1.5}, "p_usage.output_tokens", "22023"),
    ({"output_tokens": "12"}, "p_usage.output_tokens", "22023"),
    ({"reasoning_tokens": True}, "p_usage.reasoning_tokens", "22023"),
    ({"input_tokens": 2_147_483_648}, "p_usage.input_tokens", "22003"),
    ({"input_tokens": 5, "cached_input_tokens": 6}, "p_usage.cached_input_tokens", "22023"),
    (
        {"input_tokens": 5, "cached_input_tokens": 3, "cache_write_tokens": 3},
        "p_usage.cache_write_tokens",
        "22023",
    ),
    ({"output_tokens": 5, "reasoning_tokens": 6}, "p_usage.reasoning_tokens", "22023"),
    ({"input_tokens": 5, "output_tokens": 5, "total_tokens": 9}, "p_usage.total_tokens", "22023"),
    (
        {"input_tokens": 2_000_000_000, "output_tokens": 2_000_000_000},
        "p_usage.total_tokens",
        "22003",
    ),
]


@pytest.mark.parametrize(("usage", "field", "sqlstate"), USAGE_CASES)
async def test_an_invalid_usage_is_refused_naming_the_field(
    conn: asyncpg.Connection, usage: Any, field: str, sqlstate: str
) -> None:
    account = await new_account(conn)
    report, _ = await reserve(conn, account)
    before = await counts(conn)
    with pytest.raises(asyncpg.PostgresError) as caught:
        await conn.fetchval(
            "SELECT tokentrack.record_step($1, $2, 'S0', $3::jsonb, NULL)",
            report,
            account,
            None if usage is None else json.dumps(usage),
        )
    assert caught.value.sqlstate == sqlstate, caught.value
    assert field in str(caught.value)
    assert getattr(caught.value, "column_name", None) == field
    assert await counts(conn) == before


PRICE_CASES: list[tuple[Any, Any, str, str]] = [
    # model, p_prices, argument or field named in the message, SQLSTATE
    (None, {"input": 1, "output": 1}, "p_model", "22004"),
    ("  ", {"input": 1, "output": 1}, "p_model", "22023"),
    ("x" * 201, {"input": 1, "output": 1}, "p_model", "22001"),
    ("m", None, "p_prices", "22004"),
    ("m", [1], "p_prices", "22023"),
    ("m", {"output": 1}, "p_prices.input", "22023"),
    ("m", {"input": 1}, "p_prices.output", "22023"),
    ("m", {"input": 1, "output": 1, "cache_read": 1}, "p_prices.cache_read", "22023"),
    ("m", {"input": -1, "output": 1}, "p_prices.input", "22023"),
    ("m", {"input": 1, "output": "1"}, "p_prices.output", "22023"),
    ("m", {"input": 1, "output": 1, "reasoning": None}, "p_prices.reasoning", "22004"),
    ("m", {"input": 1e13, "output": 1}, "p_prices.input", "22003"),
]


@pytest.mark.parametrize(("model", "prices", "field", "sqlstate"), PRICE_CASES)
async def test_an_invalid_price_is_refused_naming_the_field(
    conn: asyncpg.Connection, model: Any, prices: Any, field: str, sqlstate: str
) -> None:
    with pytest.raises(asyncpg.PostgresError) as caught:
        await conn.fetchval(
            "SELECT tokentrack.set_model_price($1, $2::jsonb)",
            model,
            None if prices is None else json.dumps(prices),
        )
    assert caught.value.sqlstate == sqlstate, caught.value
    assert field in str(caught.value)
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.model_prices") == 0


async def test_health_reports_the_unpriced_steps_of_its_window_by_model(
    conn: asyncpg.Connection,
) -> None:
    await set_price(conn, "priced", {"input": 1_000_000, "output": 1_000_000})
    account = await new_account(conn)
    report, _ = await reserve(conn, account)
    await record(conn, report, account, "S0", {"input_tokens": 10, "output_tokens": 10}, "priced")
    await record(conn, report, account, "S1", {"input_tokens": 30}, "new-model")
    await record(conn, report, account, "S2", {"input_tokens": 5}, "new-model")
    await record(conn, report, account, "S3", {"input_tokens": 7})
    health = await call(conn, "health", 24)
    assert health["model_prices"] == 1
    assert health["steps"] == {
        "count": 4,
        "tokens": 62,
        "cost_micros": 20,
        "unpriced": {
            "count": 3,
            "tokens": 42,
            "models": [
                {"model": "new-model", "steps": 2, "tokens": 35},
                {"model": None, "steps": 1, "tokens": 7},
            ],
        },
    }


async def test_a_price_is_refused_in_a_transaction_that_recorded_a_step_with_a_model(
    conn: asyncpg.Connection,
) -> None:
    """Two such transactions would each wait for the other's ROW SHARE lock: refused at once."""
    await set_price(conn, "m", {"input": 1, "output": 1})
    account = await new_account(conn)
    report, _ = await reserve(conn, account)
    async with conn.transaction():
        await record(conn, report, account, "S0", {"input_tokens": 1}, "m")
        with pytest.raises(asyncpg.PostgresError) as caught:
            await set_price(conn, "m", {"input": 2, "output": 2})
    assert caught.value.sqlstate == "25000"
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.model_prices") == 1
