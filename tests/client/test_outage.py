"""The server down for a while in the middle of reports: restarted after 10 s and after 25 s
(a restart, a managed failover), and down for longer than the retry deadline.

The server is one of the tests' own (``own_server``): shutting down the session's server
would fail whatever else uses it. Its fast shutdown ends every session, so the pool's idle
connections and the call in flight break together; until it is back, connecting is refused.
The tracker uses the default retry policy, whose deadline (60 s) must ride that out.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any

import asyncpg
import pytest

from client_fixtures import GatedLLM, OwnServer, cost, report_state, run_steps, wait_for_backend
from sqlkit import assert_reconciled, new_account, period
from tokentrack_client import (
    DEFAULT_RETRY,
    ConnectionLost,
    ReportTracker,
    RetryPolicy,
    TokenTracker,
)

REPORTS = {
    # in flight: its AN2 call waits on a lock when the server goes down
    "in_flight": ("AN0", "AN2", "AN5"),
    # between steps: its AN1.5 is recorded, and its exit billed, while the server is down
    "between_steps": ("AN0", "AN1.5", "AN3"),
    # started while the server is down: its reservation is the first call
    "started_during": ("AN4", "AN5"),
}


async def generate(
    tracker: TokenTracker, account: uuid.UUID, report_id: uuid.UUID, llm: GatedLLM, steps: Any
) -> ReportTracker:
    async with tracker.track_report(account, report_id, 60_000) as report:
        await run_steps(report, llm, steps)
    return report


@pytest.mark.parametrize("down_for", [10, 25])
async def test_reports_complete_billed_once_across_a_server_restart(
    own_server: OwnServer, down_for: float, caplog: pytest.LogCaptureFixture
) -> None:
    server, dsn = own_server.server, own_server.dsn
    admin = await asyncpg.connect(dsn)
    account = await new_account(admin, 1_000_000)
    pool = await asyncpg.create_pool(dsn, min_size=3, max_size=6)
    tracker = TokenTracker(pool)
    assert tracker.retry_policy == DEFAULT_RETRY
    ids = {name: uuid.uuid4() for name in REPORTS}
    llms = {name: GatedLLM() for name in REPORTS}
    llms["in_flight"].hold("AN2")
    llms["between_steps"].hold("AN1.5")
    tasks: dict[str, asyncio.Task[ReportTracker]] = {}
    try:
        with caplog.at_level(logging.WARNING, logger="tokentrack_client"):
            for name in ("in_flight", "between_steps"):
                tasks[name] = asyncio.create_task(
                    generate(tracker, account, ids[name], llms[name], REPORTS[name])
                )
            await llms["in_flight"].started("AN2").wait()  # its AN0 is recorded
            await llms["between_steps"].started("AN1.5").wait()

            blocker = await asyncpg.connect(dsn)
            await blocker.execute("BEGIN")
            await blocker.execute(
                "SELECT 1 FROM tokentrack.report_reservations WHERE report_id = $1 FOR UPDATE",
                ids["in_flight"],
            )
            llms["in_flight"].release("AN2")
            await wait_for_backend(admin, "persist_step_usage")

            await asyncio.to_thread(server.shutdown)
            down_since = time.monotonic()
            for dead in (blocker, admin):
                dead.terminate()
            llms["between_steps"].release("AN1.5")
            tasks["started_during"] = asyncio.create_task(
                generate(
                    tracker,
                    account,
                    ids["started_during"],
                    llms["started_during"],
                    REPORTS["started_during"],
                )
            )
            await asyncio.sleep(down_for)  # the outage itself: nothing to wait for
            assert not any(task.done() for task in tasks.values()), "a call outran the outage"
            await asyncio.to_thread(server.restart)
            outage = time.monotonic() - down_since
            results = await asyncio.wait_for(asyncio.gather(*tasks.values()), timeout=60)
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        await pool.close()

    assert outage >= down_for
    warnings = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    # The step held at the reservation lock dies in its transaction: during the call, or
    # during its commit when the shutdown ended the blocker's backend (releasing the lock)
    # before its own: either way it was in flight, and its retry is a duplicate-safe call.
    assert any(
        "persist_step_usage" in m and ("during call" in m or "during commit" in m) for m in warnings
    ), warnings
    assert any("try_reserve_tokens" in m for m in warnings), warnings
    assert [report.status for report in results] == ["complete"] * 3

    admin = await asyncpg.connect(dsn)
    try:
        total = 0
        for name, steps in REPORTS.items():
            state = await report_state(admin, ids[name])
            assert state["status"] == "complete"
            assert sorted(state["steps"]) == sorted(steps)
            assert all(s["billed"] and not s["late"] for s in state["steps"].values())
            assert state["reservation"]["status"] == "completed"
            assert state["reservation"]["billed_tokens"] == cost(*steps)
            assert [(e["kind"], e["tokens"]) for e in state["ledger"]] == [
                ("report_billed", cost(*steps))
            ]
            total += cost(*steps)
        row = await period(admin, account)
        assert (row["tokens_used"], row["reports_count"]) == (total, 3)
        await assert_reconciled(admin)
    finally:
        await admin.close()


async def test_a_server_down_longer_than_the_deadline_raises_connection_lost_at_it(
    own_server: OwnServer,
) -> None:
    server, dsn = own_server.server, own_server.dsn
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=2)
    tracker = TokenTracker(pool, retry=RetryPolicy(deadline=2.0))
    try:
        assert (await tracker.reconcile()).ok
        await asyncio.to_thread(server.shutdown)
        started = time.monotonic()
        with pytest.raises(ConnectionLost) as raised:
            await tracker.reconcile()
        elapsed = time.monotonic() - started
    finally:
        await asyncio.to_thread(server.restart)
        await pool.close()
    # No attempt starts after the deadline; the last one (connection refused) is quick.
    assert 2.0 <= elapsed < 3.0, elapsed
    assert raised.value.attempts >= 3
    assert raised.value.outcome_unknown is False
    assert re.search(r"attempt\(s\) in 2\.\d s", str(raised.value)), str(raised.value)
