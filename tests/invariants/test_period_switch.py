"""Reservations and increments racing several period switches of their account.

An account always has exactly one active period here (open_usage_period closes the old one
and opens the next in one transaction), so ``no_active_period`` is never the right answer.
``lock_active_period`` waits for the period being switched, sees it closed, and looks once
more; when the account's period is switched again while it waits the second time, it gives
up and the caller answers ``no_active_period`` (try_reserve_tokens refuses a reservation
that fits; increment_usage refuses usage that a legacy caller then drops).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

from invariants import check_invariants
from sqlkit import Connect, call

ROUNDS = 150


async def test_reservations_racing_repeated_period_switches_always_find_the_period(
    connect: Connect,
) -> None:
    conns = [await connect() for _ in range(6)]
    account = uuid.uuid4()
    await call(conns[0], "open_usage_period", account, 10**9, None)
    answers: Counter[str] = Counter()

    async def switch(n: int) -> None:
        await call(conns[n], "open_usage_period", account, 10**9, None)

    async def reserve(n: int) -> None:
        answer = await call(conns[n], "try_reserve_tokens", account, uuid.uuid4(), 1)
        answers["reserve: " + answer.get("error", "granted")] += 1

    async def increment() -> None:
        answer = await call(conns[5], "increment_usage", account, 1, False, False)
        answers["increment: " + answer.get("error", "ok")] += 1

    for _ in range(ROUNDS):
        await asyncio.gather(switch(0), switch(1), switch(2), reserve(3), reserve(4), increment())
    assert await check_invariants(conns[0]) == []
    active = await conns[0].fetchval(
        "SELECT count(*) FROM tokentrack.usage_periods WHERE account_id = $1 AND status = 'active'",
        account,
    )
    assert active == 1
    assert answers == Counter({"reserve: granted": 2 * ROUNDS, "increment: ok": ROUNDS})
