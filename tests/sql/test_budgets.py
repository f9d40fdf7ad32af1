"""Contract Part 2: budgets (set_budget, reserve with subjects, windows, extension, overrun)."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest

from sqlkit import Connect, assert_reconciled, call, counts, expire, new_account, reserve, step

MONTH_LIMIT = 1_000_000


async def budget(
    conn: asyncpg.Connection,
    account: uuid.UUID,
    subject: str | None,
    window: str,
    limit: int,
    unit: str = "tokens",
    **options: Any,
) -> dict[str, Any]:
    answer = await call(
        conn, "set_budget", account, subject, unit, window, limit, json.dumps(options)
    )
    assert answer["success"] is True, answer
    return answer


async def reserve_with(
    conn: asyncpg.Connection,
    account: uuid.UUID,
    estimate: dict[str, Any],
    subjects: list[str] | None = None,
    mode: str = "standard",
    report: uuid.UUID | None = None,
) -> tuple[uuid.UUID, dict[str, Any]]:
    report = report or uuid.uuid4()
    raw = await conn.fetchval(
        "SELECT tokentrack.reserve($1, $2, $3::jsonb, $4::text[], $5)::text",
        account,
        report,
        json.dumps(estimate),
        subjects or [],
        mode,
    )
    return report, json.loads(raw)


async def used(conn: asyncpg.Connection, budget_id: str) -> int:
    return int(
        await conn.fetchval(
            "SELECT COALESCE(sum(used), 0) FROM tokentrack.budget_windows WHERE budget_id = $1",
            uuid.UUID(budget_id),
        )
    )


# --------------------------------------------------------------------------------------------
# set_budget
# --------------------------------------------------------------------------------------------


async def test_set_budget_creates_changes_and_records_every_change(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    first = await budget(conn, account, "team:research", "day", 500, timezone="Europe/Berlin")
    assert {k: v for k, v in first.items() if k != "budget_id"} == {
        "success": True,
        "created": True,
        "changed": True,
        "subject": "team:research",
        "unit": "tokens",
        "window": "day",
        "limit": 500,
        "timezone": "Europe/Berlin",
        "thresholds": [80, 100],
    }
    again = await budget(conn, account, "team:research", "day", 500)
    assert (again["budget_id"], again["created"], again["changed"]) == (
        first["budget_id"],
        False,
        False,
    )
    assert again["timezone"] == "Europe/Berlin"  # an option left out keeps its value
    raised = await budget(conn, account, "team:research", "day", 800, thresholds=[100, 50, 50])
    assert (raised["changed"], raised["limit"], raised["thresholds"]) == (True, 800, [50, 100])
    history = await conn.fetch(
        "SELECT limit_amount, thresholds FROM tokentrack.budget_changes"
        " WHERE budget_id = $1 ORDER BY id",
        uuid.UUID(first["budget_id"]),
    )
    assert [(r["limit_amount"], r["thresholds"]) for r in history] == [
        (500, [80, 100]),
        (800, [50, 100]),
    ]
    # The whole account (subject NULL) and another unit or window are other budgets.
    others = {
        (await budget(conn, account, None, "day", 1))["budget_id"],
        (await budget(conn, account, "team:research", "day", 1, unit="cost_micros"))["budget_id"],
        (await budget(conn, account, "team:research", "week", 1))["budget_id"],
    }
    assert len(others) == 3
    assert first["budget_id"] not in others
    with pytest.raises(asyncpg.PostgresError) as caught:
        await conn.execute("UPDATE tokentrack.budget_changes SET limit_amount = 0")
    assert caught.value.sqlstate == "55000"


async def test_set_budget_refuses_an_unknown_account(conn: asyncpg.Connection) -> None:
    answer = await call(conn, "set_budget", uuid.uuid4(), None, "tokens", "day", 10, "{}")
    assert (answer["success"], answer["error"]) == (False, "account_not_found")


SET_BUDGET_CASES: list[tuple[tuple[Any, ...], str, str]] = [
    ((None, None, "tokens", "day", 1, "{}"), "p_account_id", "22004"),
    (("A", " ", "tokens", "day", 1, "{}"), "p_subject", "22023"),
    (("A", "x" * 201, "tokens", "day", 1, "{}"), "p_subject", "22001"),
    (("A", None, None, "day", 1, "{}"), "p_unit", "22004"),
    (("A", None, "usd", "day", 1, "{}"), "p_unit", "22023"),
    (("A", None, "tokens", None, 1, "{}"), "p_window", "22004"),
    (("A", None, "tokens", "fortnight", 1, "{}"), "p_window", "22023"),
    (("A", None, "tokens", "day", None, "{}"), "p_limit", "22004"),
    (("A", None, "tokens", "day", -1, "{}"), "p_limit", "22023"),
    (("A", None, "tokens", "day", 1, None), "p_options", "22004"),
    (("A", None, "tokens", "day", 1, "[]"), "p_options", "22023"),
    (("A", None, "tokens", "day", 1, '{"tz": "UTC"}'), "p_options.tz", "22023"),
    (
        ("A", None, "tokens", "day", 1, '{"timezone": "Mars/Olympus"}'),
        "p_options.timezone",
        "22023",
    ),
    (("A", None, "tokens", "day", 1, '{"thresholds": [0]}'), "p_options.thresholds", "22023"),
    (("A", None, "tokens", "day", 1, '{"thresholds": [50.5]}'), "p_options.thresholds", "22023"),
    (("A", None, "tokens", "day", 1, '{"thresholds": []}'), "p_options.thresholds", "22023"),
]


@pytest.mark.parametrize(("args", "field", "sqlstate"), SET_BUDGET_CASES)
async def test_set_budget_refuses_invalid_arguments_naming_them(
    conn: asyncpg.Connection, args: tuple[Any, ...], field: str, sqlstate: str
) -> None:
    account = await new_account(conn)
    real = tuple(account if a == "A" else a for a in args)
    before = await counts(conn)
    with pytest.raises(asyncpg.PostgresError) as caught:
        await conn.fetchval("SELECT tokentrack.set_budget($1, $2, $3, $4, $5, $6::jsonb)", *real)
    assert caught.value.sqlstate == sqlstate, caught.value
    assert field in str(caught.value)
    assert await counts(conn) == before
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.budgets") == 0


# --------------------------------------------------------------------------------------------
# reserve
# --------------------------------------------------------------------------------------------


async def test_a_teams_day_budget_refuses_what_the_accounts_month_allows(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    team = await budget(conn, account, "team:research", "day", 1_000)
    report, granted = await reserve_with(conn, account, {"tokens": 600}, ["team:research"], "dd")
    assert granted["success"] is True, granted
    (hold,) = granted["budgets"]
    assert (hold["budget_id"], hold["held"], hold["available"]) == (team["budget_id"], 600, 400)
    assert await conn.fetchval("SELECT mode FROM tokentrack.reports WHERE id = $1", report) == "dd"

    before = await counts(conn)
    _, refused = await reserve_with(conn, account, {"tokens": 500}, ["team:research"])
    assert refused["success"] is False
    assert {k: v for k, v in refused.items() if k not in ("message", "window_start")} == {
        "success": False,
        "error": "insufficient_budget",
        "budget_id": team["budget_id"],
        "subject": "team:research",
        "window": "day",
        "unit": "tokens",
        "available": 400,
        "requested": 500,
    }
    assert await counts(conn) == before  # nothing written
    # Without the subject the team's budget does not apply; the period has room.
    _, other = await reserve_with(conn, account, {"tokens": 500})
    assert (other["success"], other["budgets"]) == (True, [])


async def test_every_budget_of_the_account_and_of_each_subject_applies(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    month = await budget(conn, account, None, "month", 10_000)
    team = await budget(conn, account, "team:a", "day", 5_000)
    key = await budget(conn, account, "key:1", "minute", 2_000)
    await budget(conn, account, "key:2", "minute", 1)  # another key: not this request's
    _, granted = await reserve_with(conn, account, {"tokens": 1_500}, ["team:a", "key:1", "user:9"])
    assert granted["success"] is True
    assert {b["budget_id"] for b in granted["budgets"]} == {
        month["budget_id"],
        team["budget_id"],
        key["budget_id"],
    }
    _, refused = await reserve_with(conn, account, {"tokens": 600}, ["team:a", "key:1"])
    assert (refused["error"], refused["budget_id"]) == ("insufficient_budget", key["budget_id"])
    # try_reserve_tokens is reserve(a, r, {"tokens": n}): the account's own budgets apply.
    _, part1 = await reserve(conn, account, 8_600)
    assert (part1["error"], part1["budget_id"]) == ("insufficient_budget", month["budget_id"])
    _report, part1 = await reserve(conn, account, 8_500)
    assert part1["success"] is True
    assert [b["budget_id"] for b in part1["budgets"]] == [month["budget_id"]]


async def test_the_period_refuses_first_with_its_part_1_keys_and_period_id(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn, 100)
    await budget(conn, account, None, "day", 10)
    _, refused = await reserve_with(conn, account, {"tokens": 101})
    period = await conn.fetchval(
        "SELECT id FROM tokentrack.usage_periods WHERE account_id = $1", account
    )
    assert {k: v for k, v in refused.items() if k != "message"} == {
        "success": False,
        "error": "insufficient_tokens",
        "available_tokens": 100,
        "requested_tokens": 101,
        "period_id": str(period),
    }


async def test_billing_counts_in_the_windows_the_reservation_was_granted_in(
    conn: asyncpg.Connection,
) -> None:
    await conn.fetchval(
        "SELECT tokentrack.set_model_price('m', '{\"input\": 1000000, \"output\": 2000000}'::jsonb)"
    )
    account = await new_account(conn, MONTH_LIMIT)
    tokens = await budget(conn, account, "team:a", "day", 100_000)
    cost = await budget(conn, account, "team:a", "day", 1_000_000, unit="cost_micros")
    report, granted = await reserve_with(conn, account, {"tokens": 1_000, "model": "m"}, ["team:a"])
    assert granted["success"] is True
    held = {b["budget_id"]: b["held"] for b in granted["budgets"]}
    assert held == {tokens["budget_id"]: 1_000, cost["budget_id"]: 2_000}  # the dearest class
    await call(
        conn,
        "record_step",
        report,
        account,
        "S0",
        json.dumps({"input_tokens": 300, "output_tokens": 100}),
        "m",
    )
    await call(conn, "record_step", report, account, "S1", json.dumps({"input_tokens": 10}), None)
    await call(conn, "finish_report", report, account, "complete", None)
    assert await used(conn, tokens["budget_id"]) == 410
    assert await used(conn, cost["budget_id"]) == 500  # the unpriced step costs 0
    # A late step counts in the same windows.
    late = await step(conn, report, account, "S2", 5, 5, None, "m")
    assert late["late"] is True
    assert await used(conn, tokens["budget_id"]) == 420
    assert await used(conn, cost["budget_id"]) == 515
    answer = await call(conn, "reconcile", account)
    assert answer["ok"] is True, answer["discrepancies"]
    assert answer["budget_windows_checked"] == 2


async def test_a_reservation_without_a_cost_estimate_holds_nothing_in_cost_budgets(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    cost = await budget(conn, account, None, "total", 100, unit="cost_micros")
    _, granted = await reserve_with(conn, account, {"tokens": 10})
    assert granted["budgets"][0]["held"] == 0
    _, granted = await reserve_with(conn, account, {"tokens": 10, "cost_micros": 100})
    assert granted["success"] is True
    # Now exhausted (held in full): even a reservation without an estimate is refused.
    _, refused = await reserve_with(conn, account, {"tokens": 10})
    assert (refused["error"], refused["budget_id"], refused["requested"]) == (
        "insufficient_budget",
        cost["budget_id"],
        0,
    )


async def test_expired_reservations_hold_nothing_and_the_sweep_bills_their_windows(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    team = await budget(conn, account, "team:a", "total", 1_000)
    report, _ = await reserve_with(conn, account, {"tokens": 1_000}, ["team:a"])
    await step(conn, report, account, "S0", 60, 40)
    _, refused = await reserve_with(conn, account, {"tokens": 1}, ["team:a"])
    assert refused["error"] == "insufficient_budget"
    await expire(conn, report)
    _, granted = await reserve_with(conn, account, {"tokens": 900}, ["team:a"])
    assert granted["success"] is True  # the expired hold is gone before the sweep
    swept = await call(conn, "cleanup_expired_reservations")
    assert swept["expired"] == 1
    assert await used(conn, team["budget_id"]) == 100
    _, refused = await reserve_with(conn, account, {"tokens": 1}, ["team:a"])
    assert (refused["error"], refused["available"]) == ("insufficient_budget", 0)
    await assert_reconciled(conn)


async def test_a_total_budgets_window_starts_when_it_was_created(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    total = await budget(conn, account, None, "total", 50)
    _, granted = await reserve_with(conn, account, {"tokens": 10})
    created = await conn.fetchval(
        "SELECT created_at FROM tokentrack.budgets WHERE id = $1", uuid.UUID(total["budget_id"])
    )
    assert datetime.fromisoformat(granted["budgets"][0]["window_start"]) == created


# --------------------------------------------------------------------------------------------
# Windows in time zones
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "timezone", "at", "start", "length"),
    [
        # Europe/Berlin springs forward on 2026-03-29: that day has 23 hours.
        ("day", "Europe/Berlin", "2026-03-29 12:00+00", "2026-03-28 23:00+00", timedelta(hours=23)),
        # ...and falls back on 2026-10-25: 25 hours.
        ("day", "Europe/Berlin", "2026-10-25 12:00+00", "2026-10-24 22:00+00", timedelta(hours=25)),
        ("day", "UTC", "2026-10-25 12:00+00", "2026-10-25 00:00+00", timedelta(hours=24)),
        # ISO weeks start on Monday: 2026-12-03 is a Thursday.
        ("week", "UTC", "2026-12-03 10:00+00", "2026-11-30 00:00+00", timedelta(days=7)),
        (
            "month",
            "America/New_York",
            "2026-03-01 03:00+00",
            "2026-02-01 05:00+00",
            timedelta(days=28),
        ),
        ("hour", "Asia/Kolkata", "2026-12-01 10:10+00", "2026-12-01 09:30+00", timedelta(hours=1)),
        ("minute", "UTC", "2026-12-01 10:10:59.5+00", "2026-12-01 10:10+00", timedelta(minutes=1)),
    ],
)
async def test_calendar_windows_in_a_time_zone(
    conn: asyncpg.Connection, window: str, timezone: str, at: str, start: str, length: timedelta
) -> None:
    start_of = "SELECT tokentrack.budget_window_start($1, $2, now(), $3::text::timestamptz)"
    got = await conn.fetchval(start_of, window, timezone, at)
    assert got == datetime.fromisoformat(start.replace("+00", "+00:00"))
    # The next window starts one calendar unit later in that zone, whatever its length in hours.
    following = await conn.fetchval(
        f"SELECT tokentrack.budget_window_start($1, $2, now(), ($3::timestamptz AT TIME ZONE $2"
        f" + interval '1 {window}') AT TIME ZONE $2)",
        window,
        timezone,
        got,
    )
    assert following - got == length


# --------------------------------------------------------------------------------------------
# extend_reservation
# --------------------------------------------------------------------------------------------


async def test_extend_raises_the_hold_when_every_budget_it_holds_has_room(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn, 10_000)
    team = await budget(conn, account, "team:a", "day", 1_000)
    report, granted = await reserve_with(conn, account, {"tokens": 400}, ["team:a"])
    more = await call(conn, "extend_reservation", report, account, json.dumps({"tokens": 300}))
    assert more["success"] is True, more
    assert (more["reserved_tokens"], more["reservation_id"]) == (700, granted["reservation_id"])
    assert more["budgets"][0]["held"] == 700
    assert more["budgets"][0]["available"] == 300
    assert more["available_tokens"] == 10_000 - 700
    before = await counts(conn)
    refused = await call(conn, "extend_reservation", report, account, json.dumps({"tokens": 301}))
    assert (refused["error"], refused["budget_id"], refused["available"]) == (
        "insufficient_budget",
        team["budget_id"],
        300,
    )
    refused = await call(conn, "extend_reservation", report, account, json.dumps({"tokens": 9_301}))
    assert refused["error"] == "insufficient_tokens"
    assert await counts(conn) == before
    # The extension is what the report may use without an overrun.
    answer = await step(conn, report, account, "S0", 500, 200)
    assert "over_reservation" not in answer
    await call(conn, "finish_report", report, account, "complete", None)
    refused = await call(conn, "extend_reservation", report, account, json.dumps({"tokens": 1}))
    assert refused["error"] == "report_finalized"
    missing = await call(
        conn, "extend_reservation", uuid.uuid4(), account, json.dumps({"tokens": 1})
    )
    assert missing["error"] == "reservation_not_found"


async def test_an_extension_racing_reservations_never_overcommits(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    for _ in range(3):
        account = await new_account(conn, MONTH_LIMIT)
        await budget(conn, account, "team:a", "day", 1_000)
        report, _ = await reserve_with(conn, account, {"tokens": 500}, ["team:a"])
        lanes = [await connect() for _ in range(6)]
        results = await asyncio.gather(
            call(lanes[0], "extend_reservation", report, account, json.dumps({"tokens": 300})),
            *(reserve_with(c, account, {"tokens": 300}, ["team:a"]) for c in lanes[1:]),
        )
        extension = results[0]
        granted = sum(1 for _, a in results[1:] if a["success"]) + bool(extension["success"])
        # 500 held; 300 more fit once (800), a second 300 would pass 1,000: exactly one of the six.
        assert granted == 1, results
        held = await conn.fetchval(
            "SELECT sum(reserved_tokens) FROM tokentrack.report_reservations"
            " WHERE account_id = $1 AND status = 'active'",
            account,
        )
        assert held == 800


# --------------------------------------------------------------------------------------------
# Concurrency: exactly as many as fit, for every budget at once
# --------------------------------------------------------------------------------------------


async def test_racing_reservations_of_subjects_sharing_budgets_grant_exactly_what_fits(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    for _ in range(3):
        account = await new_account(conn, MONTH_LIMIT)
        team = await budget(conn, account, "team:a", "day", 500)  # shared: 5 of 100
        key_1 = await budget(conn, account, "key:1", "minute", 300)  # 3 of 100
        lanes = [await connect() for _ in range(12)]
        requests = [
            reserve_with(c, account, {"tokens": 100}, ["team:a", "key:1" if i % 2 else "key:2"])
            for i, c in enumerate(lanes)
        ]
        answers = [a for _, a in await asyncio.gather(*requests)]
        granted = [a for a in answers if a["success"]]
        refused = [a for a in answers if not a["success"]]
        assert len(granted) == 5, answers  # the team's budget is the binding one
        assert all(a["error"] == "insufficient_budget" for a in refused)
        on_key_1 = sum(
            1 for a in granted if any(b["budget_id"] == key_1["budget_id"] for b in a["budgets"])
        )
        assert on_key_1 <= 3
        # Every budget within its limit, from the tables.
        for b, limit in ((team, 500), (key_1, 300)):
            held = await conn.fetchval(
                "SELECT COALESCE(sum(reserved_tokens), 0) FROM tokentrack.report_reservations"
                " WHERE account_id = $1 AND status = 'active'"
                " AND holds @> jsonb_build_array(jsonb_build_object('budget_id', $2::text))",
                account,
                b["budget_id"],
            )
            assert held <= limit


async def test_overrun_answers_carry_how_far_over_and_billing_stays_actual(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    report, _ = await reserve(conn, account, 1_000)
    first = await step(conn, report, account, "S0", 600, 300)
    assert "over_reservation" not in first
    over = await step(conn, report, account, "S1", 100, 50)
    assert (
        over["over_reservation"],
        over["over_by"],
        over["reserved_tokens"],
        over["recorded_tokens"],
    ) == (
        True,
        50,
        1_000,
        1_050,
    )
    again = await step(conn, report, account, "S1", 100, 50)  # a retry says so too
    assert (again["duplicate"], again["over_reservation"]) == (True, True)
    settled = await call(conn, "finish_report", report, account, "complete", None)
    assert settled["billed_tokens"] == 1_050


async def test_reserve_refuses_invalid_arguments_naming_them(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    cases: list[tuple[Any, Any, Any, str, str]] = [
        (None, [], "standard", "p_estimate", "22004"),
        ([1], [], "standard", "p_estimate", "22023"),
        ({}, [], "standard", "p_estimate.tokens", "22004"),
        ({"tokens": 0}, [], "standard", "p_estimate.tokens", "22023"),
        ({"tokens": 1.5}, [], "standard", "p_estimate.tokens", "22023"),
        ({"tokens": 2_147_483_648}, [], "standard", "p_estimate.tokens", "22003"),
        ({"tokens": 1, "cost_micros": -1}, [], "standard", "p_estimate.cost_micros", "22023"),
        (
            {"tokens": 1, "cost_micros": 1, "model": "m"},
            [],
            "standard",
            "p_estimate.model",
            "22023",
        ),
        ({"tokens": 1, "model": 5}, [], "standard", "p_estimate.model", "22023"),
        ({"tokens": 1, "usd": 1}, [], "standard", "p_estimate.usd", "22023"),
        ({"tokens": 1}, None, "standard", "p_subjects", "22004"),
        ({"tokens": 1}, [None], "standard", "p_subjects", "22004"),
        ({"tokens": 1}, [" "], "standard", "p_subjects", "22023"),
        ({"tokens": 1}, ["x" * 201], "standard", "p_subjects", "22001"),
        ({"tokens": 1}, [f"s{i}" for i in range(33)], "standard", "p_subjects", "22023"),
        ({"tokens": 1}, [], "fast", "p_mode", "22023"),
    ]
    before = await counts(conn)
    for estimate, subjects, mode, field, sqlstate in cases:
        with pytest.raises(asyncpg.PostgresError) as caught:
            await conn.fetchval(
                "SELECT tokentrack.reserve($1, $2, $3::jsonb, $4::text[], $5)",
                account,
                uuid.uuid4(),
                None if estimate is None else json.dumps(estimate),
                subjects,
                mode,
            )
        assert caught.value.sqlstate == sqlstate, (estimate, subjects, mode, caught.value)
        assert field in str(caught.value), (field, caught.value)
    assert await counts(conn) == before


async def test_a_retry_answers_the_same_reservation_with_what_it_holds(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    team = await budget(conn, account, "team:a", "day", 1_000)
    report, first = await reserve_with(conn, account, {"tokens": 100}, ["team:a"])
    _, again = await reserve_with(conn, account, {"tokens": 900}, ["team:a"], report=report)
    assert (again["existing"], again["reservation_id"], again["reserved_tokens"]) == (
        True,
        first["reservation_id"],
        100,
    )
    assert [(b["budget_id"], b["held"]) for b in again["budgets"]] == [(team["budget_id"], 100)]


async def test_a_time_zone_is_taken_in_any_case_and_stored_as_the_zone_spells_it(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    answer = await budget(conn, account, None, "day", 10, timezone="europe/berlin")
    assert answer["timezone"] == "Europe/Berlin"


async def test_a_null_mode_keeps_a_pending_reports_mode(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    report = uuid.uuid4()
    await conn.execute(
        "INSERT INTO tokentrack.reports (id, account_id, status, mode)"
        " VALUES ($1, $2, 'pending', 'hybrid')",
        report,
        account,
    )
    raw = await conn.fetchval(
        "SELECT tokentrack.reserve($1, $2, '{\"tokens\": 1}'::jsonb, '{}'::text[], NULL)::text",
        account,
        report,
    )
    assert json.loads(raw)["success"] is True
    assert await conn.fetchval(
        "SELECT (status, mode)::text FROM tokentrack.reports WHERE id = $1", report
    ) == ("(processing,hybrid)")
    other, granted = await reserve_with(conn, account, {"tokens": 1}, mode="discovery")
    assert granted["success"] is True
    assert (
        await conn.fetchval("SELECT mode FROM tokentrack.reports WHERE id = $1", other)
        == "discovery"
    )


async def test_an_extension_is_checked_against_the_accounts_active_period(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn, 1_000)
    report, _ = await reserve_with(conn, account, {"tokens": 500})
    # A period switch: the new period holds 600, of which the live reservation holds 500.
    await call(conn, "open_usage_period", account, 600, None)
    refused = await call(conn, "extend_reservation", report, account, json.dumps({"tokens": 400}))
    assert (refused["error"], refused["available_tokens"]) == ("insufficient_tokens", 100)
    granted = await call(conn, "extend_reservation", report, account, json.dumps({"tokens": 100}))
    assert (granted["success"], granted["reserved_tokens"]) == (True, 600)


async def test_reconcile_explains_every_budgets_limit_and_holds(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    team = await budget(conn, account, "team:a", "day", 1_000)
    await reserve_with(conn, account, {"tokens": 10}, ["team:a"])
    assert (await call(conn, "reconcile", account))["ok"] is True
    # A limit changed behind set_budget's back, and a window row gone: both are found.
    await conn.execute("UPDATE tokentrack.budgets SET limit_amount = 5")
    await conn.execute("DELETE FROM tokentrack.budget_windows")
    verdict = await call(conn, "reconcile", account)
    assert verdict["ok"] is False
    found = {
        (d["check"], d["budget_id"], d.get("expected"), d.get("actual"))
        for d in verdict["discrepancies"]
    }
    assert found == {
        ("budget_limit", team["budget_id"], 1_000, 5),
        ("budget_hold_window", team["budget_id"], 1, 0),
    }


async def test_set_budget_runs_at_read_committed_only(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    async with conn.transaction(isolation="repeatable_read"):
        with pytest.raises(asyncpg.PostgresError) as caught:
            await conn.fetchval(
                "SELECT tokentrack.set_budget($1, NULL, 'tokens', 'day', 1)", account
            )
    assert caught.value.sqlstate == "25000"


async def test_health_reports_every_budget_in_its_window_nearest_first(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    near = await budget(conn, account, "team:a", "day", 100)
    await budget(conn, account, "team:b", "day", 1_000)
    report, _ = await reserve_with(conn, account, {"tokens": 90}, ["team:a", "team:b"])
    await step(conn, report, account, "S0", 50, 0)
    await call(conn, "finish_report", report, account, "complete", None)
    await reserve_with(conn, account, {"tokens": 50}, ["team:a"])
    health = await call(conn, "health", 24)
    budgets = health["budgets"]
    assert (budgets["count"], budgets["exhausted"], budgets["over_limit"]) == (2, 1, 0)
    first = budgets["nearest"][0]
    assert (first["budget_id"], first["used"], first["held"], first["limit"]) == (
        near["budget_id"],
        50,
        50,
        100,
    )
