"""Contract Part 2: notifications (invariant 9).

A threshold crossing is recorded in the transaction of the reservation, extension or billing
(finalize, finish_report, the sweep, a late step) that takes a budget window's used + active
holds from below ``ceil(limit * threshold / 100)`` to at or above it: exactly one per (budget,
window, threshold), none for a crossing that did not happen, NOTIFY only after commit. Then
claim_notifications / ack_notification: leases, duplicates, lapsed leases handed out again,
acknowledged ones never again.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from sqlkit import Connect, assert_reconciled, call, expire, new_account, step

MONTH_LIMIT = 1_000_000
CHANNEL = "tokentrack_notifications"
LEASED = "claim_notifications($1, $2, $3::text::interval)"


class RolledBack(Exception):
    """Raised inside ``conn.transaction()`` to roll it back."""


async def budget(
    conn: asyncpg.Connection,
    account: uuid.UUID,
    subject: str | None,
    window: str,
    limit: int,
    unit: str = "tokens",
    **options: Any,
) -> uuid.UUID:
    answer = await call(
        conn, "set_budget", account, subject, unit, window, limit, json.dumps(options)
    )
    assert answer["success"] is True, answer
    return uuid.UUID(answer["budget_id"])


async def reserve_with(
    conn: asyncpg.Connection,
    account: uuid.UUID,
    tokens: int,
    subjects: list[str] | None = None,
    report: uuid.UUID | None = None,
    **estimate: Any,
) -> tuple[uuid.UUID, dict[str, Any]]:
    report = report or uuid.uuid4()
    raw = await conn.fetchval(
        "SELECT tokentrack.reserve($1, $2, $3::jsonb, $4::text[])::text",
        account,
        report,
        json.dumps({"tokens": tokens, **estimate}),
        subjects or [],
    )
    answer = json.loads(raw)
    assert answer["success"] is True, answer
    return report, answer


async def crossed(conn: asyncpg.Connection, budget_id: uuid.UUID) -> list[tuple[int, int, int]]:
    """(threshold, used, limit) of every notification of a budget, by threshold."""
    rows = await conn.fetch(
        "SELECT threshold, used, limit_amount FROM tokentrack.notifications"
        " WHERE budget_id = $1 ORDER BY window_start, threshold",
        budget_id,
    )
    return [(r["threshold"], r["used"], r["limit_amount"]) for r in rows]


async def claim(
    conn: asyncpg.Connection, consumer: str, limit: int = 100, lease: str | None = None
) -> list[dict[str, Any]]:
    if lease is None:
        raw = await conn.fetchval(
            "SELECT tokentrack.claim_notifications($1, $2)::text", consumer, limit
        )
    else:
        raw = await conn.fetchval(
            f"SELECT tokentrack.{LEASED}::text",
            consumer,
            limit,
            lease,
        )
    answer = json.loads(raw)
    assert set(answer) == {"notifications"}
    notifications: list[dict[str, Any]] = answer["notifications"]
    return notifications


async def ack(conn: asyncpg.Connection, notification_id: int, consumer: str) -> dict[str, Any]:
    return await call(conn, "ack_notification", notification_id, consumer)


async def until_lapsed(conn: asyncpg.Connection, notification_id: int) -> None:
    """Wait (polling the server's clock, at most 10 s) until the notification's lease lapsed."""
    for _ in range(200):
        if await conn.fetchval(
            "SELECT lease_until <= clock_timestamp() FROM tokentrack.notifications WHERE id = $1",
            notification_id,
        ):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the lease of notification {notification_id} did not lapse")


class Listener:
    """A connection LISTENing on tokentrack_notifications, collecting the payloads."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.payloads: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()

    def _on(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        assert channel == CHANNEL
        self.payloads.append(json.loads(payload))
        self.arrived.set()

    async def start(self) -> Listener:
        await self.conn.add_listener(CHANNEL, self._on)
        return self

    async def settle(self) -> None:
        """A round trip on the listening connection: notifications the server sent before it
        have been read by then (they precede the query's answer on the socket)."""
        await self.conn.fetchval("SELECT 1")

    async def wait_for(self, count: int) -> None:
        while len(self.payloads) < count:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 10)


# --------------------------------------------------------------------------------------------
# Crossings: reserve, extend, billing, late steps, the sweep
# --------------------------------------------------------------------------------------------


async def cross_and_roll_back(
    conn: asyncpg.Connection, listener: Listener, account: uuid.UUID, team: uuid.UUID
) -> None:
    """Cross 80 % in a transaction, check it is recorded and not sent, then roll it back."""
    async with conn.transaction():
        await reserve_with(conn, account, 100, ["team:a"])
        assert await crossed(conn, team) == [(80, 800, 1_000)]
        await listener.settle()
        assert listener.payloads == []  # not before commit
        raise RolledBack


async def test_a_reservation_that_crosses_a_threshold_records_it_and_notifies_after_commit(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    listener = await Listener(await connect()).start()
    account = await new_account(conn, MONTH_LIMIT)
    team = await budget(conn, account, "team:a", "day", 1_000)
    await reserve_with(conn, account, 700, ["team:a"])
    assert await crossed(conn, team) == []  # 70 %: below both thresholds
    # Crossing inside a transaction that rolls back: nothing recorded, nothing sent.
    with pytest.raises(RolledBack):
        await cross_and_roll_back(conn, listener, account, team)
    assert await crossed(conn, team) == []
    await listener.settle()
    assert listener.payloads == []
    # Committed: recorded and sent once, with the row's id.
    await reserve_with(conn, account, 100, ["team:a"])
    assert await crossed(conn, team) == [(80, 800, 1_000)]
    await listener.wait_for(1)
    row = await conn.fetchrow("SELECT * FROM tokentrack.notifications WHERE budget_id = $1", team)
    assert row is not None
    assert listener.payloads == [{"id": row["id"], "account_id": str(account)}]
    assert (row["account_id"], row["subject"], row["unit"], row["budget_window"]) == (
        account,
        "team:a",
        "tokens",
        "day",
    )
    window = await conn.fetchval(
        "SELECT window_start FROM tokentrack.budget_windows WHERE budget_id = $1", team
    )
    assert row["window_start"] == window
    assert (row["claimed_by"], row["acked_at"], row["attempts"]) == (None, None, 0)
    # 100 % is reached exactly by a reservation that fits.
    await reserve_with(conn, account, 200, ["team:a"])
    assert await crossed(conn, team) == [(80, 800, 1_000), (100, 1_000, 1_000)]
    await listener.wait_for(2)
    assert len(listener.payloads) == 2


async def test_a_refused_reservation_records_nothing(conn: asyncpg.Connection) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    team = await budget(conn, account, "team:a", "day", 1_000)
    key = await budget(conn, account, "key:1", "day", 100)
    await reserve_with(conn, account, 90, ["key:1"])
    # The team's window would cross 80 %, but the key's budget refuses: nothing is recorded.
    raw = await conn.fetchval(
        "SELECT tokentrack.reserve($1, $2, '{\"tokens\": 800}'::jsonb, ARRAY['team:a', 'key:1'])",
        account,
        uuid.uuid4(),
    )
    assert json.loads(raw)["error"] == "insufficient_budget"
    assert await crossed(conn, team) == []
    assert await crossed(conn, key) == [(80, 90, 100)]


async def test_several_thresholds_crossed_at_once_give_one_each(conn: asyncpg.Connection) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    team = await budget(conn, account, "team:a", "day", 999, thresholds=[25, 50, 75, 100])
    await reserve_with(conn, account, 800, ["team:a"])
    # ceil(999 * t / 100): 250, 500, 750 crossed by 800; 999 not.
    assert await crossed(conn, team) == [(25, 800, 999), (50, 800, 999), (75, 800, 999)]
    await reserve_with(conn, account, 199, ["team:a"])
    assert [t for t, _, _ in await crossed(conn, team)] == [25, 50, 75, 100]


async def test_the_bound_is_the_ceiling_of_limit_times_threshold(conn: asyncpg.Connection) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    team = await budget(conn, account, "team:a", "total", 7, thresholds=[50])
    await reserve_with(conn, account, 3, ["team:a"])  # 3 < 3.5
    assert await crossed(conn, team) == []
    await reserve_with(conn, account, 1, ["team:a"])  # 4 >= 3.5
    assert await crossed(conn, team) == [(50, 4, 7)]


async def test_an_extension_that_crosses_records_it(conn: asyncpg.Connection) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    team = await budget(conn, account, "team:a", "day", 1_000)
    report, _ = await reserve_with(conn, account, 500, ["team:a"])
    assert await crossed(conn, team) == []
    extended = await call(conn, "extend_reservation", report, account, json.dumps({"tokens": 350}))
    assert extended["success"] is True
    assert await crossed(conn, team) == [(80, 850, 1_000)]
    # A refused extension records nothing.
    refused = await call(conn, "extend_reservation", report, account, json.dumps({"tokens": 500}))
    assert refused["error"] == "insufficient_budget"
    assert await crossed(conn, team) == [(80, 850, 1_000)]


async def test_a_finalize_that_bills_less_than_it_held_records_nothing(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    team = await budget(conn, account, "team:a", "day", 1_000)
    report, _ = await reserve_with(conn, account, 700, ["team:a"])
    other, _ = await reserve_with(conn, account, 50, ["team:a"])
    await step(conn, report, account, "S0", 400, 200)  # 600 <= 700 held
    assert (await call(conn, "finalize_report_usage", report, account))["success"] is True
    # used + held went from 750 to 650: no crossing.
    assert await crossed(conn, team) == []
    await step(conn, other, account, "S0", 30, 20)  # exactly what it held
    await call(conn, "finish_report", other, account, "complete", None)
    assert await crossed(conn, team) == []
    await assert_reconciled(conn)


async def test_a_finalize_that_bills_more_than_it_held_records_the_crossing(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    team = await budget(conn, account, "team:a", "day", 1_000)
    report, _ = await reserve_with(conn, account, 100, ["team:a"])
    held, _ = await reserve_with(conn, account, 200, ["team:a"])
    await step(conn, report, account, "S0", 400, 300)
    assert await crossed(conn, team) == []  # recording a step changes no window
    assert (await call(conn, "finalize_report_usage", report, account))["success"] is True
    # Before: used 0 + held 300 = 300; after: used 700 + held 200 = 900.
    assert await crossed(conn, team) == [(80, 900, 1_000)]
    # finish_report bills the same way.
    await step(conn, held, account, "S0", 150, 150)
    await call(conn, "finish_report", held, account, "complete", None)
    assert await crossed(conn, team) == [(80, 900, 1_000), (100, 1_000, 1_000)]
    await assert_reconciled(conn)


async def test_a_late_step_that_crosses_records_it(conn: asyncpg.Connection) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    team = await budget(conn, account, "team:a", "day", 1_000)
    report, _ = await reserve_with(conn, account, 100, ["team:a"])
    await step(conn, report, account, "S0", 30, 20)
    await call(conn, "finish_report", report, account, "complete", None)
    late = await step(conn, report, account, "S1", 500, 300)
    assert late["late"] is True
    assert await crossed(conn, team) == [(80, 850, 1_000)]
    await assert_reconciled(conn)


async def test_the_sweep_that_bills_an_expired_reservation_records_the_crossing(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    team = await budget(conn, account, "team:a", "day", 1_000)
    report, _ = await reserve_with(conn, account, 600, ["team:a"])
    await step(conn, report, account, "S0", 500, 350)
    await expire(conn, report)  # past expiry it holds nothing: used + held is 0
    swept = await call(conn, "cleanup_expired_reservations")
    assert swept["expired"] == 1
    assert await crossed(conn, team) == [(80, 850, 1_000)]
    await assert_reconciled(conn)


async def test_billing_a_cost_budget_without_a_cost_estimate_records_the_crossing(
    conn: asyncpg.Connection,
) -> None:
    await conn.execute(
        "SELECT tokentrack.set_model_price('m', '{\"input\": 1000000, \"output\": 1000000}')"
    )
    account = await new_account(conn, MONTH_LIMIT)
    spend = await budget(conn, account, None, "month", 1_000, unit="cost_micros")
    report, _ = await reserve_with(conn, account, 10)  # holds 0 in the cost budget
    usage = json.dumps({"input_tokens": 500, "output_tokens": 400})
    await call(conn, "record_step", report, account, "S0", usage, "m")
    await call(conn, "finish_report", report, account, "complete", None)
    assert await crossed(conn, spend) == [(80, 900, 1_000)]


async def test_a_threshold_recrossed_in_the_same_window_is_not_recorded_again(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    team = await budget(conn, account, "team:a", "day", 1_000)
    report, _ = await reserve_with(conn, account, 850, ["team:a"])
    await step(conn, report, account, "S0", 50, 50)
    await call(conn, "finish_report", report, account, "complete", None)  # down to 100
    await reserve_with(conn, account, 750, ["team:a"])  # back up to 850
    assert await crossed(conn, team) == [(80, 850, 1_000)]


async def test_a_new_window_gives_new_notifications(conn: asyncpg.Connection) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    team = await budget(conn, account, "team:a", "day", 1_000)
    report, _ = await reserve_with(conn, account, 850, ["team:a"])
    # Move that window (its row, its notification, the reservation's hold) one day back, as if
    # it had all happened yesterday; today's window then starts empty.
    await conn.execute(
        "UPDATE tokentrack.budget_windows SET window_start = window_start - interval '1 day'"
        " WHERE budget_id = $1",
        team,
    )
    await conn.execute(
        "UPDATE tokentrack.notifications SET window_start = window_start - interval '1 day'"
        " WHERE budget_id = $1",
        team,
    )
    await conn.execute(
        "UPDATE tokentrack.report_reservations SET holds = jsonb_build_array("
        " tokentrack.budget_hold($2,"
        " (holds -> 0 ->> 'window_start')::timestamptz - interval '1 day'))"
        " WHERE report_id = $1",
        report,
        team,
    )
    await reserve_with(conn, account, 850, ["team:a"])
    rows = await conn.fetch(
        "SELECT window_start, threshold FROM tokentrack.notifications WHERE budget_id = $1"
        " ORDER BY window_start",
        team,
    )
    assert [r["threshold"] for r in rows] == [80, 80]
    assert rows[1]["window_start"] - rows[0]["window_start"] == timedelta(days=1)
    # Billing into yesterday's window (the reservation was granted there) crosses its 100 %.
    await step(conn, report, account, "S0", 600, 400)
    await call(conn, "finish_report", report, account, "complete", None)
    rows = await conn.fetch(
        "SELECT window_start, threshold FROM tokentrack.notifications WHERE budget_id = $1"
        " ORDER BY window_start, threshold",
        team,
    )
    assert [r["threshold"] for r in rows] == [80, 100, 80]


async def test_a_credit_grant_raises_the_bound_of_the_crossing(conn: asyncpg.Connection) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    team = await budget(conn, account, "team:a", "total", 1_000)
    granted = await call(conn, "grant_credits", account, team, 1_000, None, "g1", "top-up")
    assert granted["success"] is True, granted
    await reserve_with(conn, account, 900, ["team:a"])
    assert await crossed(conn, team) == []  # 900 of 2,000
    await reserve_with(conn, account, 700, ["team:a"])
    assert await crossed(conn, team) == [(80, 1_600, 2_000)]


async def test_an_adjustment_upwards_that_crosses_records_it_and_downwards_never(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    team = await budget(conn, account, "team:a", "day", 1_000)
    await reserve_with(conn, account, 300, ["team:a"])  # held 300
    adjusted = await call(conn, "adjust_usage", account, team, 400, "k1", "missed usage")
    assert adjusted["success"] is True, adjusted
    assert await crossed(conn, team) == []  # 700
    again = await call(conn, "adjust_usage", account, team, 400, "k1", "missed usage")
    assert again["duplicate"] is True
    assert await crossed(conn, team) == []  # a retry adds nothing
    adjusted = await call(conn, "adjust_usage", account, team, 150, "k2", "more missed usage")
    assert adjusted["success"] is True, adjusted
    assert await crossed(conn, team) == [(80, 850, 1_000)]  # used 550 + held 300
    down = await call(conn, "adjust_usage", account, team, -500, "k3", "overcharge")
    assert down["success"] is True, down
    assert await crossed(conn, team) == [(80, 850, 1_000)]
    await assert_reconciled(conn)


async def test_a_refund_records_nothing(conn: asyncpg.Connection) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    team = await budget(conn, account, "team:a", "day", 1_000, thresholds=[10])
    report, _ = await reserve_with(conn, account, 50, ["team:a"])
    await step(conn, report, account, "S0", 30, 20)
    await call(conn, "finish_report", report, account, "complete", None)
    assert await crossed(conn, team) == []  # 5 %
    refunded = await call(conn, "refund_report", report, account, "r1", "bad answer")
    assert refunded["success"] is True, refunded
    assert await crossed(conn, team) == []
    await assert_reconciled(conn)


# --------------------------------------------------------------------------------------------
# note_crossings itself
# --------------------------------------------------------------------------------------------


async def test_note_crossings_records_only_rises_across_a_bound(conn: asyncpg.Connection) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    team = await budget(conn, account, "team:a", "total", 100, thresholds=[50, 100])
    start = await conn.fetchval("SELECT created_at FROM tokentrack.budgets WHERE id = $1", team)
    note = "SELECT tokentrack.note_crossings($1, $2, $3, $4, $5)"
    assert await conn.fetchval(note, account, team, start, 60, 40) == 0  # a fall
    assert await conn.fetchval(note, account, team, start, 50, 99) == 0  # already at 50
    assert await conn.fetchval(note, account, team, start, 49, 50) == 1
    assert await conn.fetchval(note, account, team, start, 49, 50) == 0  # once
    assert await conn.fetchval(note, account, team, start, 0, 500) == 1  # only 100 is left
    assert await conn.fetchval(note, account, uuid.uuid4(), start, 0, 500) == 0  # no budget
    for position in range(5):
        args: list[object] = [account, team, start, 0, 1]
        args[position] = None
        with pytest.raises(asyncpg.PostgresError) as caught:
            await conn.fetchval(note, *args)
        assert caught.value.sqlstate == "22004"


async def test_a_zero_limit_is_never_crossed(conn: asyncpg.Connection) -> None:
    account = await new_account(conn, MONTH_LIMIT)
    team = await budget(conn, account, "team:a", "total", 0)
    start = await conn.fetchval("SELECT created_at FROM tokentrack.budgets WHERE id = $1", team)
    assert (
        await conn.fetchval(
            "SELECT tokentrack.note_crossings($1, $2, $3, 0, 10)", account, team, start
        )
        == 0
    )


# --------------------------------------------------------------------------------------------
# claim_notifications / ack_notification
# --------------------------------------------------------------------------------------------


async def cross_three(conn: asyncpg.Connection) -> tuple[uuid.UUID, uuid.UUID]:
    account = await new_account(conn, MONTH_LIMIT)
    team = await budget(conn, account, "team:a", "day", 1_000, thresholds=[50, 80, 100])
    await reserve_with(conn, account, 1_000, ["team:a"])
    return account, team


async def test_claim_hands_out_each_notification_to_one_consumer_until_acked(
    conn: asyncpg.Connection,
) -> None:
    account, team = await cross_three(conn)
    first = await claim(conn, "alerts-a", 2)
    assert [n["threshold"] for n in first] == [50, 80]  # oldest first, at most p_limit
    assert set(first[0]) == {
        "id",
        "account_id",
        "budget_id",
        "subject",
        "window_start",
        "threshold",
        "used",
        "limit",
        "created_at",
        "unit",
        "window",
        "lease_until",
        "attempts",
    }
    assert (first[0]["account_id"], first[0]["budget_id"], first[0]["subject"]) == (
        str(account),
        str(team),
        "team:a",
    )
    assert (first[0]["used"], first[0]["limit"], first[0]["attempts"]) == (1_000, 1_000, 1)
    # Under a live lease no other claim hands them out; the third one is free.
    second = await claim(conn, "alerts-b", 10)
    assert [n["threshold"] for n in second] == [100]
    assert await claim(conn, "alerts-c", 10) == []
    # Another consumer cannot acknowledge what a live lease holds.
    refused = await ack(conn, first[0]["id"], "alerts-b")
    assert (refused["success"], refused["error"], refused["claimed_by"]) == (
        False,
        "notification_claimed",
        "alerts-a",
    )
    done = await ack(conn, first[0]["id"], "alerts-a")
    assert (done["success"], done["duplicate"], done["acked_by"]) == (True, False, "alerts-a")
    again = await ack(conn, first[0]["id"], "alerts-a")
    assert (again["success"], again["duplicate"], again["acked_at"]) == (
        True,
        True,
        done["acked_at"],
    )
    # A duplicate by anyone answers the first acknowledgement.
    other = await ack(conn, first[0]["id"], "alerts-b")
    assert (other["duplicate"], other["acked_by"]) == (True, "alerts-a")
    row = await conn.fetchrow(
        "SELECT acked_by, claimed_by, attempts FROM tokentrack.notifications WHERE id = $1",
        first[0]["id"],
    )
    assert row is not None
    assert tuple(row) == ("alerts-a", "alerts-a", 1)


async def test_a_lapsed_lease_is_handed_out_again_and_an_acked_one_never(
    conn: asyncpg.Connection,
) -> None:
    await cross_three(conn)
    held = await claim(conn, "dies", 10, "200 milliseconds")
    assert len(held) == 3
    await ack(conn, held[0]["id"], "dies")  # one acknowledged before it died
    await until_lapsed(conn, held[1]["id"])
    again = await claim(conn, "survivor", 10)
    assert [n["id"] for n in again] == [held[1]["id"], held[2]["id"]]
    assert [n["attempts"] for n in again] == [2, 2]
    # The dead consumer's late acknowledgement is refused: the survivor's lease is live.
    late = await ack(conn, held[1]["id"], "dies")
    assert late["error"] == "notification_claimed"
    for n in again:
        assert (await ack(conn, n["id"], "survivor"))["duplicate"] is False
    assert await claim(conn, "anyone", 10) == []
    counts = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE acked_at IS NULL) AS open,"
        " count(*) FILTER (WHERE acked_by = 'dies') AS by_dead,"
        " count(*) FILTER (WHERE acked_by = 'survivor') AS by_survivor"
        " FROM tokentrack.notifications"
    )
    assert counts is not None
    assert tuple(counts) == (0, 1, 2)


async def test_a_lapsed_lease_may_be_acknowledged_by_its_claimer_or_anyone(
    conn: asyncpg.Connection,
) -> None:
    await cross_three(conn)
    held = await claim(conn, "slow", 10, "100 milliseconds")
    await until_lapsed(conn, held[0]["id"])
    assert (await ack(conn, held[0]["id"], "slow"))["duplicate"] is False
    assert (await ack(conn, held[1]["id"], "operator"))["acked_by"] == "operator"
    # Never claimed at all: anyone may acknowledge it (dismiss it).
    account = await new_account(conn, MONTH_LIMIT)
    fresh_budget = await budget(conn, account, None, "day", 10)
    await reserve_with(conn, account, 9)
    fresh = await conn.fetchval(
        "SELECT id FROM tokentrack.notifications WHERE budget_id = $1", fresh_budget
    )
    assert (await ack(conn, fresh, "operator"))["success"] is True


async def test_ack_of_an_unknown_notification_is_refused(conn: asyncpg.Connection) -> None:
    answer = await ack(conn, 987_654_321, "c")
    assert (answer["success"], answer["error"]) == (False, "notification_not_found")


async def test_concurrent_claimers_never_share_a_notification(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    for _ in range(4):
        await cross_three(conn)
    lanes = [await connect() for _ in range(6)]
    batches = await asyncio.gather(*(claim(c, f"c{i}", 3) for i, c in enumerate(lanes)))
    ids = [n["id"] for batch in batches for n in batch]
    assert len(ids) == len(set(ids)) == 12


@pytest.mark.parametrize(
    ("sql", "args", "state", "column"),
    [
        ("claim_notifications($1, $2)", (None, 1), "22004", "p_consumer"),
        ("claim_notifications($1, $2)", ("  ", 1), "22023", "p_consumer"),
        ("claim_notifications($1, $2)", ("x" * 201, 1), "22001", "p_consumer"),
        ("claim_notifications($1, $2)", ("c", None), "22004", "p_limit"),
        ("claim_notifications($1, $2)", ("c", 0), "22023", "p_limit"),
        ("claim_notifications($1, $2)", ("c", 1001), "22023", "p_limit"),
        (LEASED, ("c", 1, None), "22004", "p_lease"),
        (LEASED, ("c", 1, "0 s"), "22023", "p_lease"),
        (LEASED, ("c", 1, "-1 s"), "22023", "p_lease"),
        (LEASED, ("c", 1, "25 hours"), "22023", "p_lease"),
        ("ack_notification($1, $2)", (None, "c"), "22004", "p_id"),
        ("ack_notification($1, $2)", (0, "c"), "22023", "p_id"),
        ("ack_notification($1, $2)", (1, None), "22004", "p_consumer"),
        ("ack_notification($1, $2)", (1, ""), "22023", "p_consumer"),
        ("ack_notification($1, $2)", (1, "x" * 201), "22001", "p_consumer"),
    ],
)
async def test_claim_and_ack_refuse_invalid_arguments_naming_them(
    conn: asyncpg.Connection, sql: str, args: tuple[object, ...], state: str, column: str
) -> None:
    await cross_three(conn)
    before = await conn.fetchval(
        "SELECT count(*) FROM tokentrack.notifications WHERE claimed_by IS NOT NULL"
        " OR acked_at IS NOT NULL"
    )
    with pytest.raises(asyncpg.PostgresError) as caught:
        await conn.fetchval(f"SELECT tokentrack.{sql}", *args)
    assert (caught.value.sqlstate, caught.value.column_name) == (state, column)
    assert column.removeprefix("p_") in caught.value.message
    after = await conn.fetchval(
        "SELECT count(*) FROM tokentrack.notifications WHERE claimed_by IS NOT NULL"
        " OR acked_at IS NOT NULL"
    )
    assert before == after == 0


@pytest.mark.parametrize("function", ["claim_notifications('c', 1)", "ack_notification(1, 'c')"])
async def test_claim_and_ack_run_at_read_committed_only(
    conn: asyncpg.Connection, function: str
) -> None:
    async with conn.transaction(isolation="repeatable_read"):
        with pytest.raises(asyncpg.PostgresError) as caught:
            await conn.fetchval(f"SELECT tokentrack.{function}")
    assert caught.value.sqlstate == "25000"


async def test_health_counts_pending_and_claimed_notifications(conn: asyncpg.Connection) -> None:
    empty = json.loads(await conn.fetchval("SELECT tokentrack.health()"))
    assert empty["notifications"] == {"pending": 0, "claimed": 0, "oldest_pending_age_seconds": 0}
    await cross_three(conn)
    await conn.execute(
        "UPDATE tokentrack.notifications SET created_at = now() - interval '90 seconds'"
        " WHERE threshold = 50"
    )
    await claim(conn, "c", 1, "1 hour")  # the oldest one
    figures = json.loads(await conn.fetchval("SELECT tokentrack.health()"))["notifications"]
    assert (figures["pending"], figures["claimed"]) == (2, 1)
    assert 0 <= figures["oldest_pending_age_seconds"] < 90  # the claimed one is not pending
    await conn.execute(
        "UPDATE tokentrack.notifications SET lease_until = now() WHERE threshold = 50"
    )
    figures = json.loads(await conn.fetchval("SELECT tokentrack.health()"))["notifications"]
    assert (figures["pending"], figures["claimed"]) == (3, 0)  # a lapsed lease is pending
    assert figures["oldest_pending_age_seconds"] >= 90
    for row in await conn.fetch("SELECT id FROM tokentrack.notifications"):
        await ack(conn, row["id"], "c")
    figures = json.loads(await conn.fetchval("SELECT tokentrack.health()"))["notifications"]
    assert figures == {"pending": 0, "claimed": 0, "oldest_pending_age_seconds": 0}


# --------------------------------------------------------------------------------------------
# Concurrency: 20 reports crossing the same thresholds together
# --------------------------------------------------------------------------------------------


async def reserve_at(
    start: asyncio.Event, lane: asyncpg.Connection, account: uuid.UUID
) -> uuid.UUID:
    """Reserve 50 tokens of team:a on ``lane`` once ``start`` is set."""
    await start.wait()
    report, _ = await reserve_with(lane, account, 50, ["team:a"])
    return report


async def test_twenty_concurrent_reports_crossing_together_give_exactly_one_per_crossing(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    """20 real connections reserve at once (20 x 50 of 1,000: 80 % and 100 % crossed), then
    finish at once billing 60 each (used + held 1,000 -> 1,200: 110 % and 120 %), in three
    rounds: exactly one notification per (budget, window, threshold), one NOTIFY each."""
    listener = await Listener(await connect()).start()
    lanes = [await connect() for _ in range(20)]
    totals: list[tuple[int, int, int]] = []
    for _ in range(3):
        account = await new_account(conn, MONTH_LIMIT)
        team = await budget(conn, account, "team:a", "day", 1_000, thresholds=[80, 100, 110, 120])
        start = asyncio.Event()

        tasks = [asyncio.create_task(reserve_at(start, lane, account)) for lane in lanes]
        start.set()
        reports = await asyncio.gather(*tasks)
        for report in reports:
            await step(conn, report, account, "S0", 40, 20)
        await asyncio.gather(
            *(
                call(lane, "finish_report", report, account, "complete", None)
                for lane, report in zip(lanes, reports, strict=True)
            )
        )
        rows = await conn.fetch(
            "SELECT threshold, count(*) AS n FROM tokentrack.notifications WHERE budget_id = $1"
            " GROUP BY window_start, threshold ORDER BY threshold",
            team,
        )
        assert [(r["threshold"], r["n"]) for r in rows] == [(80, 1), (100, 1), (110, 1), (120, 1)]
        used = await conn.fetchval(
            "SELECT used FROM tokentrack.budget_windows WHERE budget_id = $1", team
        )
        assert used == 1_200
        totals.append((len(reports), len(rows), sum(r["n"] for r in rows)))
    await listener.wait_for(12)
    await listener.settle()
    ids = [p["id"] for p in listener.payloads]
    assert len(ids) == len(set(ids)) == 12
    recorded = await conn.fetch("SELECT id FROM tokentrack.notifications")
    assert set(ids) == {r["id"] for r in recorded}
    print(f"20 concurrent reports x 3 rounds: (reports, crossings, notifications) = {totals}")
    await assert_reconciled(conn)
