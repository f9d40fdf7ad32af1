"""The oracle itself (tests/support/model.py, no database): it explains legal histories and rejects
the illegal ones the property tests rely on it to catch."""

from __future__ import annotations

from typing import Any

from model import (
    AccountModel,
    Call,
    Expire,
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
