"""The expiry sweep racing itself, finalize, finish_report, late steps and new reservations.

Two accounts hold 24 reservations with steps, most of them moved past their expiry. Then,
all at once on separate connections: three ``cleanup_expired_reservations()``, three
``CALL sweep_expired_reservations(n)`` with small batches, two lanes finalizing or finishing
the same reports, a lane recording new steps into them (recorded unbilled or billed late,
depending on who wins), and a lane taking new reservations on the same accounts (the period
locks that the sweep takes). Nothing may raise (no deadlock), every reservation settled in
the race was settled by exactly one of them (the sweeps' totals plus the finalizes that
billed add up to what the reservations say they billed), and after the last sweep every
invariant holds. Repeated with several seeds (the order of each lane's work).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import asyncpg
import pytest

from invariants import check_invariants, install_grant_probe
from sqlkit import Connect, call, expire, new_account, reserve, step
from workload import call_batched_sweep

REPORTS = 24


@pytest.mark.parametrize("seed", range(4))
async def test_sweeps_race_each_other_finalize_and_late_steps(connect: Connect, seed: int) -> None:
    rng = random.Random(seed)
    setup = await connect()
    await install_grant_probe(setup)
    accounts = [await new_account(setup, 10**6) for _ in range(2)]
    owner: dict[uuid.UUID, uuid.UUID] = {}
    grants: list[dict[str, Any]] = []
    for n in range(REPORTS):
        account = accounts[n % 2]
        report, answer = await reserve(setup, account, 500)
        assert answer["success"] is True
        grants.append(answer)
        owner[report] = account
        for s in range(rng.randint(0, 3)):
            assert (await step(setup, report, account, f"S{s}", rng.randint(0, 50), 3))["success"]
        if rng.random() < 0.8:
            await expire(setup, report)
    reports = list(owner)

    async def finalizer(conn: asyncpg.Connection, mine: list[uuid.UUID]) -> list[dict[str, Any]]:
        answers = []
        for report in mine:
            if rng.random() < 0.5:
                answers.append(await call(conn, "finalize_report_usage", report, owner[report]))
            else:
                status = rng.choice(("complete", "failed", "cancelled"))
                answers.append(await call(conn, "finish_report", report, owner[report], status))
        return answers

    async def late_steps(conn: asyncpg.Connection) -> list[dict[str, Any]]:
        answers = []
        for report in rng.sample(reports, 10):
            answers.append(await step(conn, report, owner[report], "LATE", 4, 4))
        return answers

    async def reserver(conn: asyncpg.Connection) -> list[dict[str, Any]]:
        answers = []
        for n in range(8):
            answer = await call(conn, "try_reserve_tokens", accounts[n % 2], uuid.uuid4(), 100)
            assert answer["success"] is True
            answers.append(answer)
        return answers

    conns = [await connect() for _ in range(10)]
    sweeps = [call(c, "cleanup_expired_reservations") for c in conns[:3]]
    batched = [call_batched_sweep(c, rng.randint(1, 5)) for c in conns[3:6]]
    shuffled = rng.sample(reports, len(reports))
    results = await asyncio.gather(
        *sweeps,
        *batched,
        finalizer(conns[6], shuffled[: REPORTS // 2]),
        finalizer(conns[7], shuffled[REPORTS // 4 :]),
        late_steps(conns[8]),
        reserver(conns[9]),
    )
    sweep_answers = results[:6]
    ends = results[6] + results[7]
    # Two lanes may end one report with different outcomes: the second is refused.
    assert {a["error"] for a in ends if not a["success"]} <= {"report_finalized"}
    finalized = [a for a in ends if a["success"] and not a["already_finalized"]]
    grants += results[9]

    settled = await setup.fetch(
        "SELECT report_id, billed_tokens FROM tokentrack.report_reservations"
        " WHERE report_id = ANY($1) AND status <> 'active'",
        reports,
    )
    # Each reservation settled in the race was settled once: by one sweep or one finalize.
    assert sum(a["expired"] for a in sweep_answers) + len(finalized) == len(settled)
    assert sum(a["billed_tokens"] for a in sweep_answers) + sum(
        a["billed_tokens"] for a in finalized
    ) == sum(r["billed_tokens"] for r in settled)
    for answer in results[8]:
        assert (answer["success"], answer["duplicate"]) == (True, False)
    assert await check_invariants(setup, grants=grants) == []

    # Settle the rest; then every invariant holds in full.
    for report in reports:
        await expire(setup, report)
    await setup.execute(
        "UPDATE tokentrack.report_reservations SET created_at = now() - interval '3 hours',"
        " expires_at = now() - interval '1 hour' WHERE status = 'active'"
    )
    await call(setup, "cleanup_expired_reservations")
    assert await check_invariants(setup, settled=True, swept=True, grants=grants) == []
