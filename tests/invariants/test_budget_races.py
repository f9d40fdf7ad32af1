"""Budgets under real concurrency: exactly as many as fit, for every budget at once.

Real connections race ``reserve()`` on budgets their subjects share (an account's month, teams'
days, keys' minutes, and a total budget in cost), repeated over several rounds with fresh
accounts; each round asserts the exact number granted per budget, that every refusal names a
budget that cannot hold it, that each window's rows add up, and every invariant (7 included,
through the grant probe). A second test races reservations across the turn of a minute, an
extension test races extensions against new reservations, and a test checks the oracle's
calendar windows against the database's.

Minute windows: a round that must stay within one minute waits (polling the server's clock,
at most 3 s) when it would start too close to the next minute. The window-turn test waits for
the next minute (up to 60 s): the clock cannot be moved.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from invariants import check_invariants, install_grant_probe
from model import parse_time, window_start
from sqlkit import Connect, call, new_account

E = 100  # every racing request's estimate, in tokens
COST = 7  # and in cost micros
ROUNDS = 4
LANES = 8

# The shared budgets of the exactness race: (subject, unit, window, limit). Red's keys could
# hold 9 requests, its team 5; blue's team could hold 20, its keys 4; the account's month and
# its total cost hold 9 = 5 + 4: every budget that binds is exhausted at once.
RACE_BUDGETS = (
    (None, "tokens", "month", 9 * E),
    (None, "cost_micros", "total", 9 * COST),
    ("team:red", "tokens", "day", 5 * E),
    ("team:blue", "tokens", "day", 20 * E),
    ("key:r1", "tokens", "minute", 3 * E),
    ("key:r2", "tokens", "minute", 3 * E),
    ("key:r3", "tokens", "minute", 3 * E),
    ("key:b1", "tokens", "minute", 2 * E),
    ("key:b2", "tokens", "minute", 2 * E),
)
RED_KEYS = ("key:r1", "key:r2", "key:r3")
BLUE_KEYS = ("key:b1", "key:b2")


async def set_budgets(
    conn: asyncpg.Connection, account: uuid.UUID, budgets: Any
) -> dict[str | None, dict[str, Any]]:
    """Create the budgets; {subject or unit: set_budget's answer}."""
    made = {}
    for subject, unit, window, limit in budgets:
        answer = await call(conn, "set_budget", account, subject, unit, window, limit, "{}")
        assert answer["success"] is True, answer
        assert answer["created"] is True, answer
        made[subject if subject is not None else f"account:{unit}"] = answer
    return made


async def server_now(conn: asyncpg.Connection) -> datetime:
    value = await conn.fetchval("SELECT clock_timestamp()")
    assert isinstance(value, datetime)
    return value


async def away_from_a_minute_turn(conn: asyncpg.Connection, margin: float = 3.0) -> None:
    """Return when at least ``margin`` seconds remain before the next minute (server clock)."""
    now = await server_now(conn)
    left = 60 - now.second - now.microsecond / 1e6
    if left < margin:
        await asyncio.sleep(left + 0.05)


async def until(conn: asyncpg.Connection, moment: datetime) -> None:
    """Poll the server's clock until it reads ``moment`` or later."""
    while True:
        now = await server_now(conn)
        if now >= moment:
            return
        await asyncio.sleep(min(0.2, max(0.0, (moment - now).total_seconds() - 0.01)))


async def waiting_for_a_lock(conn: asyncpg.Connection, count: int) -> None:
    """Return once ``count`` sessions of this database wait for a lock (10 s at most)."""
    for _ in range(1_000):
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'"
        )
        if waiting >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{count} sessions never waited for a lock")


async def reserve(
    conn: asyncpg.Connection, account: uuid.UUID, report: uuid.UUID, subjects: list[str]
) -> dict[str, Any]:
    return await call(
        conn,
        "reserve",
        account,
        report,
        json.dumps({"tokens": E, "cost_micros": COST}),
        subjects,
        "standard",
    )


async def race(
    conns: list[asyncpg.Connection], account: uuid.UUID, requests: list[list[str]]
) -> list[tuple[uuid.UUID, list[str], dict[str, Any]]]:
    """Every request (its subjects) on the lanes, round-robin, all lanes at once."""
    lanes: list[list[tuple[uuid.UUID, list[str]]]] = [[] for _ in conns]
    for n, subjects in enumerate(requests):
        lanes[n % len(conns)].append((uuid.uuid4(), subjects))

    async def run(conn: asyncpg.Connection, todo: list[tuple[uuid.UUID, list[str]]]) -> Any:
        return [(r, s, await reserve(conn, account, r, s)) for r, s in todo]

    done = await asyncio.gather(*(run(c, lane) for c, lane in zip(conns, lanes, strict=True)))
    return [result for lane in done for result in lane]


async def windows(conn: asyncpg.Connection, account: uuid.UUID) -> dict[tuple[str, datetime], int]:
    """{(budget id, window start): limit - used - active holds} of the account's windows."""
    rows = await conn.fetch(
        "SELECT w.budget_id::text AS budget, w.window_start, b.limit_amount - w.used - COALESCE(("
        "  SELECT sum(CASE WHEN b.unit = 'tokens' THEN rr.reserved_tokens"
        "                  ELSE COALESCE(rr.reserved_cost_micros, 0) END)"
        "  FROM tokentrack.report_reservations AS rr"
        "  WHERE rr.account_id = w.account_id AND rr.status = 'active' AND rr.expires_at > now()"
        "    AND EXISTS (SELECT FROM jsonb_to_recordset(rr.holds)"
        "      AS h (budget_id uuid, window_start timestamptz)"
        "      WHERE h.budget_id = w.budget_id AND h.window_start = w.window_start)), 0) AS left"
        " FROM tokentrack.budget_windows AS w"
        " JOIN tokentrack.budgets AS b ON b.account_id = w.account_id AND b.id = w.budget_id"
        " WHERE w.account_id = $1",
        account,
    )
    return {(r["budget"], r["window_start"]): r["left"] for r in rows}


async def bill_everything(conn: asyncpg.Connection, account: uuid.UUID, reports: list[Any]) -> int:
    """One step per report (its tokens vary), then finish it; the tokens billed."""
    billed = 0
    for n, report in enumerate(reports):
        answer = await call(
            conn, "persist_step_usage", report, account, "AN0", 10 + n, 5 * n, None, None
        )
        assert answer["success"] is True, answer
        finished = await call(conn, "finish_report", report, account, "complete", None)
        assert finished["billed_tokens"] == 10 + 6 * n, finished
        billed += 10 + 6 * n
    return billed


async def test_racing_reservations_grant_exactly_what_fits_every_budget_at_once(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    """Twenty requests on eight connections, each with a team and one of its keys, four per
    key: every round grants exactly 9 (the account's month and its total cost exhausted),
    exactly 5 of red (its day exhausted, its keys between them 5, none over 3) and exactly 4 of
    blue (its keys exhausted, 2 each), and refuses the other 11 each by a budget that is full
    for it; the windows' used add up to what their reports were billed."""
    await install_grant_probe(conn)
    conns = [await connect() for _ in range(LANES)]
    requests = [
        [team, key]
        for team, keys in (("team:red", RED_KEYS), ("team:blue", BLUE_KEYS))
        for key in keys
        for _ in range(4)
    ]
    requests = requests[::2] + requests[1::2]  # spread the subjects over the lanes
    grants: list[dict[str, Any]] = []
    observed = []
    for _ in range(ROUNDS):
        account = await new_account(conn, 1_000_000)
        made = await set_budgets(conn, account, RACE_BUDGETS)
        by_id = {a["budget_id"]: name for name, a in made.items()}
        await away_from_a_minute_turn(conn)
        results = await race(conns, account, requests)

        granted = [(r, s, a) for r, s, a in results if a["success"]]
        refused = [(r, s, a) for r, s, a in results if not a["success"]]
        grants += [a for _, _, a in granted]
        per_subject = Counter(subject for _, s, _ in granted for subject in s)
        observed.append((len(granted), dict(sorted(per_subject.items()))))
        assert len(granted) == 9, observed
        assert per_subject["team:red"] == 5, observed
        assert per_subject["team:blue"] == 4, observed
        assert per_subject["key:b1"] == per_subject["key:b2"] == 2, observed
        assert sum(per_subject[k] for k in RED_KEYS) == 5, observed
        assert all(per_subject[k] <= 3 for k in RED_KEYS), observed

        left = await windows(conn, account)
        for _, subjects, answer in granted:
            # The account's two budgets, its team's and its key's, each in one window.
            names = [by_id[b["budget_id"]] for b in answer["budgets"]]
            assert sorted(names, key=str) == sorted(
                ["account:tokens", "account:cost_micros", *subjects], key=str
            ), answer
        for _, subjects, answer in refused:
            assert answer["error"] == "insufficient_budget", answer
            name = by_id[answer["budget_id"]]
            assert name in ("account:tokens", "account:cost_micros", *subjects), answer
            assert answer["requested"] == (COST if name == "account:cost_micros" else E), answer
            start = parse_time(answer["window_start"])
            assert left[(answer["budget_id"], start)] < answer["requested"], answer
        # Exhausted at once: the account's month and total cost, red's day, blue's keys.
        for name in ("account:tokens", "account:cost_micros", "team:red", *BLUE_KEYS):
            budget = made[name]["budget_id"]
            assert [v for (b, _), v in left.items() if b == budget] == [0], (name, left)
        minutes = {
            parse_time(b["window_start"])
            for _, _, a in granted
            for b in a["budgets"]
            if b["window"] == "minute"
        }
        assert len(minutes) == 1, minutes  # the round stayed within one minute

        assert await check_invariants(conn, grants=grants) == []
        billed = await bill_everything(conn, account, [r for r, _, _ in granted])
        used = dict(
            await conn.fetch(
                "SELECT w.budget_id::text, w.used FROM tokentrack.budget_windows AS w"
                " JOIN tokentrack.budgets AS b ON b.id = w.budget_id"
                " WHERE w.account_id = $1 AND b.subject IS NULL AND b.unit = 'tokens'",
                account,
            )
        )
        assert used == {made["account:tokens"]["budget_id"]: billed}
        assert await check_invariants(conn, grants=grants) == []
    print(f"granted per round (total, per subject): {observed}")


async def test_reservations_racing_the_turn_of_a_minute_hold_the_window_of_their_time(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    """A key's minute budget (3 requests a window). Five reservations start a few ms before
    the minute turns and wait behind a lock held past the turn; five more start after it; all
    race once the lock goes. Each reservation holds the minute window of its own time (the
    moment its transaction began, its created_at), also when it was granted after the turn:
    exactly 3 are granted in each window, the refusals name their window, and each window's
    used is what its own reports were billed."""
    await install_grant_probe(conn)
    blocker = await connect()
    early = [await connect() for _ in range(5)]
    late = [await connect() for _ in range(5)]
    for _attempt in range(3):
        account = await new_account(conn, 1_000_000)
        made = await set_budgets(
            conn, account, ((None, "tokens", "month", 10**9), ("key:k", "tokens", "minute", 3 * E))
        )
        key = made["key:k"]["budget_id"]
        now = await server_now(conn)
        turn = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
        if (turn - now).total_seconds() < 1:
            turn += timedelta(minutes=1)
        holding = blocker.transaction()
        await holding.start()
        await blocker.execute(
            "SELECT FROM tokentrack.usage_periods WHERE account_id = $1 FOR UPDATE", account
        )
        await until(conn, turn - timedelta(milliseconds=40))
        before = [
            asyncio.ensure_future(reserve(c, account, uuid.uuid4(), ["key:k"])) for c in early
        ]
        await until(conn, turn + timedelta(milliseconds=20))
        after = [asyncio.ensure_future(reserve(c, account, uuid.uuid4(), ["key:k"])) for c in late]
        await waiting_for_a_lock(conn, len(early) + len(late))
        await holding.commit()
        answers = await asyncio.gather(*before, *after)

        starts = []
        for answer in answers:
            if answer["success"]:
                created = await conn.fetchval(
                    "SELECT created_at FROM tokentrack.report_reservations WHERE id = $1",
                    uuid.UUID(answer["reservation_id"]),
                )
                (hold,) = [b for b in answer["budgets"] if b["budget_id"] == key]
                assert parse_time(hold["window_start"]) == window_start("minute", "UTC", created)
                starts.append((parse_time(hold["window_start"]), True, answer))
            else:
                assert answer["error"] == "insufficient_budget", answer
                assert answer["budget_id"] == key, answer
                starts.append((parse_time(answer["window_start"]), False, answer))
        old, new = turn - timedelta(minutes=1), turn
        per_window = Counter((start, ok) for start, ok, _ in starts)
        if not (per_window[(old, True)] + per_window[(old, False)]):
            continue  # the early ones were late (a slow machine): try the next minute
        asked = Counter(start for start, _, _ in starts)
        assert set(asked) <= {old, new}, starts
        for window in (old, new):
            assert per_window[(window, True)] == min(3, asked[window]), per_window
        # Granted after the turn, held in the window of their time.
        probed = await conn.fetch(
            "SELECT reservation_id::text AS id, recorded_at FROM tokentrack_probe.holds"
            " WHERE budget_id = $1",
            uuid.UUID(key),
        )
        assert all(r["recorded_at"] >= turn for r in probed), probed
        grants = [a for _, ok, a in starts if ok]
        assert await check_invariants(conn, grants=grants) == []
        reports = await conn.fetch(
            "SELECT report_id FROM tokentrack.report_reservations WHERE account_id = $1",
            account,
        )
        billed = await bill_everything(conn, account, [r["report_id"] for r in reports])
        used = dict(
            await conn.fetch(
                "SELECT window_start, used FROM tokentrack.budget_windows WHERE budget_id = $1",
                uuid.UUID(key),
            )
        )
        assert sum(used.values()) == billed
        assert set(used) == {w for w in (old, new) if per_window[(w, True)]}
        assert await check_invariants(conn, grants=grants) == []
        print(
            f"granted/asked per minute window: old {per_window[(old, True)]}/{asked[old]},"
            f" new {per_window[(new, True)]}/{asked[new]}"
        )
        return
    raise AssertionError("three minute turns passed without an early reservation in time")


async def lane(
    conn: asyncpg.Connection, account: uuid.UUID, ops: list[tuple[str, uuid.UUID]]
) -> list[tuple[str, dict[str, Any]]]:
    """Extensions of reports' reservations (E tokens more) and new reservations, in order."""
    done = []
    for what, report in ops:
        if what == "extend":
            more = json.dumps({"tokens": E})
            done.append((what, await call(conn, "extend_reservation", report, account, more)))
        else:
            done.append((what, await reserve(conn, account, report, ["key:k"])))
    return done


async def test_extensions_racing_reservations_grant_exactly_what_fits(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    """A key's minute budget of 10 units (of E tokens), 3 held by running reservations; 6
    extensions of them (E more each) and 6 new reservations (E each) race on eight
    connections: exactly 7 are granted, extensions and reservations together, and every other
    is refused by that budget; the probe saw every grant within the limit."""
    await install_grant_probe(conn)
    conns = [await connect() for _ in range(LANES)]
    observed = []
    for _ in range(ROUNDS):
        account = await new_account(conn, 1_000_000)
        made = await set_budgets(conn, account, (("key:k", "tokens", "minute", 10 * E),))
        await away_from_a_minute_turn(conn)
        running = []
        for _ in range(3):
            report = uuid.uuid4()
            assert (await reserve(conn, account, report, ["key:k"]))["success"]
            running.append(report)
        todo: list[tuple[str, uuid.UUID]] = [("extend", r) for r in running * 2]
        todo += [("reserve", uuid.uuid4()) for _ in range(6)]
        todo = todo[::2] + todo[1::2]

        lanes = [todo[i::LANES] for i in range(LANES)]
        done = [
            x
            for ops in await asyncio.gather(
                *(lane(c, account, o) for c, o in zip(conns, lanes, strict=True))
            )
            for x in ops
        ]
        granted = Counter(what for what, a in done if a["success"])
        observed.append(dict(granted))
        assert sum(granted.values()) == 7, observed
        for _, answer in done:
            if not answer["success"]:
                assert answer["error"] == "insufficient_budget", answer
                assert answer["budget_id"] == made["key:k"]["budget_id"], answer
        assert list((await windows(conn, account)).values()) == [0]
        extensions = [a for what, a in done if what == "extend" and a["success"]]
        new = [a for what, a in done if what == "reserve" and a["success"]]
        assert await check_invariants(conn, grants=new, extensions=extensions) == []
    print(f"granted per round (extensions, reservations): {observed}")


async def test_the_oracle_windows_are_the_databases(conn: asyncpg.Connection) -> None:
    """tests/support/model.py's window_start against budget_window_start, around turns of
    days, weeks, months and both daylight-saving changes, in four time zones."""
    moments = []
    for base in (
        "2026-03-29T00:59:59.999",
        "2026-10-25T00:30:00",
        "2026-12-31T23:59:59.5",
        "2026-11-01T05:00:00",
        "2027-01-04T00:00:00",
        "2026-06-15T12:34:56.789",
    ):
        start = datetime.fromisoformat(base).replace(tzinfo=UTC)
        moments += [start + timedelta(minutes=37 * n) for n in range(-3, 4)]
    for timezone in ("UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"):
        for window in ("minute", "hour", "day", "week", "month"):
            rows = await conn.fetch(
                "SELECT m, tokentrack.budget_window_start($1, $2, now(), m) AS s"
                " FROM unnest($3::timestamptz[]) AS m",
                window,
                timezone,
                moments,
            )
            for row in rows:
                assert window_start(window, timezone, row["m"]) == row["s"], (window, timezone, row)


async def test_racing_steps_that_pass_the_reservation_together_are_flagged(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    """A reservation of 10 tokens; two steps of 8 tokens recorded at once. In every serial
    order the second one takes the report past its reservation, so its answer carries
    over_reservation ("carried from the step whose usage takes the report past its
    reservation on"). The first step's transaction is held open after its call: the second
    waits for the reservation's row lock (steps of one report are recorded one after the
    other), and once the first commits, its overrun sum counts the first step. (Under the
    FOR SHARE lock steps held before, both ran at once, each summed without the other, and
    neither answer carried over_reservation.)"""
    account = await new_account(conn, 10_000)
    report = uuid.uuid4()
    assert (await call(conn, "try_reserve_tokens", account, report, 10))["success"]
    first, second = await connect(), await connect()
    async with first.transaction():
        answer_a = await call(first, "persist_step_usage", report, account, "a", 4, 4, None, None)
        pending = asyncio.ensure_future(
            call(second, "persist_step_usage", report, account, "b", 4, 4, None, None)
        )
        await waiting_for_a_lock(conn, 1)
        assert not pending.done()
    answer_b = await asyncio.wait_for(pending, 10)
    assert answer_a["success"], answer_a
    assert answer_b["success"], answer_b
    recorded = await conn.fetchval(
        "SELECT sum(total_tokens) FROM tokentrack.report_step_usage WHERE report_id = $1", report
    )
    assert recorded == 16
    assert "over_reservation" not in answer_a, answer_a
    assert answer_b["over_reservation"] is True, answer_b
    assert (answer_b["over_by"], answer_b["reserved_tokens"], answer_b["recorded_tokens"]) == (
        6,
        10,
        16,
    )


async def test_an_extension_of_a_previous_period_and_a_reservation_cannot_both_miss_each_other(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    """After a period switch, a reservation of the old period (100 tokens) is extended by 150
    while a new reservation of 150 is made in the new period (limit 300), both holding the
    account's month budget, both waiting for it. Both are checked against the active period
    (300 - 100 = 200 left for one of them), so exactly one is granted and the other refused
    with the 50 that the first left; the account's active reservations never hold more than
    the active period's limit (the grant probe's invariant 3). (An extension that checked and
    locked the old period instead was granted together with the reservation.)"""
    await install_grant_probe(conn)
    account = await new_account(conn, 1_000)
    made = await set_budgets(conn, account, ((None, "tokens", "month", 10**6),))
    old = uuid.uuid4()
    held = await call(conn, "reserve", account, old, json.dumps({"tokens": 100}), [], "standard")
    assert held["success"] is True, held
    assert (await call(conn, "open_usage_period", account, 300, None))["success"]
    blocker, extender, reserver = await connect(), await connect(), await connect()
    holding = blocker.transaction()
    await holding.start()
    await blocker.execute(
        "SELECT FROM tokentrack.budgets WHERE id = $1 FOR UPDATE",
        uuid.UUID(made["account:tokens"]["budget_id"]),
    )
    extension = asyncio.ensure_future(
        call(extender, "extend_reservation", old, account, json.dumps({"tokens": 150}))
    )
    await waiting_for_a_lock(conn, 1)
    new = asyncio.ensure_future(
        call(
            reserver, "reserve", account, uuid.uuid4(), json.dumps({"tokens": 150}), [], "standard"
        )
    )
    await waiting_for_a_lock(conn, 2)
    await holding.commit()
    extended, reserved = await extension, await new
    both = f"extension {extended}, reservation {reserved}"
    assert [extended["success"], reserved["success"]].count(True) == 1, both
    granted, refused = (extended, reserved) if extended["success"] else (reserved, extended)
    assert granted["available_tokens"] == 50, both
    assert refused["error"] == "insufficient_tokens", both
    assert refused["available_tokens"] == 50, both
    grants = [a for a in (held, reserved) if a["success"]]
    extensions = [extended] if extended["success"] else []
    assert await check_invariants(conn, grants=grants, extensions=extensions) == [], both


async def test_a_reservation_sees_a_previous_periods_report_billed_or_not_but_not_both(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    """After a period switch, a report of the old period (reserved 100, holding the account's
    month budget) is finished, billing 40, while a new reservation of 50 is made in the new
    period (limit 1000). The finish locks the old period and the budget; the reservation locks
    the new period, then waits for the budget, and reads every sum after the finish committed.
    In a serial order it sees both the old report active (available_tokens 850, the budget
    1000 - 0 - 100 - 50 = 850) or both billed (available_tokens 950, the budget
    1000 - 40 - 50 = 910): having waited for the finish, the latter. (When the period's holds
    were summed before the budget lock, it answered 850 and 910.)"""
    account = await new_account(conn, 1_000)
    made = await set_budgets(conn, account, ((None, "tokens", "month", 1_000),))
    old = uuid.uuid4()
    held = await call(conn, "reserve", account, old, json.dumps({"tokens": 100}), [], "standard")
    assert held["success"] is True, held
    assert (await call(conn, "persist_step_usage", old, account, "s", 30, 10, None, None))[
        "success"
    ]
    assert (await call(conn, "open_usage_period", account, 1_000, None))["success"]
    finisher, reserver = await connect(), await connect()
    finishing = finisher.transaction()
    await finishing.start()
    finished = await call(finisher, "finish_report", old, account, "complete", None)
    assert finished["billed_tokens"] == 40, finished
    new = asyncio.ensure_future(
        call(reserver, "reserve", account, uuid.uuid4(), json.dumps({"tokens": 50}), [], "standard")
    )
    await waiting_for_a_lock(conn, 1)
    await finishing.commit()
    answer = await new
    assert answer["success"] is True, answer
    (budget,) = answer["budgets"]
    assert budget["budget_id"] == made["account:tokens"]["budget_id"]
    # It waited for the finish's budget lock, so the finish comes first in its serial order.
    assert (answer["available_tokens"], budget["available"]) == (950, 910), answer


async def test_an_extension_sees_a_previous_periods_report_billed_or_not_but_not_both(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    """As the reservation above, for extend_reservation: after a period switch, a report of the
    old period (reserved 100, holding the account's month budget) is finished, billing 40,
    while a report of the new period (reserved 50, the same budget) is extended by 10. The
    extension locks the new period, waits for the budget the finish holds, and reads every
    sum after the finish committed: the period 1000 - 0 - 50 - 10 = 940, the budget
    1000 - 40 - 50 - 10 = 900. (When the period's sum was read before the budget lock, the
    period still counted the old report's 100 held: 840.)"""
    account = await new_account(conn, 1_000)
    made = await set_budgets(conn, account, ((None, "tokens", "month", 1_000),))
    old, new = uuid.uuid4(), uuid.uuid4()
    held = await call(conn, "reserve", account, old, json.dumps({"tokens": 100}), [], "standard")
    assert held["success"] is True, held
    assert (await call(conn, "persist_step_usage", old, account, "s", 30, 10, None, None))[
        "success"
    ]
    assert (await call(conn, "open_usage_period", account, 1_000, None))["success"]
    granted = await call(conn, "reserve", account, new, json.dumps({"tokens": 50}), [], "standard")
    assert granted["success"] is True, granted
    finisher, extender = await connect(), await connect()
    finishing = finisher.transaction()
    await finishing.start()
    finished = await call(finisher, "finish_report", old, account, "complete", None)
    assert finished["billed_tokens"] == 40, finished
    extension = asyncio.ensure_future(
        call(extender, "extend_reservation", new, account, json.dumps({"tokens": 10}))
    )
    await waiting_for_a_lock(conn, 1)
    await finishing.commit()
    answer = await asyncio.wait_for(extension, 10)
    assert answer["success"] is True, answer
    (budget,) = answer["budgets"]
    assert budget["budget_id"] == made["account:tokens"]["budget_id"]
    assert (answer["available_tokens"], budget["available"]) == (940, 900), answer
    assert await check_invariants(conn, grants=[held, granted], extensions=[answer]) == []
