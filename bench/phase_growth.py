"""Phase growth: each function and the queries of `tokentrack monitor` timed with a small
and a large history of reservations and steps (two databases on the same server, timed in
interleaved rounds), with the scans and the shared blocks of each call."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import asyncpg
import calls
import measure
import report
from server import Session, log

ROUNDS = 4


async def setup_growth_db(session: Session, name: str) -> asyncpg.Connection:
    log(f"setup: database {name} (tokentrack, 1,001 accounts, 1,000 live reservations)")
    return await session.create_database(name)


async def seed_history(session: Session, conn: asyncpg.Connection, first: int, last: int) -> float:
    """Seed history reports first..last in chunks. One report every (365 days / the large
    size): the last 24 hours hold the same reports whatever the history's length."""
    every = dt.timedelta(days=365) / max(session.args.growth[-1], 1)
    began = time.monotonic()
    chunk = 100_000
    for start in range(first, last + 1, chunk):
        end = min(last, start + chunk - 1)
        async with conn.transaction():
            # Consistent by construction (bench.seed_history): no per-row FK checks.
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute("SELECT bench.seed_history($1, $2, $3)", start, end, every)
        if last - first > chunk:
            log(f"  history {end:,} / {last:,}")
    await conn.execute(
        "VACUUM ANALYZE tokentrack.reports, tokentrack.report_reservations,"
        " tokentrack.report_step_usage, tokentrack.usage_ledger, tokentrack.usage_periods"
    )
    await session.control.execute("CHECKPOINT")
    return time.monotonic() - began


ADVANCE = "exporter: advance_reconcile_point()"


async def advance_point(conn: asyncpg.Connection, times: dict[str, list[float]]) -> None:
    """Two runs of advance_reconcile_point() (record the pending point, then fold through it),
    each timed; the point then is the last ledger row."""
    for _ in range(2):
        began = time.perf_counter()
        await conn.fetchval("SELECT tokentrack.advance_reconcile_point()::text")
        times.setdefault(ADVANCE, []).append(time.perf_counter() - began)


async def advance_blocks(conn: asyncpg.Connection) -> int:
    """Shared blocks of one advance_reconcile_point() over the last round's lifecycles (its
    nested statements included), in a transaction rolled back."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        raw = await conn.fetchval(
            "EXPLAIN (ANALYZE, BUFFERS, TIMING OFF, FORMAT JSON)"
            " SELECT tokentrack.advance_reconcile_point()"
        )
    finally:
        await transaction.rollback()
    top = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
    return int(top.get("Shared Hit Blocks", 0)) + int(top.get("Shared Read Blocks", 0))


async def growth(
    session: Session, small: asyncpg.Connection, large: asyncpg.Connection
) -> dict[str, Any]:
    """Both sizes side by side on the same server, timed in interleaved rounds."""
    args = session.args
    sizes: list[int] = [args.growth[0], args.growth[-1]]
    dbs = {sizes[0]: small, sizes[1]: large}
    result: dict[str, Any] = {"sizes": sizes, "rows": {}, "seed_seconds": {}}
    for size, conn in dbs.items():
        log(f"growth: seeding {size:,} history reports")
        result["seed_seconds"][str(size)] = await seed_history(session, conn, 1, size)
        row = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM tokentrack.report_reservations) AS reservations,"
            " (SELECT count(*) FROM tokentrack.report_step_usage) AS steps,"
            " (SELECT count(*) FROM tokentrack.reports) AS reports,"
            " (SELECT count(*) FROM tokentrack.usage_ledger) AS ledger"
        )
        result["rows"][str(size)] = dict(row) if row else {}
    times: dict[int, dict[str, list[float]]] = {size: {} for size in sizes}
    log(f"growth: timing as installed, {ROUNDS} interleaved rounds")
    for _ in range(ROUNDS):
        for size, conn in dbs.items():
            # The exporter's slow task: the verified point moves over what the round before
            # added (two runs settle it), so the monitor's incremental check of this round
            # reads this round's lifecycles, the same number at either size.
            await advance_point(conn, times[size])
            await calls.time_functions(
                conn, args.accounts, max(1, args.growth_iterations // ROUNDS), times[size]
            )
            await calls.time_monitoring(
                conn, max(1, args.monitoring_repeats // ROUNDS), times[size]
            )
    result["as_installed"] = {}
    for size in sizes:
        # The first advance after the seed summed the whole history once (not a steady-state
        # figure): drop it, keep the steady runs of the rounds.
        times[size][ADVANCE] = times[size][ADVANCE][2:] or times[size][ADVANCE]
        plans = await calls.plans(dbs[size], args.accounts)
        plans["blocks"][ADVANCE] = await advance_blocks(dbs[size])
        result["as_installed"][str(size)] = {
            "times": {name: measure.summary(values) for name, values in times[size].items()},
            "scans": plans["scans"],
            "blocks": plans["blocks"],
        }
    # `monitor --full`'s reconcile() audits every period: it grows with the history by design.
    result["reconcile_all_s"] = {}
    for size, conn in dbs.items():
        began = time.perf_counter()
        await conn.fetchval("SELECT tokentrack.reconcile()::text")
        result["reconcile_all_s"][str(size)] = time.perf_counter() - began
    result["summary"] = report.growth_summary(result)
    return result
