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

The examples run synchronously (``asyncio.run`` per example) with a module-scoped database
factory, so hypothesis never meets a function-scoped fixture. Profiles: tests/conftest.py.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given

from tokentrack_client.testing import PostgresServer
from tokentrack_client.testing.pytest_plugin import TemplateDatabase
from workload import (
    DatabaseFactory,
    Workload,
    budget_workloads,
    database_factory,
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
