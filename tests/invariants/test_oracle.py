"""The oracle itself (tests/support/model.py, no database): it explains legal histories and rejects
the illegal ones the property tests rely on it to catch."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from model import (
    AccountModel,
    BudgetM,
    Call,
    Expire,
    Extend,
    Finalize,
    PeriodM,
    Persist,
    Reserve,
    Sweep,
    World,
    check_round,
    explore,
)

WORLD = World(accounts=frozenset({"a0"}), owners={"r0": "a0", "r1": "a0", "r2": "a0"})


def account(limit: int = 100) -> AccountModel:
    return AccountModel("a0", True, [PeriodM("p0", limit)])


def grant(rid: str, reserved: int, available: int) -> dict[str, Any]:
    return {
        "success": True,
        "existing": False,
        "reservation_id": rid,
        "reserved_tokens": reserved,
        "available_tokens": available,
        "period_id": "p0",
        "budgets": [],
    }


def step_answer(sid: str, total: int, late: bool = False) -> dict[str, Any]:
    return {
        "success": True,
        "step_id": sid,
        "total_tokens": total,
        "duplicate": False,
        "late": late,
    }


def settled(billed: int, steps: int, used: int, already: bool = False) -> dict[str, Any]:
    return {
        "success": True,
        "already_finalized": already,
        "reservation_status": "completed",
        "billed_tokens": billed,
        "steps": steps,
        "tokens_used": used,
        "tokens_limit": 100,
    }


def reserved_state(*reservations: tuple[str, str, int]) -> AccountModel:
    """An account whose reports hold these (report, reservation id, tokens) reservations."""
    state = account()
    for report, rid, tokens in reservations:
        available = state.period("p0").limit - state.held() - tokens
        assert state.apply(
            WORLD, Call(Reserve("a0", report, tokens), grant(rid, tokens, available))
        )
    return state


def test_racing_grants_in_some_serial_order_are_explained() -> None:
    lanes = [
        [Call(Reserve("a0", "r0", 60), grant("x0", 60, 0), 0, 0)],
        [Call(Reserve("a0", "r1", 40), grant("x1", 40, 60), 1, 1)],
    ]
    leaves = explore(WORLD, account(), lanes)
    assert len(leaves) == 1  # r1 first (60 left after it), then r0 (0 left)


def test_two_grants_that_overcommit_together_are_rejected() -> None:
    # Each fits alone, both answered as if alone: no serial order gives both answers.
    lanes = [
        [Call(Reserve("a0", "r0", 60), grant("x0", 60, 40), 0, 0)],
        [Call(Reserve("a0", "r1", 60), grant("x1", 60, 40), 1, 1)],
    ]
    assert explore(WORLD, account(), lanes) == []


def test_a_grant_beyond_the_limit_is_rejected() -> None:
    lanes = [[Call(Reserve("a0", "r0", 120), grant("x0", 120, -20), 0, 0)]]
    assert explore(WORLD, account(), lanes) == []


def test_a_step_billed_twice_is_rejected() -> None:
    state = reserved_state(("r0", "x0", 50))
    lanes = [
        [
            Call(Persist("r0", "a0", "s", 3, 4), step_answer("s0", 7), 0, 0),
            Call(Finalize("r0", "a0"), settled(7, 1, 7), 0, 1),
            # A finalize that bills the same step again cannot be explained.
            Call(Finalize("r0", "a0"), settled(7, 1, 14), 0, 2),
        ]
    ]
    assert explore(WORLD, state, lanes) == []


def test_a_step_lost_behind_finalize_is_rejected_by_the_state() -> None:
    state = reserved_state(("r0", "x0", 50))
    lanes = [
        [Call(Finalize("r0", "a0"), settled(0, 0, 0), 0, 0)],
        # Recorded as if the reservation were still active (not late), after a finalize.
        [Call(Persist("r0", "a0", "s", 3, 4), step_answer("s0", 7, late=False), 1, 1)],
    ]
    leaves = explore(WORLD, state, lanes)
    # Only the order "step, then finalize" explains the step's answer, and in that order
    # finalize would have billed 7, not 0.
    assert leaves == []


def test_the_state_must_match_the_database() -> None:
    state = reserved_state(("r0", "x0", 50))
    lanes = [[Call(Persist("r0", "a0", "s", 3, 4), step_answer("s0", 7), 0, 0)]]
    leaves = explore(WORLD, state, lanes)
    assert len(leaves) == 1
    db = leaves[0].state.clone()
    db.reports["r0"].steps["s"].total = 8  # the database holds other numbers
    _, violations = check_round(WORLD, {"a0": state}, lanes, {"a0": db})
    assert violations
    assert "not the database" in violations[0]
    _, violations = check_round(WORLD, {"a0": state}, lanes, {"a0": leaves[0].state})
    assert violations == []


def test_sweep_totals_must_add_up() -> None:
    state = reserved_state(("r0", "x0", 50), ("r1", "x1", 10))
    lanes = [
        [
            Call(Persist("r0", "a0", "s", 3, 4), step_answer("s0", 7), 0, 0),
            Call(Expire("r0"), {"updated": 1}, 0, 1),
            Call(Sweep(), {"success": True, "expired": 1, "billed_tokens": 7, "steps": 1}, 0, 2),
        ]
    ]
    leaves = explore(WORLD, state, lanes)
    assert len(leaves) == 1
    end = leaves[0].state
    assert end.reports["r0"].reservation is not None
    assert end.reports["r0"].reservation.status == "expired"
    assert end.period("p0").used == 7
    _, ok = check_round(WORLD, {"a0": state}, lanes, {"a0": end})
    assert ok == []
    wrong = [
        [*lanes[0][:2], Call(Sweep(), {"success": True, "expired": 1, "billed_tokens": 9}, 0, 2)]
    ]
    _, violations = check_round(WORLD, {"a0": state}, wrong, {"a0": end})
    assert violations
    assert "sweeps' answers" in violations[0]


def test_a_sweep_racing_a_finalize_may_find_it_billed() -> None:
    state = reserved_state(("r0", "x0", 50))
    assert state.apply(WORLD, Call(Expire("r0"), {"updated": 1}))
    lanes = [
        [Call(Sweep(), {"success": True, "expired": 0, "billed_tokens": 0, "steps": 0}, 0, 0)],
        [Call(Finalize("r0", "a0"), settled(0, 0, 0), 1, 1)],
    ]
    leaves = explore(WORLD, state, lanes)
    assert [leaf.state.reports["r0"].reservation.status for leaf in leaves] == ["completed"]  # type: ignore[union-attr]


# -- budgets ----------------------------------------------------------------------------------

T0 = datetime(2026, 12, 1, 12, 0, 10, tzinfo=UTC)
AT = (T0, T0 + timedelta(milliseconds=80))
MONTH, MINUTE = datetime(2026, 12, 1, tzinfo=UTC), datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def budgeted() -> AccountModel:
    """Period 1000; the account's month of 100 tokens (b1) and key:k's minute of 50 (b2)."""
    state = account(1000)
    state.budgets[(None, "tokens", "month")] = BudgetM("b1", None, "tokens", "month", 100)
    state.budgets[("key:k", "tokens", "minute")] = BudgetM("b2", "key:k", "tokens", "minute", 50)
    return state


def entry(budget: str, start: datetime, held: int, available: int) -> dict[str, Any]:
    subject, window = (None, "month") if budget == "b1" else ("key:k", "minute")
    return {
        "budget_id": budget,
        "subject": subject,
        "window": window,
        "unit": "tokens",
        "window_start": start.isoformat(),
        "held": held,
        "available": available,
    }


def budget_grant(rid: str, reserved: int, left: int, b1: int, b2: int | None) -> dict[str, Any]:
    """A grant whose windows have b1 / b2 available after it (b2 None: key:k not applying)."""
    entries = [entry("b1", MONTH, reserved, b1)]
    if b2 is not None:
        entries.append(entry("b2", MINUTE, reserved, b2))
    return {**grant(rid, reserved, left), "budgets": entries}


def refused_by(budget: str, start: datetime, available: int, requested: int) -> dict[str, Any]:
    subject, window = (None, "month") if budget == "b1" else ("key:k", "minute")
    return {
        "success": False,
        "error": "insufficient_budget",
        "budget_id": budget,
        "subject": subject,
        "window": window,
        "unit": "tokens",
        "window_start": start.isoformat(),
        "available": available,
        "requested": requested,
    }


def key_reserve(report: str, tokens: int) -> Reserve:
    return Reserve("a0", report, tokens, ("key:k",))


def test_grants_that_fit_the_month_but_overcommit_a_shared_minute_are_rejected() -> None:
    ok = [
        [Call(key_reserve("r0", 30), budget_grant("x0", 30, 970, 70, 20), 0, 0, at=AT)],
        [Call(key_reserve("r1", 20), budget_grant("x1", 20, 950, 50, 0), 1, 1, at=AT)],
    ]
    assert len(explore(WORLD, budgeted(), ok)) == 1
    both = [
        [Call(key_reserve("r0", 30), budget_grant("x0", 30, 970, 70, 20), 0, 0, at=AT)],
        [Call(key_reserve("r1", 30), budget_grant("x1", 30, 940, 40, -10), 1, 1, at=AT)],
    ]
    assert explore(WORLD, budgeted(), both) == []


def test_a_refusal_names_the_first_budget_in_id_order_that_cannot_hold_it() -> None:
    state = budgeted()
    assert state.apply(
        WORLD, Call(key_reserve("r0", 45), budget_grant("x0", 45, 955, 55, 5), at=AT)
    )
    # 60 fits neither the month (55 left) nor the minute (5 left): b1 comes first.
    first = Call(key_reserve("r1", 60), refused_by("b1", MONTH, 55, 60), at=AT)
    assert state.clone().apply(WORLD, first)
    second = Call(key_reserve("r1", 60), refused_by("b2", MINUTE, 5, 60), at=AT)
    assert not state.clone().apply(WORLD, second)
    # Without the key, only the month applies and 50 fits it.
    plain = Call(Reserve("a0", "r1", 50, ()), budget_grant("x1", 50, 905, 5, None), at=AT)
    assert state.clone().apply(WORLD, plain)


def test_a_window_outside_the_calls_clock_interval_is_rejected() -> None:
    later = MINUTE + timedelta(minutes=1)
    answer = budget_grant("x0", 30, 970, 70, 20)
    answer["budgets"][1]["window_start"] = later.isoformat()
    assert not budgeted().apply(WORLD, Call(key_reserve("r0", 30), answer, at=AT))
    # The same answer from a call whose round spans the turn of the minute is possible.
    turn = (T0 + timedelta(seconds=49), T0 + timedelta(seconds=51))
    assert budgeted().apply(WORLD, Call(key_reserve("r0", 30), answer, at=turn))


def test_billing_goes_into_the_windows_the_reservation_holds() -> None:
    state = budgeted()
    assert state.apply(
        WORLD, Call(key_reserve("r0", 30), budget_grant("x0", 30, 970, 70, 20), at=AT)
    )
    assert state.apply(WORLD, Call(Persist("r0", "a0", "s", 20, 10), step_answer("s0", 30)))
    assert state.windows == {("b1", MONTH): 0, ("b2", MINUTE): 0}
    assert state.apply(
        WORLD, Call(Finalize("r0", "a0"), {**settled(30, 1, 30), "tokens_limit": 1000})
    )
    assert state.windows == {("b1", MONTH): 30, ("b2", MINUTE): 30}
    late = {**step_answer("s1", 5, late=True), "over_reservation": True, "over_by": 5}
    late.update(reserved_tokens=30, recorded_tokens=35)
    assert state.apply(WORLD, Call(Persist("r0", "a0", "t", 5, 0), late))
    assert state.windows == {("b1", MONTH): 35, ("b2", MINUTE): 35}


def test_an_extension_past_a_held_window_is_refused_by_it() -> None:
    state = budgeted()
    assert state.apply(
        WORLD, Call(key_reserve("r0", 30), budget_grant("x0", 30, 970, 70, 20), at=AT)
    )
    extend = Extend("r0", "a0", 25)
    granted = {
        "success": True,
        "reservation_id": "x0",
        "reserved_tokens": 55,
        "reserved_cost_micros": None,
        "available_tokens": 945,
        "period_id": "p0",
        "budgets": [entry("b1", MONTH, 55, 45), entry("b2", MINUTE, 55, -5)],
    }
    assert not state.clone().apply(WORLD, Call(extend, granted))
    assert state.clone().apply(WORLD, Call(extend, refused_by("b2", MINUTE, 20, 25)))


def test_a_step_past_the_reservation_must_say_so() -> None:
    state = budgeted()
    assert state.apply(
        WORLD, Call(key_reserve("r0", 10), budget_grant("x0", 10, 990, 90, 40), at=AT)
    )
    silent = Call(Persist("r0", "a0", "s", 8, 4), step_answer("s0", 12))
    assert not state.clone().apply(WORLD, silent)
    flagged = {**step_answer("s0", 12), "over_reservation": True, "over_by": 2}
    flagged.update(reserved_tokens=10, recorded_tokens=12)
    assert state.clone().apply(WORLD, Call(Persist("r0", "a0", "s", 8, 4), flagged))
