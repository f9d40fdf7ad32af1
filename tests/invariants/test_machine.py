"""A hypothesis RuleBasedStateMachine that checks the database against the oracle step by step.

Each rule is one concurrent round (several lanes at once, one asyncpg connection per lane),
a batch of new reports reserved in a race (through try_reserve_tokens, or reserve with
subjects and cost estimates), extensions racing new reservations, a budget's limit changed
while reservations race it, a round of the budget mix, steps of one report racing its end, or
a full settlement (every reservation expired, then one of the sweeps). The accounts start with
random budgets (their month, teams' days, keys' minutes, ...; tests/support/workload.py).
After every rule the oracle (tests/support/model.py) must explain every answer and the exact
database state, and ``invariants_hold`` checks the invariants (7 included); teardown settles
everything and checks invariants 2 and 4 in full. Hypothesis shrinks a failure to the
shortest sequence of rules that still breaks it.

The machine keeps one event loop (``asyncio.Runner``) for its whole run, so its connections
live across rules; each run gets a fresh database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar, TypeVar

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from model import Extend, Finalize, Finish, Op, Reserve
from tokentrack_client.testing import PostgresServer
from tokentrack_client.testing.pytest_plugin import TemplateDatabase
from workload import (
    BUDGET_KINDS,
    ESTIMATES,
    EXTRAS,
    LATE_BUDGET,
    LIMITS,
    STEP_NAMES,
    DatabaseFactory,
    Harness,
    budget_op,
    budget_operations,
    budget_sets,
    database_factory,
    lanes_of,
    persist_op,
    reserve_ops,
)

T = TypeVar("T")
LANES = 5


class TokenTrackMachine(RuleBasedStateMachine):
    make_database: ClassVar[DatabaseFactory]

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.database: AbstractAsyncContextManager[str] | None = None
        self.harness: Harness | None = None
        self.clean = True  # False while a rule runs: teardown checks only after clean rules

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coroutine)

    def expect_no_violations(self, violations: list[str]) -> None:
        assert self.harness is not None
        assert not violations, "\n".join(violations) + "\nhistory:\n" + self.harness.story()

    @initialize(limits=st.lists(st.sampled_from(LIMITS), min_size=1, max_size=3), data=st.data())
    def open_accounts(self, limits: list[int], data: st.DataObject) -> None:
        self.database = self.make_database()
        dsn = self.run(self.database.__aenter__())
        budgets = data.draw(budget_sets(len(limits)))
        self.harness = self.run(Harness.create(dsn, limits, 0, LANES, budgets))

    @rule(estimates=st.lists(st.sampled_from(ESTIMATES), min_size=1, max_size=6))
    def reserve_new_reports(self, estimates: list[int]) -> None:
        assert self.harness is not None
        self.clean = False
        labels = self.harness.add_reports(len(estimates))
        lanes: list[list[Any]] = [[] for _ in range(min(LANES, len(labels)))]
        for n, (label, estimate) in enumerate(zip(labels, estimates, strict=True)):
            owner = self.harness.world.owners[label]
            lanes[n % len(lanes)].append(Reserve(owner, label, estimate))
        self.expect_no_violations(self.run(self.harness.round(lanes, check=False)))
        self.clean = True

    @rule(count=st.integers(1, 6), data=st.data())
    def reserve_new_reports_with_subjects(self, count: int, data: st.DataObject) -> None:
        """New reports reserved at once, with subjects that share budgets and cost estimates."""
        assert self.harness is not None
        self.clean = False
        labels = self.harness.add_reports(count)
        lanes: list[list[Any]] = [[] for _ in range(min(LANES, len(labels)))]
        for n, label in enumerate(labels):
            owner = self.harness.world.owners[label]
            lanes[n % len(lanes)].append(data.draw(reserve_ops(owner, label)))
        self.expect_no_violations(self.run(self.harness.round(lanes, check=False)))
        self.clean = True

    @rule(
        extensions=st.lists(
            st.tuples(st.integers(0, 20), st.sampled_from(EXTRAS)), min_size=1, max_size=4
        ),
        data=st.data(),
    )
    def extensions_racing_reservations(
        self, extensions: list[tuple[int, int]], data: st.DataObject
    ) -> None:
        """Running reports extended while new reports reserve on the same budgets."""
        assert self.harness is not None
        if self.harness.reports == 0:
            self.harness.add_reports(2)
        self.clean = False
        lanes: list[list[Op]] = []
        for report, tokens in extensions:
            label = f"r{report % self.harness.reports}"
            lanes.append([Extend(label, self.harness.world.owners[label], tokens)])
        for label in self.harness.add_reports(LANES - len(lanes)):
            lanes.append([data.draw(reserve_ops(self.harness.world.owners[label], label))])
        self.expect_no_violations(self.run(self.harness.round(lanes, check=False)))
        self.clean = True

    @rule(
        kind=st.sampled_from((*BUDGET_KINDS, LATE_BUDGET)),
        account=st.integers(0, 2),
        scale=st.sampled_from((0, 1, 2, 10)),
        data=st.data(),
    )
    def set_budget_while_reservations_race(
        self, kind: Any, account: int, scale: int, data: st.DataObject
    ) -> None:
        """A budget created, raised, lowered or closed (limit 0) while new reports reserve."""
        assert self.harness is not None
        self.clean = False
        owner = f"a{account % self.harness.accounts}"
        lanes: list[list[Op]] = [[budget_op(kind, owner, scale * kind[4][0])]]
        for label in self.harness.add_reports(3):
            lanes.append([data.draw(reserve_ops(self.harness.world.owners[label], label))])
        self.expect_no_violations(self.run(self.harness.round(lanes, check=False)))
        self.clean = True

    @rule(data=st.data())
    def budget_round(self, data: st.DataObject) -> None:
        """A round of the budget mix: reservations with subjects, extensions, steps, endings,
        expiry, sweeps, limit changes."""
        assert self.harness is not None
        if self.harness.reports == 0:
            self.harness.add_reports(2)
        self.clean = False
        op = budget_operations(self.harness.accounts, self.harness.reports)
        lanes = data.draw(
            st.lists(st.lists(op, min_size=1, max_size=3), min_size=1, max_size=LANES)
        )
        self.expect_no_violations(self.run(self.harness.round(lanes, check=False)))
        self.clean = True

    @rule(data=st.data())
    def concurrent_round(self, data: st.DataObject) -> None:
        assert self.harness is not None
        if self.harness.reports == 0:
            self.harness.add_reports(2)
        self.clean = False
        lanes = data.draw(lanes_of(self.harness.accounts, self.harness.reports, lanes=LANES))
        self.expect_no_violations(self.run(self.harness.round(lanes, check=False)))
        self.clean = True

    @rule(
        report=st.integers(0, 20),
        ending=st.sampled_from(("finalize", "complete", "failed", "cancelled")),
        steps=st.lists(st.sampled_from(STEP_NAMES), min_size=1, max_size=4),
    )
    def steps_racing_the_end(self, report: int, ending: str, steps: list[str]) -> None:
        """Steps of one report recorded while the report is being ended (a cancel button):
        each is billed with the report or late, never lost, never twice."""
        assert self.harness is not None
        if self.harness.reports == 0:
            self.harness.add_reports(2)
        label = f"r{report % self.harness.reports}"
        owner = self.harness.world.owners[label]
        end: Op = Finalize(label, owner) if ending == "finalize" else Finish(label, owner, ending)
        lanes: list[list[Op]] = [[persist_op(label, owner, name, 0)] for name in steps]
        lanes.insert(len(lanes) // 2, [end])
        self.clean = False
        self.expect_no_violations(self.run(self.harness.round(lanes[:LANES], check=False)))
        self.clean = True

    @rule(batch=st.sampled_from((None, 1, 2)))
    def settle_everything(self, batch: int | None) -> None:
        assert self.harness is not None
        self.clean = False
        self.expect_no_violations(self.run(self.harness.settle(batch)))
        self.clean = True

    @invariant()
    def invariants_hold(self) -> None:
        if self.harness is not None:
            self.expect_no_violations(self.run(self.harness.invariants()))

    def teardown(self) -> None:
        try:
            if self.harness is not None and self.clean:
                self.expect_no_violations(self.run(self.harness.settle(None)))
        finally:
            if self.harness is not None:
                self.run(self.harness.close())
            if self.database is not None:
                self.run(self.database.__aexit__(None, None, None))
            self.runner.close()


@pytest.fixture(scope="module")
def example_database(
    pg_server: PostgresServer, tokentrack_template: TemplateDatabase
) -> DatabaseFactory:
    return database_factory(pg_server, tokentrack_template.template_dbname)


def test_state_machine_matches_the_oracle_step_by_step(example_database: DatabaseFactory) -> None:
    TokenTrackMachine.make_database = staticmethod(example_database)
    run_state_machine_as_test(TokenTrackMachine)
