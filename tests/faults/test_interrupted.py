"""Faults inside the functions: a backend killed, lock_timeout and statement_timeout expiring.

Each scenario makes one call block at a known point inside a function: another connection
holds a row lock that the call needs (the account's active period, the reservation, the
report, the step rows, the account row that a foreign-key check wants), most of them after
the call has already written rows (the victim holds RowExclusiveLock on the tables named in
``wrote``, which the test asserts). Then the fault:

- ``terminate``: ``pg_terminate_backend`` on the blocked backend (SQLSTATE 57P01, or 08003
  when the client notices the closed connection first);
- ``lock_timeout``: ``SET lock_timeout = '50ms'`` on the caller (55P03);
- ``statement_timeout``: ``SET statement_timeout = '100ms'`` on the caller (57014).

Afterwards nothing is half-written (every tokentrack table holds exactly the rows it held
before the call), the retried call succeeds as a first call would, and the six invariants
hold. The batched sweep commits per batch: there, exactly the first batch stays applied.
``reconcile()`` locks nothing, so it has no point to block at.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from invariants import check_invariants
from sqlkit import Connect, call, new_account, reserve, snapshot, step
from workload import call_batched_sweep

FAULTS = ("terminate", "lock_timeout", "statement_timeout")
EXPECTED_SQLSTATE = {"lock_timeout": "55P03", "statement_timeout": "57014"}


@dataclass
class Ctx:
    account: uuid.UUID
    report: uuid.UUID
    others: list[uuid.UUID] = field(default_factory=list)
    new_report: uuid.UUID = field(default_factory=uuid.uuid4)


Prepare = Callable[[asyncpg.Connection], Awaitable[Ctx]]
Victim = Callable[[asyncpg.Connection, Ctx], Awaitable[dict[str, Any]]]
Verify = Callable[[asyncpg.Connection, Ctx, dict[str, Any]], Awaitable[None]]


async def one_report(conn: asyncpg.Connection) -> Ctx:
    """An account (limit 1000), a report reserving 100 with one step of 15 tokens."""
    account = await new_account(conn, 1_000)
    report, answer = await reserve(conn, account, 100)
    assert answer["success"] is True
    assert (await step(conn, report, account, "AN0", 10, 5))["success"] is True
    return Ctx(account, report)


async def one_billed_report(conn: asyncpg.Connection) -> Ctx:
    ctx = await one_report(conn)
    assert (await call(conn, "finalize_report_usage", ctx.report, ctx.account))["success"]
    return ctx


async def two_expired_reports(conn: asyncpg.Connection) -> Ctx:
    """Two expired reservations of one period: ``others[0]`` (a 22-token step) is billed
    first by the sweep, ``report`` (a 15-token step) last. The sweep takes the
    longest-expired first and settles a batch in (period, id) order: ``others[0]`` has both
    the smaller id and the earlier expiry, so every sweep meets it first."""
    account = await new_account(conn, 1_000)
    for _ in range(2):
        assert (await reserve(conn, account, 100))[1]["success"] is True
    order = await conn.fetch(
        "SELECT report_id FROM tokentrack.report_reservations WHERE account_id = $1 ORDER BY id",
        account,
    )
    first, last = (r["report_id"] for r in order)
    await step(conn, first, account, "AN0", 20, 2)
    await step(conn, last, account, "AN0", 10, 5)
    for report, hours in ((first, 2), (last, 1)):
        await conn.execute(
            "UPDATE tokentrack.report_reservations SET created_at = now() - interval '3 hours',"
            " expires_at = now() - make_interval(hours => $2) WHERE report_id = $1",
            report,
            hours,
        )
    return Ctx(account, last, others=[first])


async def tokens_used(conn: asyncpg.Connection, account: uuid.UUID) -> int:
    return int(
        await conn.fetchval(
            "SELECT tokens_used FROM tokentrack.usage_periods"
            " WHERE account_id = $1 AND status = 'active'",
            account,
        )
    )


async def reservation_status(conn: asyncpg.Connection, report: uuid.UUID) -> str:
    return str(
        await conn.fetchval(
            "SELECT status FROM tokentrack.report_reservations WHERE report_id = $1", report
        )
    )


# Victim calls and what their retry must answer.


async def reserve_new(conn: asyncpg.Connection, ctx: Ctx) -> dict[str, Any]:
    return await call(conn, "try_reserve_tokens", ctx.account, ctx.new_report, 50)


async def verify_reserved(conn: asyncpg.Connection, ctx: Ctx, answer: dict[str, Any]) -> None:
    assert (answer["success"], answer["existing"], answer["available_tokens"]) == (True, False, 850)


async def persist_new_step(conn: asyncpg.Connection, ctx: Ctx) -> dict[str, Any]:
    return await step(conn, ctx.report, ctx.account, "AN1", 7, 3)


async def verify_step(conn: asyncpg.Connection, ctx: Ctx, answer: dict[str, Any]) -> None:
    assert (answer["success"], answer["duplicate"], answer["late"]) == (True, False, False)


async def verify_late_step(conn: asyncpg.Connection, ctx: Ctx, answer: dict[str, Any]) -> None:
    assert (answer["success"], answer["duplicate"], answer["late"]) == (True, False, True)
    assert await tokens_used(conn, ctx.account) == 15 + 10


async def finalize(conn: asyncpg.Connection, ctx: Ctx) -> dict[str, Any]:
    return await call(conn, "finalize_report_usage", ctx.report, ctx.account)


async def finish_cancelled(conn: asyncpg.Connection, ctx: Ctx) -> dict[str, Any]:
    return await call(conn, "finish_report", ctx.report, ctx.account, "cancelled", "stop")


async def verify_billed(conn: asyncpg.Connection, ctx: Ctx, answer: dict[str, Any]) -> None:
    assert (answer["success"], answer["already_finalized"], answer["billed_tokens"]) == (
        True,
        False,
        15,
    )
    assert await tokens_used(conn, ctx.account) == 15


async def increment(conn: asyncpg.Connection, ctx: Ctx) -> dict[str, Any]:
    return await call(conn, "increment_usage", ctx.account, 40, True, False)


async def verify_incremented(conn: asyncpg.Connection, ctx: Ctx, answer: dict[str, Any]) -> None:
    assert (answer["success"], answer["tokens_used"], answer["reports_count"]) == (True, 40, 1)


async def cleanup(conn: asyncpg.Connection, ctx: Ctx) -> dict[str, Any]:
    return await call(conn, "cleanup_expired_reservations")


async def verify_swept_both(conn: asyncpg.Connection, ctx: Ctx, answer: dict[str, Any]) -> None:
    assert (answer["expired"], answer["billed_tokens"]) == (2, 15 + 22)
    assert await tokens_used(conn, ctx.account) == 37


async def batched_sweep(conn: asyncpg.Connection, ctx: Ctx) -> dict[str, Any]:
    return await call_batched_sweep(conn, 1)


async def verify_swept_rest(conn: asyncpg.Connection, ctx: Ctx, answer: dict[str, Any]) -> None:
    # The first batch (ctx.others[0], 22 tokens) committed before the fault.
    assert (answer["expired"], answer["billed_tokens"]) == (1, 15)
    assert await tokens_used(conn, ctx.account) == 37


async def open_period(conn: asyncpg.Connection, ctx: Ctx) -> dict[str, Any]:
    return await call(conn, "open_usage_period", ctx.account, 500, None)


async def verify_opened(conn: asyncpg.Connection, ctx: Ctx, answer: dict[str, Any]) -> None:
    assert answer["success"] is True
    periods = await conn.fetchval(
        "SELECT count(*) FROM tokentrack.usage_periods WHERE account_id = $1", ctx.account
    )
    assert periods == 2


@dataclass(frozen=True)
class Scenario:
    name: str
    prepare: Prepare
    hold: str  # run in the holder's open transaction with $1 = the target id
    target: str  # "account", "report" or "new_report"
    victim: Victim
    wrote: tuple[str, ...]  # tables the victim has written when it blocks
    verify: Verify


PERIOD = (
    "SELECT FROM tokentrack.usage_periods WHERE account_id = $1 AND status = 'active' FOR UPDATE"
)
ACCOUNT = "SELECT FROM tokentrack.accounts WHERE id = $1 FOR UPDATE"
RESERVATION = "SELECT FROM tokentrack.report_reservations WHERE report_id = $1 FOR UPDATE"
REPORT_UPDATE = "SELECT FROM tokentrack.reports WHERE id = $1 FOR UPDATE"
REPORT_SHARE = "SELECT FROM tokentrack.reports WHERE id = $1 FOR SHARE"
STEPS = "SELECT FROM tokentrack.report_step_usage WHERE report_id = $1 FOR SHARE"

SCENARIOS = [
    Scenario(
        "reserve-at-period-lock", one_report, PERIOD, "account", reserve_new, (), verify_reserved
    ),
    Scenario(
        "reserve-after-report-insert",  # the reservation's FK check waits for the account row
        one_report,
        ACCOUNT,
        "account",
        reserve_new,
        ("reports",),
        verify_reserved,
    ),
    Scenario(
        "persist-at-reservation-share-lock",
        one_report,
        RESERVATION,
        "report",
        persist_new_step,
        (),
        verify_step,
    ),
    Scenario(
        "persist-after-step-insert",  # the step's FK check waits for the report row
        one_report,
        REPORT_UPDATE,
        "report",
        persist_new_step,
        ("report_step_usage",),
        verify_step,
    ),
    Scenario(
        "late-persist-after-billing-it",  # ledger, step and tokens_used written; report waits
        one_billed_report,
        REPORT_SHARE,
        "report",
        persist_new_step,
        ("usage_ledger", "report_step_usage", "usage_periods"),
        verify_late_step,
    ),
    Scenario(
        "finalize-after-ledger-insert",  # the steps' UPDATE waits
        one_report,
        STEPS,
        "report",
        finalize,
        ("usage_ledger",),
        verify_billed,
    ),
    Scenario(
        "finish-after-outcome-and-ledger",
        one_report,
        STEPS,
        "report",
        finish_cancelled,
        ("reports", "usage_ledger"),
        verify_billed,
    ),
    Scenario(
        "increment-after-tokens-used-update",  # the ledger row's FK check waits
        one_report,
        ACCOUNT,
        "account",
        increment,
        ("usage_periods",),
        verify_incremented,
    ),
    Scenario(
        "cleanup-after-billing-the-first-reservation",
        two_expired_reports,
        STEPS,
        "report",
        cleanup,
        ("usage_ledger", "report_step_usage", "usage_periods", "report_reservations"),
        verify_swept_both,
    ),
    Scenario(
        "batched-sweep-in-its-second-batch",
        two_expired_reports,
        STEPS,
        "report",
        batched_sweep,
        ("usage_ledger",),
        verify_swept_rest,
    ),
    Scenario(
        "open-period-at-period-lock", one_report, PERIOD, "account", open_period, (), verify_opened
    ),
]


async def wait_until_blocked(admin: asyncpg.Connection, pid: int, task: asyncio.Task[Any]) -> None:
    """Until the victim's backend waits for a lock (polled: PostgreSQL has no event for it)."""
    for _ in range(2_000):
        if task.done():
            task.result()  # raises what the victim raised
            raise AssertionError("the victim finished without blocking")
        waiting = await admin.fetchval(
            "SELECT count(*) FROM pg_locks WHERE pid = $1 AND NOT granted", pid
        )
        if waiting:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the victim never blocked")


async def written_tables(admin: asyncpg.Connection, pid: int) -> set[str]:
    rows = await admin.fetch(
        "SELECT c.relname FROM pg_locks AS l JOIN pg_class AS c ON c.oid = l.relation"
        " JOIN pg_namespace AS n ON n.oid = c.relnamespace"
        " WHERE l.pid = $1 AND l.mode = 'RowExclusiveLock' AND l.granted"
        " AND n.nspname = 'tokentrack' AND c.relkind = 'r'",
        pid,
    )
    return {r["relname"] for r in rows}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_a_fault_inside_a_function_leaves_nothing_half_written(
    connect: Connect, scenario: Scenario, fault: str
) -> None:
    admin = await connect()
    ctx = await scenario.prepare(admin)
    before = await snapshot(admin)
    first_batch: dict[str, list[str]] | None = None

    holder = await connect()
    victim = await connect()
    if fault == "lock_timeout":
        await victim.execute("SET lock_timeout = '50ms'")
    elif fault == "statement_timeout":
        await victim.execute("SET statement_timeout = '100ms'")
    pid = victim.get_server_pid()

    transaction = holder.transaction()
    await transaction.start()
    await holder.execute(scenario.hold, getattr(ctx, scenario.target))
    task = asyncio.create_task(scenario.victim(victim, ctx))
    if fault == "terminate":
        await wait_until_blocked(admin, pid, task)
        assert set(scenario.wrote) <= await written_tables(admin, pid)
        if scenario.name.startswith("batched-sweep"):
            first_batch = await snapshot(admin)  # committed by the first batch
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid) is True
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)) as caught:
            await task
        if isinstance(caught.value, asyncpg.PostgresError):
            # admin_shutdown, or the client saw the connection vanish first
            assert caught.value.sqlstate in {"57P01", "08003", "08006"}
    else:
        with pytest.raises(asyncpg.PostgresError) as raised:
            await task
        assert raised.value.sqlstate == EXPECTED_SQLSTATE[fault]
        if scenario.name.startswith("batched-sweep"):
            first_batch = await snapshot(admin)
    await transaction.rollback()

    after = await snapshot(admin)
    if first_batch is None:
        assert after == before, "the interrupted call left rows behind"
    else:
        # The first batch committed (one reservation expired and billed), nothing more.
        assert after == first_batch
        assert await reservation_status(admin, ctx.others[0]) == "expired"
        assert await reservation_status(admin, ctx.report) == "active"
        assert await tokens_used(admin, ctx.account) == 22
    assert await check_invariants(admin) == []

    retry = await connect()
    answer = await scenario.victim(retry, ctx)
    await scenario.verify(retry, ctx, answer)
    assert await check_invariants(admin) == []
