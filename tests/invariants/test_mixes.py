"""Invariants 1-5 and 7 (and reconcile) under random concurrent mixes, checked against the oracle.

Each hypothesis example gets its own database (cloned from the tokentrack template, about
40 ms) and runs rounds of up to five lanes at once, one asyncpg connection per lane:
reservations with tight limits (refusals are frequent), steps with retries, duplicates and
conflicting numbers, finalize and finish_report (complete, failed, cancelled) with
duplicates, increment_usage, expiry moved into the past, both sweeps, period switches,
calls with the wrong account and unknown ids. After every round the oracle (tests/support/model.py)
must find a serial order explaining every answer and the exact database state, and every
invariant must hold (tests/support/invariants.py); at the end every reservation is expired and swept
and invariants 2 and 4 must hold in full.

The budget mixes give every account several tight budgets (its month, teams' days, keys'
minutes, a user's hour, a total and a week of cost) and reserve with subjects that share them:
the opening round reserves every report at once, so that of the racing requests exactly as
many as fit are granted for every budget at once (the oracle must find one serial order that
explains every grant, every refusal and the budget that refused it); then extensions race
reservations, limits change, reservations expire and are swept, late steps are billed into the
windows their reservations were granted in, and invariant 7 is checked after every round.
They also grant credits, adjust windows and periods and refund reports (retried under their
keys, with conflicting arguments, racing billing): the oracle explains each answer and the
effective limits, used and tokens_used that follow, and the notifications table must hold
exactly the crossings of the serial order it found (invariant 9); reconcile() must be ok
after every round (invariant 8).

The examples run synchronously (``asyncio.run`` per example) with a module-scoped database
factory, so hypothesis never meets a function-scoped fixture. Profiles: tests/conftest.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from hypothesis import given

from model import AdjustUsage, BudgetKind, Finalize, GrantCredits, Op, RefundReport, Reserve
from tokentrack_client.testing import PostgresServer
from tokentrack_client.testing.pytest_plugin import TemplateDatabase
from workload import (
    BUDGET_KINDS,
    DatabaseFactory,
    Harness,
    Workload,
    budget_op,
    budget_workloads,
    database_factory,
    persist_op,
    run_workload,
    workloads,
)


@pytest.fixture(scope="module")
def example_database(
    pg_server: PostgresServer, tokentrack_template: TemplateDatabase
) -> DatabaseFactory:
    """``async with example_database() as dsn``: a fresh tokentrack database per example."""
    return database_factory(pg_server, tokentrack_template.template_dbname)


def run(example_database: DatabaseFactory, workload: Workload) -> None:
    async def example() -> None:
        async with example_database() as dsn:
            await run_workload(dsn, workload)

    asyncio.run(example())


@given(workload=workloads())
def test_random_concurrent_mixes_keep_every_invariant(
    example_database: DatabaseFactory, workload: Workload
) -> None:
    run(example_database, workload)


@given(workload=workloads(storm=True))
def test_reservation_storms_never_overcommit(
    example_database: DatabaseFactory, workload: Workload
) -> None:
    """One account, a tight limit, six lanes racing mostly reservations (invariant 3)."""
    run(example_database, workload)


@given(workload=budget_workloads())
def test_budget_mixes_keep_every_invariant(
    example_database: DatabaseFactory, workload: Workload
) -> None:
    run(example_database, workload)


@given(workload=budget_workloads(storm=True))
def test_reservation_storms_on_shared_budgets_never_overcommit_any(
    example_database: DatabaseFactory, workload: Workload
) -> None:
    """One account, several tight budgets shared by the reports' subjects, six lanes racing
    mostly reservations and extensions (invariants 3 and 7)."""
    run(example_database, workload)


def test_corrections_retried_racing_and_conflicting_are_explained(
    example_database: DatabaseFactory,
) -> None:
    """Every answer of the corrections, each raced by its own retry and by billing: grants and
    adjustments twice at once under one key (one record, one duplicate), the same keys with
    other arguments (idempotency_conflict), a refund racing its report's end and its retry, a
    second key for a refunded report (already_refunded), a correction below 0
    (negative_usage); the oracle explains every answer, the database and its notifications."""
    month: BudgetKind = (None, "tokens", "month")
    grant = GrantCredits("a0", month, 40, "grant-a")
    adjust = AdjustUsage("a0", month, 70, "adjust-a")
    refund = RefundReport("r0", "a0", "refund-r0")
    rounds: list[list[list[Op]]] = [
        [[Reserve("a0", "r0", 60, ("team:red",))], [Reserve("a0", "r1", 40, ())]],
        [[persist_op("r0", "a0", "plan", 0)], [grant], [grant], [adjust], [adjust]],
        [[Finalize("r0", "a0"), refund], [refund], [AdjustUsage("a0", None, 10, "adjust-p")]],
        [
            [replace(grant, amount=41)],
            [replace(adjust, delta=71)],
            [RefundReport("r0", "a0", "again-r0")],
            [RefundReport("r1", "a0", "refund-r0")],
            [AdjustUsage("a0", None, -100_000, "adjust-n")],
        ],
    ]

    async def example() -> None:
        async with example_database() as dsn:
            budgets = [budget_op(BUDGET_KINDS[0], "a0", 120), budget_op(BUDGET_KINDS[1], "a0", 100)]
            harness = await Harness.create(dsn, [1000], 2, 5, budgets)
            try:
                for number, lanes in enumerate(rounds):
                    violations = await harness.round(lanes)
                    assert not violations, f"round {number}: " + "\n".join(violations)
                story = harness.story()
                for expected in (
                    "'duplicate': True",
                    "idempotency_conflict",
                    "already_refunded",
                    "negative_usage",
                ):
                    assert expected in story, expected
                # The reservations and the adjustment crossed the month's 80 and 100 % (the
                # database's notifications are those of the serial order found: invariant 9).
                assert len(harness.models["a0"].notes) >= 2, harness.models["a0"].notes
                assert not await harness.settle()
            finally:
                await harness.close()

    asyncio.run(example())
