"""``tokentrack budgets set``, ``budgets list`` and ``budgets show`` against a real database:
what they write and print, their one-line errors (exit 2) for refusals and bad input, and
``list``/``show`` refusing a role other than the schema owner."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from ops_history import CliResult, tokentrack
from securitykit import login_roles
from sqlkit import call, new_account

TEAM = "team:research"


async def _budgets(db_dsn: str, *args: str) -> CliResult:
    return await tokentrack("budgets", *args, "--database-url", db_dsn)


async def _json(db_dsn: str, *args: str) -> dict[str, Any]:
    result = await _budgets(db_dsn, *args, "--json")
    assert (result.code, result.err) == (0, ""), result
    document = json.loads(result.out)
    assert isinstance(document, dict)
    return document


def _set(account: uuid.UUID, *args: str) -> tuple[str, ...]:
    return ("set", "--account", str(account), *args)


def assert_one_line(result: CliResult, *fragments: str) -> str:
    """Exit 2, nothing on stdout, one line ``tokentrack: error: ...`` with every fragment."""
    assert (result.code, result.out) == (2, ""), result
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("tokentrack: error: "), result.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


async def _reserve(
    conn: asyncpg.Connection, account: uuid.UUID, tokens: int, *subjects: str, cost: int = 0
) -> uuid.UUID:
    report_id = uuid.uuid4()
    estimate = {"tokens": tokens, "cost_micros": cost} if cost else {"tokens": tokens}
    answer = await call(
        conn, "reserve", account, report_id, json.dumps(estimate), list(subjects), "standard"
    )
    assert answer["success"] is True, answer
    return report_id


async def _bill(
    conn: asyncpg.Connection, account: uuid.UUID, report_id: uuid.UUID, tokens: int
) -> None:
    step = await call(
        conn, "persist_step_usage", report_id, account, "AN0", tokens - 1, 1, None, None
    )
    assert step["success"] is True, step
    finished = await call(conn, "finish_report", report_id, account, "complete", None)
    assert finished["success"] is True, finished


# --------------------------------------------------------------------------------------------
# set
# --------------------------------------------------------------------------------------------


async def test_set_creates_then_changes_nothing_then_changes_the_limit(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn)
    created = await _budgets(
        db_dsn,
        *_set(account, "--subject", TEAM, "--unit", "tokens", "--window", "day", "--limit", "5000"),
        "--timezone",
        "Europe/Berlin",
        "--threshold",
        "90",
        "50",
        "--threshold",
        "100",
    )
    assert (created.code, created.err) == (0, "")
    budget_id = await conn.fetchval(
        "SELECT id FROM tokentrack.budgets WHERE account_id = $1", account
    )
    assert created.out == (
        f"budget {budget_id} created: {TEAM}, tokens per day (Europe/Berlin), limit 5000, "
        f"thresholds 50, 90, 100% (account {account})\n"
    )
    same = await _json(
        db_dsn,
        *_set(account, "--subject", TEAM, "--unit", "tokens", "--window", "day", "--limit", "5000"),
    )
    assert same == {
        "account_id": str(account),
        "budget_id": str(budget_id),
        "created": False,
        "changed": False,
        "subject": TEAM,
        "unit": "tokens",
        "window": "day",
        "limit": 5000,
        "timezone": "Europe/Berlin",
        "thresholds": [50, 90, 100],
    }
    changed = await _budgets(
        db_dsn,
        *_set(account, "--subject", TEAM, "--unit", "tokens", "--window", "day", "--limit", "0"),
    )
    assert changed.out.startswith(f"budget {budget_id} changed: {TEAM}, tokens per day")
    assert "limit 0," in changed.out
    rows = await conn.fetch(
        "SELECT limit_amount, timezone, thresholds FROM tokentrack.budget_changes"
        " WHERE budget_id = $1 ORDER BY id",
        budget_id,
    )
    assert [tuple(r) for r in rows] == [
        (5000, "Europe/Berlin", [50, 90, 100]),
        (0, "Europe/Berlin", [50, 90, 100]),
    ]
    whole = await _json(
        db_dsn, *_set(account, "--unit", "cost_micros", "--window", "total", "--limit", "7")
    )
    assert (whole["subject"], whole["created"], whole["thresholds"]) == (None, True, [80, 100])


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("--limit", "-1"), ("invalid limit", "limit must be at least 0")),
        (("--limit", "1", "--subject", " "), ("invalid subject", "must not be empty")),
        (("--limit", "1", "--threshold", "0"), ("invalid thresholds", "from 1 to 1000")),
        (
            ("--limit", "1", "--threshold", *map(str, range(1, 12))),
            ("invalid thresholds", "1 to 10 percentages"),
        ),
        (
            ("--limit", "1", "--timezone", "Mars/Olympus"),
            ("invalid options.timezone", "Europe/Berlin"),
        ),
    ],
)
async def test_set_refuses_bad_input_in_one_line_and_writes_nothing(
    db_dsn: str, conn: asyncpg.Connection, args: tuple[str, ...], fragments: tuple[str, ...]
) -> None:
    account = await new_account(conn)
    result = await _budgets(db_dsn, *_set(account, "--unit", "tokens", "--window", "day", *args))
    assert_one_line(result, *fragments)
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.budgets") == 0


async def test_set_for_an_unknown_account_or_a_bad_id_is_one_line(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    unknown = uuid.uuid4()
    refused = await _budgets(
        db_dsn, *_set(unknown, "--unit", "tokens", "--window", "day", "--limit", "1")
    )
    assert_one_line(refused, f"account {unknown} does not exist", "account_not_found")
    bad = await _budgets(
        db_dsn, "set", "--account", "acme", "--unit", "tokens", "--window", "day", "--limit", "1"
    )
    assert_one_line(bad, "invalid account", "not a UUID: 'acme'")
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.budgets") == 0


async def test_set_refuses_an_unknown_unit_or_window_before_connecting() -> None:
    unreachable = "postgresql://nobody@127.0.0.1:1/x"
    for args in (("--unit", "usd", "--window", "day"), ("--unit", "tokens", "--window", "year")):
        result = await tokentrack(
            "budgets", "set", "--account", str(uuid.uuid4()), *args, "--limit", "1",
            "--database-url", unreachable,
        )  # fmt: skip
        assert result.code == 2
        assert "invalid choice" in result.err


# --------------------------------------------------------------------------------------------
# list
# --------------------------------------------------------------------------------------------


async def test_list_shows_every_budget_with_its_current_windows_used_held_and_limit(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 1_000_000)
    for args in (
        ("--subject", TEAM, "--unit", "tokens", "--window", "day", "--limit", "10000",
         "--timezone", "Europe/Berlin"),
        ("--unit", "tokens", "--window", "month", "--limit", "500000"),
        ("--subject", "key:sk-1", "--unit", "cost_micros", "--window", "hour", "--limit", "900"),
    ):  # fmt: skip
        assert (await _budgets(db_dsn, *_set(account, *args))).code == 0
    billed = await _reserve(conn, account, 2_000, TEAM)
    await _bill(conn, account, billed, 1_500)
    await _reserve(conn, account, 3_000, TEAM, "key:sk-1", cost=400)  # active: held

    document = await _json(db_dsn, "list", "--account", str(account))
    assert document["account_id"] == str(account)
    listed = document["budgets"]
    assert [(b["subject"], b["window"]) for b in listed] == [
        (None, "month"),
        ("key:sk-1", "hour"),
        (TEAM, "day"),
    ]
    figures = [(b["used"], b["held"], b["limit"], b["available"]) for b in listed]
    assert figures == [
        (1_500, 3_000, 500_000, 495_500),
        (0, 400, 900, 500),
        (1_500, 3_000, 10_000, 5_500),
    ]
    berlin = ZoneInfo("Europe/Berlin")
    day_start = await conn.fetchval("SELECT date_trunc('day', now(), 'Europe/Berlin')")
    assert listed[2]["window_start"] == day_start.astimezone(berlin).isoformat()
    assert (
        datetime.fromisoformat(listed[2]["window_start"]).utcoffset()
        == day_start.astimezone(berlin).utcoffset()
    )
    month_start = await conn.fetchval("SELECT date_trunc('month', now(), 'UTC')")
    assert datetime.fromisoformat(listed[0]["window_start"]) == month_start
    assert listed[1]["unit"] == "cost_micros"

    human = await _budgets(db_dsn, "list", "--account", str(account))
    assert human.code == 0
    lines = human.out.splitlines()
    assert lines[0].split() == [
        "BUDGET", "SUBJECT", "UNIT", "WINDOW", "TIMEZONE", "WINDOW", "START", "USED", "HELD",
        "LIMIT", "AVAILABLE",
    ]  # fmt: skip
    assert lines[1].split()[1:5] == ["(account)", "tokens", "month", "UTC"]
    assert lines[1].split()[-4:] == ["1500", "3000", "500000", "495500"]
    assert lines[3].split()[-4:] == ["1500", "3000", "10000", "5500"]
    assert lines[-1] == (
        f"3 budget(s) of account {account}; used, held and available in the current window, "
        "in each budget's unit"
    )


async def test_list_of_an_account_without_budgets_and_of_an_unknown_one(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn)
    empty = await _budgets(db_dsn, "list", "--account", str(account))
    assert (empty.code, empty.out) == (0, f"account {account} has no budget\n")
    assert await _json(db_dsn, "list", "--account", str(account)) == {
        "account_id": str(account),
        "budgets": [],
    }
    unknown = uuid.uuid4()
    assert_one_line(
        await _budgets(db_dsn, "list", "--account", str(unknown)),
        f"account {unknown} does not exist",
    )


# --------------------------------------------------------------------------------------------
# show
# --------------------------------------------------------------------------------------------


async def test_show_gives_the_history_and_the_windows_with_used_and_held(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 1_000_000)
    base = ("--subject", TEAM, "--unit", "tokens", "--window", "total")
    first = await _json(db_dsn, *_set(account, *base, "--limit", "10000"))
    await _json(db_dsn, *_set(account, *base, "--limit", "20000", "--threshold", "50"))
    budget_id = first["budget_id"]
    billed = await _reserve(conn, account, 2_000, TEAM)
    await _bill(conn, account, billed, 1_200)
    await _reserve(conn, account, 700, TEAM)

    shown = await _json(db_dsn, "show", "--account", str(account), "--budget", budget_id)
    budget = shown["budget"]
    assert (budget["budget_id"], budget["window"], budget["limit"]) == (budget_id, "total", 20_000)
    assert (budget["used"], budget["held"], budget["available"]) == (1_200, 700, 18_100)
    assert [(c["limit"], c["thresholds"]) for c in shown["changes"]] == [
        (10_000, [80, 100]),
        (20_000, [50]),
    ]
    created_at = await conn.fetchval(
        "SELECT created_at FROM tokentrack.budgets WHERE id = $1", uuid.UUID(budget_id)
    )
    assert shown["windows_total"] == 1
    assert [
        (datetime.fromisoformat(w["window_start"]), w["used"], w["held"]) for w in shown["windows"]
    ] == [(created_at, 1_200, 700)]  # a total budget's one window starts at its creation

    human = await _budgets(db_dsn, "show", "--account", str(account), "--budget", budget_id)
    assert human.code == 0
    lines = human.out.splitlines()
    assert lines[0].startswith(
        f"budget {budget_id} of account {account}: {TEAM}, tokens in total (UTC), limit 20000, "
        "thresholds 50%, created "
    )
    assert lines[1].endswith(": used 1200, held 700, available 18100 of 20000")
    assert "changes (2):" in lines
    assert "windows (newest 1 of 1):" in lines


async def test_show_lists_the_newest_windows_first_up_to_windows(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 1_000_000)
    created = await _json(
        db_dsn, *_set(account, "--unit", "tokens", "--window", "hour", "--limit", "9")
    )
    budget_id = uuid.UUID(created["budget_id"])
    for hours_ago, used in ((1, 5), (2, 6), (3, 7)):
        await conn.execute(
            "INSERT INTO tokentrack.budget_windows (account_id, budget_id, window_start, used)"
            " VALUES ($1, $2, date_trunc('hour', now()) - make_interval(hours => $3), $4)",
            account,
            budget_id,
            hours_ago,
            used,
        )
    shown = await _json(
        db_dsn, "show", "--account", str(account), "--budget", str(budget_id), "--windows", "2"
    )
    assert shown["windows_total"] == 3
    assert [w["used"] for w in shown["windows"]] == [5, 6]
    assert (shown["budget"]["used"], shown["budget"]["held"]) == (0, 0)  # the current hour
    empty = await _budgets(db_dsn, "show", "--account", str(account), "--budget", str(budget_id))
    assert "windows (newest 3 of 3):" in empty.out


async def test_show_of_a_budget_the_account_does_not_have_is_one_line(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    owner, other = await new_account(conn), await new_account(conn)
    created = await _json(
        db_dsn, *_set(owner, "--unit", "tokens", "--window", "day", "--limit", "1")
    )
    refused = await _budgets(
        db_dsn, "show", "--account", str(other), "--budget", created["budget_id"]
    )
    assert_one_line(refused, f"account {other} has no budget {created['budget_id']}")
    bad = await _budgets(db_dsn, "show", "--account", str(owner), "--budget", "nope")
    assert_one_line(bad, "invalid budget", "not a UUID")


# --------------------------------------------------------------------------------------------
# Roles
# --------------------------------------------------------------------------------------------


async def test_the_service_role_may_set_but_only_the_owner_may_list_and_show(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn)
    async with login_roles(conn, db_dsn) as made:
        service = await made.create("budgets", "tokentrack_service")
        url = made.dsn(service)
        created = await _json(
            url, *_set(account, "--unit", "tokens", "--window", "week", "--limit", "100")
        )
        assert created["created"] is True
        for args in (
            ("list", "--account", str(account)),
            ("show", "--account", str(account), "--budget", created["budget_id"]),
        ):
            refused = await _budgets(url, *args)
            line = assert_one_line(
                refused,
                f"{service}@",
                "SQLSTATE 42501: permission denied for function budget_",
                f"role {service} may not read the budgets' windows",
                "only the schema owner (the installer's role) may run",
            )
            assert "tokentrack.budget_window_start and tokentrack.budget_held" in line
    listed = await _json(db_dsn, "list", "--account", str(account))
    assert [b["budget_id"] for b in listed["budgets"]] == [created["budget_id"]]
