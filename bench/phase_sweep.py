"""Phase sweep: a backlog of expired reservations with steps, swept by
expire_reservations(--sweep-batch) one transaction per batch (each batch timed, commit
included: the bound of how long it held its locks); then CALL sweep_expired_reservations on
as many; then a profile (track = all) and smaller backlogs with smaller batches; then, on one
more backlog, the previous sweep side by side (--sweep-compare-batch): batches of the current
expire_reservations and of version 20261213000000's text of it (billing one reservation after
the other through finalize_reservation) taking turns, each timed with its COMMIT and measured
in WAL, so that their ratio does not depend on what else the machine runs."""

from __future__ import annotations

import json
import re
import statistics
import time
from typing import Any

import asyncpg
import measure
from server import BENCH_DIR, Session, log

DUE = (
    "SELECT count(*) FROM tokentrack.report_reservations"
    " WHERE status = 'active' AND expires_at <= now()"
)


PREVIOUS = BENCH_DIR.parent / "sql" / "history" / "20261213000000" / "expire_reservations.sql"
PREVIOUS_NAME = "bench.expire_reservations_previous"


def sweep_batch_query() -> str | None:
    """The sweep's batch SELECT as sql/functions/expire_reservations.sql has it (p_limit: $1)."""
    text = (BENCH_DIR.parent / "sql" / "functions" / "expire_reservations.sql").read_text()
    found = re.search(r"FROM \(\s*(SELECT rr\..*?FOR UPDATE)\s*\) AS due", text, re.DOTALL)
    return found.group(1).replace("p_limit", "$1") if found else None


async def seed_expired(session: Session, conn: asyncpg.Connection, first: int, last: int) -> None:
    async with conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(
            "SELECT bench.seed_expired($1, $2, $3)", first, last, session.args.sweep_steps
        )
    await conn.execute(
        "VACUUM ANALYZE tokentrack.reports, tokentrack.report_reservations,"
        " tokentrack.report_step_usage"
    )
    await session.control.execute("CHECKPOINT")


async def sweep_batches(
    session: Session, conn: asyncpg.Connection, rows: int, batch: int, *, profile: bool = False
) -> dict[str, Any]:
    """expire_reservations(batch), one transaction per batch, each timed with its COMMIT."""
    query = sweep_batch_query()
    scans = ["(batch query not found in expire_reservations.sql)"]
    if query is not None:
        scans = measure.plan_scans(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {query}", batch))
    await conn.execute("SELECT pg_stat_statements_reset()")
    if profile:  # nested statements too (it slows the batches: not for the timed runs)
        await conn.execute("SET pg_stat_statements.track = 'all'")
    batches: list[dict[str, Any]] = []
    began = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        async with conn.transaction():
            answer = json.loads(
                await conn.fetchval("SELECT tokentrack.expire_reservations($1)::text", batch)
            )
        batches.append(
            {
                "ms": (time.perf_counter() - t0) * 1000,
                "expired": answer["expired"],
                "steps": answer["steps"],
            }
        )
        if answer["expired"] < batch:
            break
    total = time.perf_counter() - began
    await conn.execute("RESET pg_stat_statements.track")
    expired = sum(b["expired"] for b in batches)
    left = await conn.fetchval(DUE)
    durations = sorted(b["ms"] for b in batches if b["expired"])
    full = [b["ms"] for b in batches if b["expired"] == batch]
    median = statistics.median(durations) if durations else 0.0
    return {
        "backlog": rows,
        "batch": batch,
        "batches": len(batches),
        "expired": expired,
        "left_due": left,
        "total_s": total,
        "rows_per_s": expired / total if total else 0.0,
        "longest_batch_ms": max(durations) if durations else 0.0,
        "median_batch_ms": median,
        "p95_batch_ms": durations[int(len(durations) * 0.95)] if durations else 0.0,
        "median_ms_per_reservation": median / batch,
        "first_batches_ms": [round(x, 1) for x in full[:5]],
        "last_full_batches_ms": [round(x, 1) for x in full[-5:]],
        "empty_batch_ms": round(batches[-1]["ms"], 1) if not batches[-1]["expired"] else None,
        "batch_scan": scans,
        "batch_ms": [round(b["ms"], 1) for b in batches],
        "pg_stat_statements": await measure.pgss_top(
            session.control, await conn.fetchval("SELECT current_database()"), 12
        ),
    }


async def side_by_side(conn: asyncpg.Connection, rows: int, batch: int) -> dict[str, Any]:
    """Batches of the current sweep and of the previous one, taking turns on one backlog (in
    the order ABBA), each in its own transaction: milliseconds (COMMIT included), WAL bytes and
    server time."""
    await conn.execute(
        PREVIOUS.read_text().replace("tokentrack.expire_reservations(", f"{PREVIOUS_NAME}(")
    )
    calls = {
        "current": "SELECT tokentrack.expire_reservations($1)::text",
        "previous": f"SELECT {PREVIOUS_NAME}($1)::text",
    }
    runs: dict[str, dict[str, list[float]]] = {
        k: {"ms": [], "wal": [], "expired": []} for k in calls
    }
    await conn.execute("SELECT pg_stat_statements_reset()")
    turn = 0
    while True:
        # current, previous, previous, current, ...: neither always comes first to the pages
        # that the batch before it left (or to the full-page images after a checkpoint).
        which = ("current", "previous", "previous", "current")[turn % 4]
        turn += 1
        before = await conn.fetchval("SELECT pg_current_wal_insert_lsn()::text")
        t0 = time.perf_counter()
        async with conn.transaction():
            answer = json.loads(await conn.fetchval(calls[which], batch))
        ms = (time.perf_counter() - t0) * 1000
        wal = await conn.fetchval(
            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1::text::pg_lsn)::float8", before
        )
        if answer["expired"] < batch:
            break  # the last, short batch is left out of both
        runs[which]["ms"].append(ms)
        runs[which]["wal"].append(float(wal))
        runs[which]["expired"].append(answer["expired"])
    server = {
        r["query"]: r["total_exec_time"]
        for r in await conn.fetch(
            "SELECT s.query, s.total_exec_time FROM pg_stat_statements AS s"
            " WHERE s.toplevel AND s.dbid = (SELECT oid FROM pg_database"
            " WHERE datname = current_database())"
        )
    }
    await conn.execute(f"DROP FUNCTION {PREVIOUS_NAME}(integer)")
    result: dict[str, Any] = {"backlog": rows, "batch": batch}
    for which, run in runs.items():
        expired = sum(run["expired"]) or 1
        median = statistics.median(run["ms"]) if run["ms"] else 0.0
        server_ms = next((v for q, v in server.items() if calls[which].split("(")[0] in q), 0.0)
        result[which] = {
            "batches": len(run["ms"]),
            "median_batch_ms": median,
            "longest_batch_ms": max(run["ms"], default=0.0),
            "median_ms_per_reservation": median / batch,
            "server_ms_per_reservation": server_ms / expired,
            "wal_bytes_per_reservation": sum(run["wal"]) / expired,
        }
    previous, current = result["previous"], result["current"]
    result["ratio_ms"] = (
        current["median_ms_per_reservation"] / previous["median_ms_per_reservation"]
        if previous["median_ms_per_reservation"]
        else 0.0
    )
    return result


async def sweep(session: Session, conn: asyncpg.Connection) -> dict[str, Any]:
    args = session.args
    rows, batch = args.sweep_rows, args.sweep_batch
    n = 0
    result: dict[str, Any] = {"steps_per_reservation": args.sweep_steps}
    log(f"sweep: seeding {rows:,} expired reservations ({args.sweep_steps} steps each)")
    await seed_expired(session, conn, n + 1, n + rows)
    n += rows
    log(f"sweep: expire_reservations({batch}) per transaction")
    result["batched"] = await sweep_batches(session, conn, rows, batch)
    log(
        f"  {result['batched']['total_s']:.1f} s, longest batch"
        f" {result['batched']['longest_batch_ms']:.0f} ms"
    )

    log(f"sweep: seeding {rows:,} more; CALL tokentrack.sweep_expired_reservations({batch})")
    await seed_expired(session, conn, n + 1, n + rows)
    n += rows
    began = time.perf_counter()
    await conn.execute(f"CALL tokentrack.sweep_expired_reservations({int(batch)})")
    total = time.perf_counter() - began
    result["procedure"] = {
        "backlog": rows,
        "batch": batch,
        "total_s": total,
        "rows_per_s": rows / total,
        "left_due": await conn.fetchval(DUE),
    }
    log(f"  {total:.1f} s")

    small_rows = args.sweep_small_rows
    if small_rows:
        log(f"sweep: profile of {small_rows // 2:,} more with track = all")
        await seed_expired(session, conn, n + 1, n + small_rows // 2)
        n += small_rows // 2
        result["profile"] = await sweep_batches(session, conn, small_rows // 2, batch, profile=True)
    result["smaller_batches"] = []
    for size in args.sweep_small_batches:
        if not small_rows:
            break
        log(f"sweep: {small_rows:,} more, expire_reservations({size}) per transaction")
        await seed_expired(session, conn, n + 1, n + small_rows)
        n += small_rows
        run = await sweep_batches(session, conn, small_rows, size)
        result["smaller_batches"].append(run)
        log(f"  {run['total_s']:.1f} s, longest batch {run['longest_batch_ms']:.0f} ms")
    compare = args.sweep_compare_batch
    if small_rows and compare:
        log(f"sweep: {small_rows:,} more, the current and the previous sweep ({compare}) in turns")
        await seed_expired(session, conn, n + 1, n + small_rows)
        n += small_rows
        result["side_by_side"] = await side_by_side(conn, small_rows, compare)
        cur, prev = result["side_by_side"]["current"], result["side_by_side"]["previous"]
        log(
            f"  {cur['median_ms_per_reservation']:.3f} against"
            f" {prev['median_ms_per_reservation']:.3f} ms per reservation"
        )
    return result
