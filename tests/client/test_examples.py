"""The example report generators in examples/, each run against a test database."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType

import asyncpg
import pytest

import tokentrack_client
from client_fixtures import report_state
from sqlkit import assert_reconciled, new_account, period
from tokentrack_client import TokenTracker

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GENERATORS = ("standard_report", "dd_report", "discovery_report", "hybrid_report")
ALL_STEPS = {"AN0", "AN1.5", "AN1.7", "AN2", "AN3", "AN4", "AN5"}


@pytest.fixture
def examples(monkeypatch: pytest.MonkeyPatch) -> dict[str, ModuleType]:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return {
        name: importlib.import_module(name) for name in (*GENERATORS, "fake_llm", "cost_report")
    }


@pytest.mark.parametrize("name", GENERATORS)
async def test_each_example_bills_exactly_what_its_llm_used(
    examples: dict[str, ModuleType],
    tracker: TokenTracker,
    conn: asyncpg.Connection,
    name: str,
) -> None:
    module = examples[name]
    fake_llm = examples["fake_llm"]
    account = await new_account(conn, 1_000_000)
    report_id = uuid.uuid4()
    llm = fake_llm.FakeLLM(seed=2026)
    text = await module.generate(tracker, account, report_id, llm, topic="Acme Corp")

    assert "[AN5: write the report" in text
    assert set(module.STEPS) <= ALL_STEPS
    assert sorted(llm.calls) == sorted(module.STEPS)
    usage = {step: llm.usage(step) for step in module.STEPS}
    expected = sum(total for _, _, total in usage.values())
    state = await report_state(conn, report_id)
    assert state["status"] == "complete"
    assert {s: row["total_tokens"] for s, row in state["steps"].items()} == {
        s: total for s, (_, _, total) in usage.items()
    }
    assert state["reservation"]["reserved_tokens"] == fake_llm.estimate(module.STEPS)
    assert state["reservation"]["billed_tokens"] == expected <= fake_llm.estimate(module.STEPS)
    row = await period(conn, account)
    assert (row["tokens_used"], row["reports_count"]) == (expected, 1)
    await assert_reconciled(conn)


def test_the_modes_use_different_step_subsets(examples: dict[str, ModuleType]) -> None:
    subsets = {examples[name].MODE: tuple(examples[name].STEPS) for name in GENERATORS}
    assert set(subsets) == {"standard", "dd", "discovery", "hybrid"}
    assert len(set(subsets.values())) == 4
    assert set().union(*map(set, subsets.values())) == ALL_STEPS


async def test_an_example_whose_llm_fails_ends_failed_with_the_finished_steps_billed(
    examples: dict[str, ModuleType], tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    fake_llm = examples["fake_llm"]
    account = await new_account(conn, 1_000_000)
    report_id = uuid.uuid4()
    llm = fake_llm.FakeLLM(seed=5, fail_at="AN3")
    with pytest.raises(fake_llm.LLMError, match="AN3"):
        await examples["dd_report"].generate(tracker, account, report_id, llm, topic="Globex")
    state = await report_state(conn, report_id)
    assert state["status"] == "failed"
    assert "AN3" in state["error_message"]
    assert set(state["steps"]) == {"AN0", "AN1.5", "AN1.7", "AN2"}
    billed = sum(llm.usage(s)[2] for s in state["steps"])
    assert state["reservation"]["billed_tokens"] == billed
    await assert_reconciled(conn)


async def test_the_fake_llm_is_seeded(examples: dict[str, ModuleType]) -> None:
    fake_llm = examples["fake_llm"]
    first = [await fake_llm.FakeLLM(seed=1).complete(s, "p") for s in sorted(ALL_STEPS)]
    again = [await fake_llm.FakeLLM(seed=1).complete(s, "p") for s in sorted(ALL_STEPS)]
    other = [await fake_llm.FakeLLM(seed=2).complete(s, "p") for s in sorted(ALL_STEPS)]
    assert first == again
    assert first != other
    reasoning = await fake_llm.FakeLLM(seed=1).complete("AN3", "p")
    assert reasoning.total_tokens > reasoning.input_tokens + reasoning.output_tokens


async def test_the_cost_example_records_each_provider_by_class_and_prices_it(
    examples: dict[str, ModuleType], tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    module = examples["cost_report"]
    for model, prices in module.PRICES.items():
        answer = await conn.fetchval(
            "SELECT tokentrack.set_model_price($1, $2::jsonb)->>'success'",
            model,
            json.dumps(prices),
        )
        assert answer == "true"
    account = await new_account(conn, 1_000_000)
    report_id = uuid.uuid4()
    providers = module.FakeProviders()
    text = await module.generate(tracker, account, report_id, providers, topic="Acme Corp")
    assert providers.calls == list(module.STEPS)
    # By hand, in micros (prices per million tokens):
    # AN0 gpt-4o-mini: (2,400 - 1,024) x 0.15 + 1,024 x 0.075 + 380 x 0.6 = 511.2 -> 511
    # AN2 claude-sonnet-4-5 (Anthropic's input_tokens 750 exclude the 5,000 cache reads and
    #     the 2,000 writes; 400 of the 1,200 output tokens are thinking, priced as output):
    #     750 x 3 + 5,000 x 0.3 + 2,000 x 3.75 + 1,200 x 15 = 29,250
    # AN3 o3-mini: (8,000 - 2,048) x 1.1 + 2,048 x 0.55 + 3,200 x 4.4 = 21,753.6 -> 21,754
    assert text.splitlines() == [
        "AN0 gpt-4o-mini: 2400 in (1024 cached, 0 written), 380 out (0 reasoning), "
        "2780 tokens, 511 micros",
        "AN2 claude-sonnet-4-5: 7750 in (5000 cached, 2000 written), 1200 out (400 reasoning), "
        "8950 tokens, 29250 micros",
        "AN3 o3-mini: 8000 in (2048 cached, 0 written), 3200 out (2304 reasoning), "
        "11200 tokens, 21754 micros",
        "22930 tokens, 51515 micros",
    ]
    state = await report_state(conn, report_id)
    assert state["status"] == "complete"
    usage = state["token_usage"]
    assert (usage["totalTokens"], usage["costMicros"]) == (22_930, 51_515)
    assert (usage["cachedInputTokens"], usage["cacheWriteTokens"]) == (1_024 + 5_000 + 2_048, 2_000)
    assert usage["reasoningTokens"] == 400 + 2_304
    assert (await period(conn, account))["tokens_used"] == 22_930
    await assert_reconciled(conn)


def test_examples_use_only_the_public_client_api() -> None:
    public = set(tokentrack_client.__all__)
    for path in sorted(EXAMPLES.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "tokentrack_client"
            ):
                assert node.module == "tokentrack_client", f"{path.name}: {node.module}"
                assert {a.name for a in node.names} <= public, path.name
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("tokentrack_client") for a in node.names)
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert "tokentrack." not in node.value, f"{path.name} uses SQL directly"


@pytest.mark.parametrize("mode", ["standard", "hybrid"])
def test_the_runner_script_runs_an_example_against_a_database(db_dsn: str, mode: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "run.py"), mode, "--seed", "3", "--database-url", db_dsn],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"({mode}):" in result.stdout
    assert "reconcile: ok" in result.stdout
