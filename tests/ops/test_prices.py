"""``tokentrack prices import`` and ``prices list`` against a real database.

The fixture (tests/ops/fixtures/litellm_prices.json) is in LiteLLM's format; the micros below
are computed by hand from its decimal text (x 10^12), with set_model_price's defaults for the
absent classes (cached input and cache write at the input price, reasoning at the output
price). The real price map shipped in the litellm wheel is imported too, twice.
"""

from __future__ import annotations

import importlib.util
import json
import time
from decimal import Decimal, localcontext
from pathlib import Path

import asyncpg
import pytest

from ops_history import CliResult, tokentrack
from securitykit import login_roles
from tokentrack_client.ops import prices

FIXTURE = Path(__file__).parent / "fixtures" / "litellm_prices.json"
CLASSES = ("input", "cached_input", "cache_write", "output", "reasoning")


def _d(*values: int | str) -> dict[str, Decimal]:
    return dict(zip(CLASSES, (Decimal(v) for v in values), strict=True))


# model: input, cached_input, cache_write, output, reasoning (micros per million tokens)
EXPECTED = {
    "test-gpt-cached": _d(2_500_000, 1_250_000, 2_500_000, 10_000_000, 10_000_000),
    "test-claude-cache-write": _d(3_000_000, 300_000, 3_750_000, 15_000_000, 15_000_000),
    "test-o-reasoning": _d(1_100_000, 1_100_000, 1_100_000, 4_400_000, 8_800_000),
    "test-nova-float-trap": _d(60_000, 60_000, 60_000, 240_000, 240_000),
    "test-fractional-micros": _d(
        "100000.00000000001", "100000.00000000001", "100000.00000000001", 0, 0
    ),
    "bedrock/*/1-month-commitment/test-pattern": _d(10**12, 10**12, 10**12, 500_000, 500_000),
}
SKIPPED = {
    "sample_spec": "sample_spec",
    "test-image-generation": "not_priced_per_token",
    "test-negative-cost": "invalid_cost",
    "test-not-an-object": "not_an_object",
}


async def _import(db_dsn: str, *args: str, file: Path = FIXTURE) -> CliResult:
    return await tokentrack("prices", "import", str(file), "--database-url", db_dsn, *args)


async def _import_json(db_dsn: str, *args: str, file: Path = FIXTURE) -> dict[str, object]:
    result = await _import(db_dsn, "--json", *args, file=file)
    assert (result.code, result.err) == (0, ""), result
    document = json.loads(result.out, parse_float=Decimal)
    assert isinstance(document, dict)
    return document


def _changed_fixture(directory: Path, model: str, key: str, value: str) -> Path:
    """A copy of the fixture in ``directory`` with one cost replaced."""
    document = json.loads(FIXTURE.read_text(), parse_float=Decimal)
    document[model][key] = Decimal(value)
    path = directory / "changed.json"
    path.write_text(prices.dumps(document))
    return path


async def _rows(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT model, effective_from, input, cached_input, cache_write, output, reasoning"
        " FROM tokentrack.model_prices ORDER BY model, effective_from"
    )


def _prices(row: asyncpg.Record) -> dict[str, Decimal]:
    return {k: row[k] for k in CLASSES}


async def test_import_writes_exactly_the_hand_computed_micros(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    result = await _import(db_dsn)
    assert (result.code, result.err) == (0, "")
    rows = await _rows(conn)
    assert {r["model"]: _prices(r) for r in rows} == EXPECTED
    assert len(rows) == len(EXPECTED)
    lines = result.out.splitlines()
    assert lines[0] == (
        "new test-gpt-cached: input 2500000, cached_input 1250000, cache_write 2500000, "
        "output 10000000, reasoning 10000000"
    )
    assert "new test-fractional-micros: input 100000.00000000001, " in result.out
    assert "skipped test-negative-cost: input_cost_per_token is negative: -0.000001" in lines
    assert "skipped test-not-an-object: a JSON str, not an object" in lines
    assert lines[-1] == (
        f"prices import {FIXTURE}: 6 added (0 changed, 6 new), 0 unchanged, 4 skipped "
        "(1 with a cost that is negative, not a number, or above 1 per token; "
        "1 not a JSON object; 1 without both an input and an output cost per token; "
        "1 the format's description, not a model) (micros per million tokens)"
    )
    assert len(lines) == 6 + 2 + 1  # one per added model, per anomaly, the summary


async def test_importing_the_same_file_again_adds_nothing(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    first = await _import_json(db_dsn)
    assert (first["added"], first["unchanged"], first["skipped"]) == (6, 0, 4)
    before = await _rows(conn)
    again = await _import_json(db_dsn)
    assert (again["added"], again["unchanged"], again["skipped"]) == (0, 6, 4)
    assert again["changes"] == []
    assert {s["model"]: s["reason"] for s in again["skipped_entries"]} == SKIPPED
    assert await _rows(conn) == before
    human = await _import(db_dsn)
    assert human.out == (
        f"skipped test-negative-cost: input_cost_per_token is negative: -0.000001\n"
        f"skipped test-not-an-object: a JSON str, not an object\n"
        f"prices import {FIXTURE}: 0 added (0 changed, 0 new), 6 unchanged, 4 skipped "
        "(1 with a cost that is negative, not a number, or above 1 per token; "
        "1 not a JSON object; 1 without both an input and an output cost per token; "
        "1 the format's description, not a model) (micros per million tokens)\n"
    )


async def test_a_dry_run_writes_nothing_and_says_what_would_change(
    db_dsn: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    dry = await _import_json(db_dsn, "--dry-run")
    assert (dry["dry_run"], dry["written"], dry["added"], dry["unchanged"]) == (True, False, 6, 0)
    changes = dry["changes"]
    assert isinstance(changes, list)
    assert {c["model"]: c["new"]["prices"] for c in changes} == EXPECTED
    assert all(c["old"] is None and c["new"]["price_id"] is None for c in changes)
    assert await _rows(conn) == []
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.model_prices") == 0

    human = await _import(db_dsn, "--dry-run")
    assert human.code == 0
    summary = human.out.splitlines()[-1]
    assert summary.startswith(
        f"prices import {FIXTURE}: dry run: nothing written; would have 6 added (0 changed, "
        "6 new), 0 unchanged, 4 skipped"
    )
    assert await _rows(conn) == []

    # Once imported, a dry run of a changed file shows old -> new and still writes nothing.
    assert (await _import(db_dsn)).code == 0
    imported = await _rows(conn)
    changed = _changed_fixture(tmp_path, "test-o-reasoning", "output_cost_per_token", "5e-06")
    dry = await _import_json(db_dsn, "--dry-run", file=changed)
    assert (dry["added"], dry["unchanged"]) == (1, 5)
    (change,) = dry["changes"]
    assert change["old"]["prices"]["output"] == 4_400_000
    assert change["new"]["prices"]["output"] == 5_000_000
    assert change["new"]["price_id"] is None  # rolled back: no row has it
    assert await _rows(conn) == imported


async def test_a_changed_price_adds_exactly_that_model_with_old_and_new(
    db_dsn: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    assert (await _import(db_dsn)).code == 0
    changed = _changed_fixture(tmp_path, "test-o-reasoning", "output_cost_per_token", "5e-06")

    result = await _import_json(db_dsn, file=changed)
    assert (result["added"], result["unchanged"], result["skipped"]) == (1, 5, 4)
    (change,) = result["changes"]
    assert change["model"] == "test-o-reasoning"
    old, new = change["old"], change["new"]
    assert old["prices"] == EXPECTED["test-o-reasoning"]
    # reasoning keeps its own price (8.8e-06 in the file); output becomes 5e-06 x 10^12
    assert new["prices"] == _d(1_100_000, 1_100_000, 1_100_000, 5_000_000, 8_800_000)
    assert new["price_id"] > old["price_id"]
    assert new["effective_from"] > old["effective_from"]

    rows = await _rows(conn)
    assert len(rows) == len(EXPECTED) + 1
    reasoning_rows = [r for r in rows if r["model"] == "test-o-reasoning"]
    assert [_prices(r) for r in reasoning_rows] == [EXPECTED["test-o-reasoning"], new["prices"]]

    human = await _import(db_dsn, file=changed)  # the same change again: nothing
    assert human.out.splitlines()[-1].startswith(f"prices import {changed}: 0 added")
    back = await _import(db_dsn)  # the fixture's price again: a new row, 5000000 -> 4400000
    assert back.out.splitlines()[0] == "changed test-o-reasoning: output 5000000 -> 4400000"


async def test_the_filters_import_one_provider_or_the_models_of_a_glob(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    anthropic = await _import_json(db_dsn, "--provider", "anthropic")
    assert (anthropic["added"], anthropic["skipped"], anthropic["filtered_out"]) == (1, 0, 9)
    assert [r["model"] for r in await _rows(conn)] == ["test-claude-cache-write"]
    nova = await _import_json(db_dsn, "--model", "test-nova*")
    assert (nova["added"], nova["filtered_out"]) == (1, 9)
    human = await _import(db_dsn, "--provider", "openai", "--model", "*-o-*")
    assert human.out.splitlines() == [
        "new test-o-reasoning: input 1100000, cached_input 1100000, cache_write 1100000, "
        "output 4400000, reasoning 8800000",
        f"prices import {FIXTURE}: 1 added (0 changed, 1 new), 0 unchanged, 0 skipped, "
        "9 left out by the filters (micros per million tokens)",
    ]


async def test_list_shows_the_prices_in_effect_exactly(db_dsn: str) -> None:
    empty = await tokentrack("prices", "list", "--database-url", db_dsn)
    assert (empty.code, empty.out) == (0, "no price in effect\n")
    assert (await _import(db_dsn)).code == 0

    listed = await tokentrack("prices", "list", "--json", "--database-url", db_dsn)
    assert listed.code == 0
    document = json.loads(listed.out, parse_float=Decimal)
    assert {p["model"]: p["prices"] for p in document["prices"]} == EXPECTED
    assert [p["model"] for p in document["prices"]] == sorted(EXPECTED)
    assert '"input": 100000.00000000001,' in listed.out  # a JSON number, exact

    table = await tokentrack("prices", "list", "--model", "test-*o*", "--database-url", db_dsn)
    lines = table.out.splitlines()
    assert lines[0].split() == [
        "MODEL", "INPUT", "CACHED_INPUT", "CACHE_WRITE", "OUTPUT", "REASONING", "EFFECTIVE", "FROM"
    ]  # fmt: skip
    assert [line.split()[0] for line in lines[1:-1]] == [
        "test-fractional-micros",
        "test-nova-float-trap",
        "test-o-reasoning",
    ]
    assert lines[2].split()[1:6] == ["60000", "60000", "60000", "240000", "240000"]
    assert lines[-1] == "3 price(s) in effect, in micros per million tokens"
    # A pattern is listed under its own text; --model matches that text.
    pattern = await tokentrack(
        "prices", "list", "--json", "--model", "bedrock/*", "--database-url", db_dsn
    )
    assert [p["model"] for p in json.loads(pattern.out)["prices"]] == [
        "bedrock/*/1-month-commitment/test-pattern"
    ]


async def test_a_price_set_for_later_is_not_yet_in_effect(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    assert (await _import(db_dsn, "--model", "test-gpt-cached")).code == 0
    await conn.fetchval(
        "SELECT tokentrack.set_model_price('test-gpt-cached', '{\"input\": 1, \"output\": 2}',"
        " now() + interval '1 day')"
    )
    listed = json.loads(
        (await tokentrack("prices", "list", "--json", "--database-url", db_dsn)).out
    )
    assert listed["prices"][0]["prices"]["input"] == 2_500_000
    # set_model_price compares with the price in effect now: the import is unchanged.
    again = await _import_json(db_dsn, "--model", "test-gpt-cached")
    assert (again["added"], again["unchanged"]) == (0, 1)


async def test_only_the_schema_owner_may_import_and_nothing_is_written(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    async with login_roles(conn, db_dsn) as made:
        service = await made.create("prices", "tokentrack_service")
        refused = await _import(made.dsn(service))
        assert refused.code == 2
        assert refused.out == ""
        assert refused.err.startswith(f"tokentrack: error: {service}@")
        assert f": SQLSTATE 42501: permission denied for table model_prices: role {service} " in (
            refused.err
        )
        assert refused.err.endswith(
            " may not set prices: only the schema owner (the installer's role) may call "
            "tokentrack.set_model_price; nothing was written\n"
        )
        assert await _rows(conn) == []
        assert (await _import(db_dsn)).code == 0
        # Reading is allowed to the service role.
        listed = await tokentrack("prices", "list", "--json", "--database-url", made.dsn(service))
        assert listed.code == 0
        assert len(json.loads(listed.out)["prices"]) == len(EXPECTED)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read {path}: No such file or directory"),
        ("[1, 2]", "{path}: not a JSON object of models but a JSON list"),
        ("{", "{path}: not JSON: Expecting property name enclosed in double quotes"),
    ],
)
async def test_a_file_that_cannot_be_read_is_one_line_and_exit_2(
    db_dsn: str, tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "prices.json"
    if content is not None:
        path.write_text(content)
    result = await _import(db_dsn, file=path)
    assert (result.code, result.out) == (2, "")
    assert result.err.startswith("tokentrack: error: " + message.format(path=path))
    assert result.err.count("\n") == 1


async def test_a_database_without_prices_is_told_to_install(empty_db_dsn: str) -> None:
    for command in (("import", str(FIXTURE)), ("list",)):
        result = await tokentrack("prices", *command, "--database-url", empty_db_dsn)
        assert (result.code, result.out) == (2, "")
        assert result.err.startswith(
            "tokentrack: error: tokentrack.model_prices not found in this database: install"
        )


# --------------------------------------------------------------------------------------------
# The real price map, as shipped in the litellm wheel
# --------------------------------------------------------------------------------------------


def _litellm_price_map() -> Path:
    spec = importlib.util.find_spec("litellm")
    if spec is None or spec.origin is None:
        pytest.skip("litellm is not installed (pip install litellm; the dev extra has it)")
    path = Path(spec.origin).parent / "model_prices_and_context_window_backup.json"
    if not path.is_file():
        pytest.fail(f"litellm is installed but ships no {path.name}: its layout changed")
    return path


async def test_the_real_litellm_price_map_imports_exactly_and_twice_adds_nothing(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    path = _litellm_price_map()
    started = time.monotonic()
    first = await prices.import_prices(db_dsn, path)
    elapsed = time.monotonic() - started
    parsed = prices.read_litellm(path)
    assert len(parsed.entries) > 2_000
    assert (len(first.added), first.unchanged) == (len(parsed.entries), 0)
    assert first.skipped == parsed.skipped
    assert [s.model for s in first.skipped if s.reason == "sample_spec"] == ["sample_spec"]

    # Every stored price is the file's decimal text x 10^12, computed here independently.
    raw = json.loads(path.read_text(), parse_float=str, parse_int=str)
    rows = {r["model"]: _prices(r) for r in await _rows(conn)}
    assert len(rows) == len(parsed.entries)
    keys = {
        "input": "input_cost_per_token",
        "output": "output_cost_per_token",
        "cached_input": "cache_read_input_token_cost",
        "cache_write": "cache_creation_input_token_cost",
        "reasoning": "output_cost_per_reasoning_token",
    }
    defaults = {"cached_input": "input", "cache_write": "input", "reasoning": "output"}
    with localcontext(prec=200):
        for model, stored in rows.items():
            spec = raw[model]
            for price_class, key in keys.items():
                text = spec.get(key, spec[keys[defaults.get(price_class, price_class)]])
                assert stored[price_class] == Decimal(text) * 10**12, (model, price_class)

    again = await prices.import_prices(db_dsn, path)
    assert (len(again.added), again.unchanged) == (0, len(parsed.entries))
    assert len(await _rows(conn)) == len(parsed.entries)
    print(f"real price map: {len(parsed.entries)} models imported in {elapsed:.2f} s")
