"""Reading LiteLLM's price map and converting it to tokentrack's micros, without a database.

LiteLLM gives currency units per token; tokentrack wants micros per million tokens: x 10^12,
exactly. The expected values below are computed by hand from the fixture's decimal text.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from tokentrack_client.ops.prices import (
    PriceEntry,
    Skipped,
    dumps,
    glob_matches,
    parse_litellm,
    read_litellm,
    to_micros,
)

FIXTURE = Path(__file__).parent / "fixtures" / "litellm_prices.json"

EXPECTED: dict[str, dict[str, Decimal]] = {
    "test-gpt-cached": {
        "input": Decimal(2_500_000),
        "cached_input": Decimal(1_250_000),
        "output": Decimal(10_000_000),
    },
    "test-claude-cache-write": {
        "input": Decimal(3_000_000),
        "cached_input": Decimal(300_000),
        "cache_write": Decimal(3_750_000),
        "output": Decimal(15_000_000),
    },
    "test-o-reasoning": {
        "input": Decimal(1_100_000),
        "output": Decimal(4_400_000),
        "reasoning": Decimal(8_800_000),
    },
    "test-nova-float-trap": {"input": Decimal(60_000), "output": Decimal(240_000)},
    "test-fractional-micros": {"input": Decimal("100000.00000000001"), "output": Decimal(0)},
    "bedrock/*/1-month-commitment/test-pattern": {
        "input": Decimal(10**12),  # the most a price may be: 1 unit per token
        "output": Decimal(500_000),
    },
}
"""What the fixture's importable entries become (absent optional classes stay absent)."""

SKIPPED = {
    "sample_spec": "sample_spec",
    "test-image-generation": "not_priced_per_token",
    "test-negative-cost": "invalid_cost",
    "test-not-an-object": "not_an_object",
}


@pytest.mark.parametrize(
    ("cost", "micros"),
    [
        ("2.5e-06", "2500000"),
        ("6e-08", "60000"),  # float: 6e-08 * 1e12 == 60000.00000000001
        ("0.0000165", "16500000"),  # float: 16499999.999999998
        ("1.3E-10", "130"),
        ("1e-20", "0.00000001"),
        ("1.0000000000000001E-7", "100000.00000000001"),
        ("0.00000150", "1500000"),
        ("0", "0"),
        ("0.0", "0"),
        ("-0.0", "0"),
        ("3", "3000000000000"),
    ],
)
def test_a_cost_per_token_is_exactly_10_to_the_12_micros_per_million(
    cost: str, micros: str
) -> None:
    converted = to_micros(Decimal(cost))
    assert converted == Decimal(micros)
    assert format(converted, "f") == micros  # canonical: no exponent, no trailing zeros
    assert to_micros(Decimal(cost)).as_tuple() == Decimal(micros).as_tuple()


def test_float_arithmetic_would_get_these_wrong() -> None:
    # Why the file is parsed with Decimal: the same products in float are off.
    assert 6e-08 * 1e12 != 60000
    assert 0.0000165 * 1e12 != 16500000
    entry = parse_litellm(
        '{"m": {"input_cost_per_token": 6e-08, "output_cost_per_token": 0.0000165}}'
    )
    assert entry.entries == (
        PriceEntry("m", {"input": Decimal(60000), "output": Decimal(16500000)}),
    )


def test_the_fixture_is_read_exactly_and_its_skips_have_reasons() -> None:
    parsed = read_litellm(FIXTURE)
    assert {e.model: dict(e.prices) for e in parsed.entries} == EXPECTED
    assert [e.model for e in parsed.entries] == list(EXPECTED)  # the file's order
    assert {s.model: s.reason for s in parsed.skipped} == SKIPPED
    details = {s.model: s.detail for s in parsed.skipped}
    assert details["test-negative-cost"] == "input_cost_per_token is negative: -0.000001"
    assert details["test-image-generation"] == (
        "no input_cost_per_token and no output_cost_per_token"
    )
    assert details["test-not-an-object"] == "a JSON str, not an object"
    assert parsed.filtered_out == 0


def test_tiered_and_service_tier_keys_are_ignored() -> None:
    parsed = parse_litellm(
        json.dumps(
            {
                "m": {
                    "input_cost_per_token": 1,
                    "output_cost_per_token": 0.5,
                    "input_cost_per_token_above_200k_tokens": 5,
                    "output_cost_per_token_batches": 7,
                    "cache_read_input_token_cost_priority": 9,
                }
            }
        )
    )
    assert parsed.entries == (
        PriceEntry("m", {"input": Decimal(10**12), "output": Decimal(5 * 10**11)}),
    )


def test_prices_go_to_sql_as_exact_json_number_text() -> None:
    (entry,) = parse_litellm(
        '{"m": {"input_cost_per_token": 6e-08, "output_cost_per_token": 1e-20,'
        ' "output_cost_per_reasoning_token": 2.5e-06, "cache_read_input_token_cost": 0}}'
    ).entries
    text = entry.as_json_text()
    assert text == '{"input": 60000, "cached_input": 0, "output": 0.00000001, "reasoning": 2500000}'
    assert json.loads(text, parse_float=Decimal) == entry.prices


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        ('"0.000001"', 'input_cost_per_token is not a number: "0.000001"'),
        ("null", "input_cost_per_token is not a number: null"),
        ("true", "input_cost_per_token is not a number: true"),
        ("[1]", "input_cost_per_token is not a number: [1]"),
        ("NaN", "input_cost_per_token is not a finite number: NaN"),
        ("-Infinity", "input_cost_per_token is not a finite number: -Infinity"),
        ("-1", "input_cost_per_token is negative: -1"),
        ("-0.5e-06", "input_cost_per_token is negative: -0.0000005"),
        ("1.0000001", "input_cost_per_token is above 1 per token (tokentrack's bound): 1.0000001"),
        ("2", "input_cost_per_token is above 1 per token (tokentrack's bound): 2"),
    ],
)
def test_a_cost_that_is_not_a_non_negative_number_skips_the_entry(value: str, detail: str) -> None:
    parsed = parse_litellm(
        f'{{"m": {{"input_cost_per_token": {value}, "output_cost_per_token": 1e-06}}}}'
    )
    assert parsed.entries == ()
    assert parsed.skipped == (Skipped("m", "invalid_cost", detail),)


def test_an_invalid_optional_cost_skips_the_entry_too() -> None:
    parsed = parse_litellm(
        '{"m": {"input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06,'
        ' "cache_creation_input_token_cost": -3e-06}}'
    )
    assert parsed.skipped == (
        Skipped("m", "invalid_cost", "cache_creation_input_token_cost is negative: -0.000003"),
    )


def test_an_entry_with_only_one_of_input_and_output_is_not_priced_per_token() -> None:
    parsed = parse_litellm(
        '{"embed": {"input_cost_per_token": 1e-07}, "tts": {"output_cost_per_token": 1e-07}}'
    )
    assert parsed.skipped == (
        Skipped("embed", "not_priced_per_token", "no output_cost_per_token"),
        Skipped("tts", "not_priced_per_token", "no input_cost_per_token"),
    )


@pytest.mark.parametrize("name", ["", "   ", "x" * 201, "a\u0000b"])
def test_a_name_tokentrack_refuses_skips_the_entry(name: str) -> None:
    text = json.dumps({name: {"input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06}})
    (skipped,) = parse_litellm(text).skipped
    assert (skipped.model, skipped.reason) == (name, "invalid_name")
    # 200 characters and surrounding blanks are fine: set_model_price takes them.
    for fine in ("x" * 200, " gpt "):
        text = json.dumps({fine: {"input_cost_per_token": 1e-06, "output_cost_per_token": 0}})
        assert [e.model for e in parse_litellm(text).entries] == [fine]


def test_filters_keep_a_provider_and_a_model_glob() -> None:
    openai = read_litellm(FIXTURE, provider="openai")
    assert [e.model for e in openai.entries] == ["test-gpt-cached", "test-o-reasoning"]
    # The provider's skipped entries are still reported; the others are filtered out.
    assert {s.model for s in openai.skipped} == {"test-image-generation", "test-negative-cost"}
    assert openai.filtered_out == 10 - 4

    claude = read_litellm(FIXTURE, model="test-c*")
    assert [e.model for e in claude.entries] == ["test-claude-cache-write"]
    assert claude.skipped == ()
    assert claude.filtered_out == 9

    both = read_litellm(FIXTURE, provider="bedrock", model="*-f*")
    assert [e.model for e in both.entries] == ["test-nova-float-trap", "test-fractional-micros"]


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("gpt-4o*", "gpt-4o-mini", True),
        ("gpt-4o*", "azure/gpt-4o", False),
        ("*gpt-4o*", "azure/gpt-4o", True),
        ("gpt-4o", "gpt-4o", True),
        ("gpt-4o", "gpt-4o-mini", False),
        ("*", "", True),
        ("a?c", "abc", False),  # only * is special
        ("a?c", "a?c", True),
        ("[ab]", "a", False),
        ("a.c", "abc", False),
        ("bedrock/*/x", "bedrock/*/x", True),
        ("*\n*", "a\nb", True),
    ],
)
def test_a_glob_has_only_star(pattern: str, name: str, matches: bool) -> None:
    assert glob_matches(pattern, name) is matches


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", "not a JSON object of models but a JSON list"),
        ('"x"', "not a JSON object of models but a JSON str"),
        ("{", "not JSON: Expecting property name enclosed in double quotes"),
        (b"\xff\xfe{", "not JSON: "),
    ],
)
def test_a_file_that_is_not_a_json_object_is_refused(text: str | bytes, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        parse_litellm(text)


def test_dumps_prints_decimals_as_exact_json_numbers_and_the_rest_as_json_does() -> None:
    plain = {"a": [1, "x", None, True, {"b": []}, {}], "é": 1.5, "n": {"m": [[]]}}
    assert dumps(plain) == json.dumps(plain, indent=2)
    exact = {"p": [Decimal("100000.00000000001"), Decimal("2.5E+6"), Decimal(0)]}
    text = dumps(exact)
    assert text == '{\n  "p": [\n    100000.00000000001,\n    2500000,\n    0\n  ]\n}'
    assert json.loads(text, parse_float=Decimal) == exact
