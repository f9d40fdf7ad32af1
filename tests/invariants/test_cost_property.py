"""Invariant 8 (every cost is explainable), first half, against an oracle in Python.

Hypothesis draws prices (whole and fractional micros per million tokens, optional classes
left to their defaults, price changes between steps, exact names and patterns) and steps in
the canonical classes (every inclusion at its edges); each step is recorded with
``record_step`` and its stored cost must be what the contract's formula gives in exact
decimal arithmetic, rounded half up once, with the price in effect chosen as the docs say.
At the end the report's ``token_usage`` must hold the sums of its classes and costs, and
``reconcile`` must be ok. One database per example (cloned from the template).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokentrack_client.testing import PostgresServer
from tokentrack_client.testing.pytest_plugin import TemplateDatabase
from workload import DatabaseFactory, database_factory

EXAMPLES = settings.default.max_examples
MODELS = ("gpt-x", "gpt-x-mini", "claude-y")
PATTERNS = ("gpt-x*", "gpt-x-mini*", "*")


@pytest.fixture(scope="module")
def example_database(
    pg_server: PostgresServer, tokentrack_template: TemplateDatabase
) -> DatabaseFactory:
    return database_factory(pg_server, tokentrack_template.template_dbname)


# A price: whole micros, or with up to 6 decimals (LiteLLM's cheapest models are fractions of
# a micro per token, so fractions per million are real).
price_value = st.one_of(
    st.integers(min_value=0, max_value=100_000_000),
    st.decimals(min_value=0, max_value=1_000_000, places=6, allow_nan=False, allow_infinity=False),
)


@st.composite
def prices(draw: st.DrawFn) -> dict[str, Decimal | int]:
    chosen: dict[str, Decimal | int] = {"input": draw(price_value), "output": draw(price_value)}
    for name in ("cached_input", "cache_write", "reasoning"):
        if draw(st.booleans()):
            chosen[name] = draw(price_value)
    return chosen


@st.composite
def usages(draw: st.DrawFn) -> dict[str, int]:
    input_tokens = draw(st.integers(min_value=0, max_value=2_000_000))
    cached = draw(st.integers(min_value=0, max_value=input_tokens))
    cache_write = draw(st.integers(min_value=0, max_value=input_tokens - cached))
    output = draw(st.integers(min_value=0, max_value=500_000))
    reasoning = draw(st.integers(min_value=0, max_value=output))
    usage = {
        "input_tokens": input_tokens,
        "cached_input_tokens": cached,
        "cache_write_tokens": cache_write,
        "output_tokens": output,
        "reasoning_tokens": reasoning,
    }
    if draw(st.booleans()):
        usage["total_tokens"] = input_tokens + output + draw(st.integers(0, 1_000))
    return usage


@dataclass(frozen=True)
class Step:
    model: str | None
    usage: dict[str, int]
    new_prices: tuple[tuple[str, dict[str, Decimal | int]], ...]  # set before this step


steps = st.lists(
    st.builds(
        Step,
        model=st.one_of(st.none(), st.sampled_from(MODELS), st.just("unknown-model")),
        usage=usages(),
        new_prices=st.lists(
            st.tuples(st.sampled_from(MODELS + PATTERNS), prices()), max_size=2
        ).map(tuple),
    ),
    min_size=1,
    max_size=6,
)


def in_effect(book: dict[str, dict[str, Decimal]], model: str | None) -> dict[str, Decimal] | None:
    """The documented choice: the exact name, else the matching pattern with the most
    characters other than `*` (ties: the smallest pattern text, byte by byte)."""
    if model is None:
        return None
    if model in book:
        return book[model]
    matching = [p for p in book if "*" in p and model.startswith(p.rstrip("*")) and p.endswith("*")]
    if not matching:
        return None
    best = sorted(matching, key=lambda p: (-len(p.replace("*", "")), p.encode()))[0]
    return book[best]


def with_defaults(given: dict[str, Decimal | int]) -> dict[str, Decimal]:
    p = {k: Decimal(v) for k, v in given.items()}
    p.setdefault("cached_input", p["input"])
    p.setdefault("cache_write", p["input"])
    p.setdefault("reasoning", p["output"])
    return p


def cost(price: dict[str, Decimal] | None, u: dict[str, int]) -> int | None:
    if price is None:
        return None
    micros = (
        (u["input_tokens"] - u["cached_input_tokens"] - u["cache_write_tokens"]) * price["input"]
        + u["cached_input_tokens"] * price["cached_input"]
        + u["cache_write_tokens"] * price["cache_write"]
        + (u["output_tokens"] - u["reasoning_tokens"]) * price["output"]
        + u["reasoning_tokens"] * price["reasoning"]
    ) / Decimal(1_000_000)
    return int(micros.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def as_json(prices_given: dict[str, Decimal | int]) -> str:
    # Decimal as exact JSON number text, never through float.
    return "{" + ", ".join(f'"{k}": {v}' for k, v in prices_given.items()) + "}"


async def run_example(dsn: str, plan: list[Step]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        account, report = uuid.uuid4(), uuid.uuid4()
        await conn.execute("SELECT tokentrack.open_usage_period($1, 2000000000, NULL)", account)
        await conn.execute("SELECT tokentrack.try_reserve_tokens($1, $2, 1000)", account, report)
        book: dict[str, dict[str, Decimal]] = {}
        sums = dict.fromkeys(
            ("input", "output", "cached", "cache_write", "reasoning", "total", "cost"), 0
        )
        unpriced = 0
        for i, step in enumerate(plan):
            for model, given_prices in step.new_prices:
                answer = json.loads(
                    await conn.fetchval(
                        "SELECT tokentrack.set_model_price($1, $2::jsonb)::text",
                        model,
                        as_json(given_prices),
                    )
                )
                assert answer["success"] is True, answer
                book[model] = with_defaults(given_prices)
            raw = await conn.fetchval(
                "SELECT tokentrack.record_step($1, $2, $3, $4::jsonb, $5)::text",
                report,
                account,
                f"S{i}",
                json.dumps(step.usage),
                step.model,
            )
            answer: dict[str, Any] = json.loads(raw)
            expected = cost(in_effect(book, step.model), step.usage)
            assert answer["cost_micros"] == expected, (step, book)
            u = step.usage
            total = u.get("total_tokens", u["input_tokens"] + u["output_tokens"])
            assert answer["total_tokens"] == total
            for key, value in (
                ("input", u["input_tokens"]),
                ("output", u["output_tokens"]),
                ("cached", u["cached_input_tokens"]),
                ("cache_write", u["cache_write_tokens"]),
                ("reasoning", u["reasoning_tokens"]),
                ("total", total),
                ("cost", expected or 0),
            ):
                sums[key] += value
            unpriced += expected is None
        await conn.execute(
            "SELECT tokentrack.finish_report($1, $2, 'complete', NULL)", report, account
        )
        usage = json.loads(
            await conn.fetchval(
                "SELECT token_usage::text FROM tokentrack.reports WHERE id = $1", report
            )
        )
        assert {k: v for k, v in usage.items() if k != "billedAt"} == {
            "totalTokens": sums["total"],
            "inputTokens": sums["input"],
            "outputTokens": sums["output"],
            "cachedInputTokens": sums["cached"],
            "cacheWriteTokens": sums["cache_write"],
            "reasoningTokens": sums["reasoning"],
            "costMicros": sums["cost"],
            "unpricedSteps": unpriced,
            "steps": len(plan),
        }
        verdict = json.loads(await conn.fetchval("SELECT tokentrack.reconcile(NULL)::text"))
        assert verdict["ok"] is True, verdict["discrepancies"]
        assert verdict["costs_checked"] == len(plan) - unpriced
    finally:
        await conn.close()


@settings(max_examples=EXAMPLES, deadline=None)
@given(plan=steps)
def test_every_stored_cost_is_the_contracts_formula_under_the_price_in_effect(
    example_database: DatabaseFactory, plan: list[Step]
) -> None:
    async def example() -> None:
        async with example_database() as dsn:
            await run_example(dsn, plan)

    asyncio.run(example())
