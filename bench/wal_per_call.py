"""WAL per call of the write path, from one quiet client (issue #16).

Starts its own PostgreSQL (tokentrack_client.testing.PostgresServer, durable settings as the
bench's), installs tokentrack twice in it: database ``head`` (this tree's SQL) and database
``before`` (installed, then rolled back by the migrator to --before, 20261213000000 by
default: the SQL of before the write-path version), and in each runs, one call at a time:

  reserve   try_reserve_tokens for --reports new reports (spread over --accounts accounts)
  persist   7 persist_step_usage calls for each of those reports
  finalize  finalize_report_usage of each report (7 steps each)
  lifecycle try_reserve_tokens, 7 record_step, finish_report, for --reports new reports

Each phase starts after a CHECKPOINT; its WAL is pg_current_wal_lsn() after minus before,
divided by the calls, and pg_waldump --stats=record over the same range splits off the
full-page images (FPI, the first change of each page after the checkpoint) and names the
biggest record kinds. Load on the machine does not change these figures.

    .venv/bin/python bench/wal_per_call.py [--reports 300] [--accounts 50] [--waldump-top 8]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from tokentrack_client import migrate
from tokentrack_client.testing import DURABLE_SETTINGS, PostgresServer

STEPS = ["AN0", "AN1.5", "AN1.7", "AN2", "AN3", "AN4", "AN5"]
LIMIT = 10**15


SEED = """
WITH r AS (
    INSERT INTO tokentrack.reports (id, account_id, status)
    SELECT gen_random_uuid(), ('00000000-0000-0000-0000-' || lpad((n % $2)::text, 12, '0'))::uuid,
        'processing'
    FROM generate_series(1, $1) AS n
    RETURNING id, account_id
), rr AS (
    INSERT INTO tokentrack.report_reservations (report_id, account_id, period_id, reserved_tokens,
        expires_at)
    SELECT r.id, r.account_id, p.id, 1, now() + interval '30 days'
    FROM r INNER JOIN tokentrack.usage_periods AS p ON p.account_id = r.account_id
    WHERE p.status = 'active'
    RETURNING report_id, account_id
)
INSERT INTO tokentrack.report_step_usage (report_id, account_id, step_name, input_tokens,
    output_tokens, total_tokens)
SELECT rr.report_id, rr.account_id, 'S' || k, 1, 1, 2 FROM rr, generate_series(1, 7) AS k
"""


# Updates and HOT updates per table (read after the backend, idle for a second, has flushed
# its statistics).
HOT = """
SELECT relname, n_tup_upd AS upd, n_tup_hot_upd AS hot
FROM pg_stat_user_tables WHERE schemaname = 'tokentrack'
"""


def account(n: int) -> uuid.UUID:
    return uuid.UUID(f"00000000-0000-0000-0000-{n:012d}")


def waldump_stats(server: PostgresServer, datadir: Path, start: str, end: str) -> dict[str, Any]:
    """pg_waldump --stats=record over [start, end): total bytes, FPI bytes, top records (the
    per-record lines; the Total line, formatted differently, is their sum)."""
    out = subprocess.run(
        [
            server.bin("pg_waldump"),
            "--stats=record",
            "-p",
            str(datadir / "pg_wal"),
            "-s",
            start,
            "-e",
            end,
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    records: list[tuple[str, int, int, int]] = []
    total = fpi = 0
    for line in out.splitlines():
        # name  N (pct)  record-size (pct)  FPI-size (pct)  combined (pct)
        m = re.match(
            r"^(\S.*?)\s+(\d+)\s+[(\[]\s*[\d.]+[)\]]\s+(\d+)\s+[(\[]\s*[\d.]+%?[)\]]\s+(\d+)\s+[(\[]\s*[\d.]+%?[)\]]"
            r"\s+(\d+)\s+[(\[]",
            line,
        )
        if not m:
            continue
        name, count, rec, fp = m.group(1).strip(), int(m.group(2)), int(m.group(3)), int(m.group(4))
        records.append((name, count, rec, fp))
        total, fpi = total + rec + fp, fpi + fp
    records.sort(key=lambda r: -(r[2] + r[3]))
    return {"total": total, "fpi": fpi, "records": records}


async def measure(
    server: PostgresServer,
    conn: asyncpg.Connection,
    datadir: Path,
    calls: int,
    body: Callable[[], Awaitable[None]],
) -> dict[str, Any]:
    await conn.execute("CHECKPOINT")
    start = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
    await asyncio.sleep(1.5)
    before = await conn.fetch(HOT)
    await body()
    await asyncio.sleep(1.5)
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    after = {r["relname"]: r for r in await conn.fetch(HOT)}
    hot = {
        r["relname"]: (
            after[r["relname"]]["upd"] - r["upd"],
            after[r["relname"]]["hot"] - r["hot"],
        )
        for r in before
        if after[r["relname"]]["upd"] > r["upd"]
    }
    end = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
    lsn_bytes = await conn.fetchval(
        "SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)", end, start
    )
    await conn.execute("SELECT pg_switch_wal()")  # pg_waldump reads complete segments safely
    stats = waldump_stats(server, datadir, start, end)
    return {"calls": calls, "per_call": float(lsn_bytes) / calls, "hot": hot, **stats}


async def run_database(
    server: PostgresServer, dsn: str, args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    datadir = Path(await conn.fetchval("SHOW data_directory"))
    for n in range(args.accounts):
        await conn.execute("SELECT tokentrack.open_usage_period($1, $2)", account(n), LIMIT)
    # History: --seed reports of 7 unbilled steps each under long-lived reservations, so the
    # indexes are as big as a live database's and a random key lands on a page of its own.
    await conn.execute(SEED, args.seed, args.accounts)
    await conn.execute("VACUUM ANALYZE")
    reports = [(uuid.uuid4(), account(i % args.accounts)) for i in range(args.reports)]
    results: dict[str, dict[str, Any]] = {}

    async def reserve() -> None:
        for report, acct in reports:
            await conn.execute("SELECT tokentrack.try_reserve_tokens($1, $2, 100000)", acct, report)

    async def persist() -> None:
        for report, acct in reports:
            for name in STEPS:
                await conn.execute(
                    "SELECT tokentrack.persist_step_usage($1, $2, $3, 1200, 300, 1500, NULL)",
                    report,
                    acct,
                    name,
                )

    async def finalize() -> None:
        for report, acct in reports:
            await conn.execute("SELECT tokentrack.finalize_report_usage($1, $2)", report, acct)

    async def lifecycle() -> None:
        for i in range(args.reports):
            report, acct = uuid.uuid4(), account(i % args.accounts)
            await conn.execute("SELECT tokentrack.try_reserve_tokens($1, $2, 100000)", acct, report)
            for name in STEPS:
                await conn.execute(
                    "SELECT tokentrack.record_step($1, $2, $3, $4::jsonb)",
                    report,
                    acct,
                    name,
                    '{"input_tokens": 1200, "output_tokens": 300}',
                )
            await conn.execute("SELECT tokentrack.finish_report($1, $2, 'complete')", report, acct)

    results["reserve"] = await measure(server, conn, datadir, args.reports, reserve)
    results["persist"] = await measure(server, conn, datadir, args.reports * len(STEPS), persist)
    results["finalize"] = await measure(server, conn, datadir, args.reports, finalize)
    results["lifecycle"] = await measure(server, conn, datadir, args.reports, lifecycle)
    answer = await conn.fetchval("SELECT (tokentrack.reconcile() ->> 'ok')::boolean")
    if not answer:
        raise SystemExit(f"reconcile() is not ok in {dsn}")
    await conn.close()
    return results


def render(all_results: dict[str, dict[str, dict[str, Any]]], top: int) -> str:
    lines = [
        "| call | database | WAL/call (LSN) | waldump/call | of it FPI/call | records/call |",
        "|---|---|---|---|---|---|",
    ]
    for call in ("reserve", "persist", "finalize", "lifecycle"):
        for db, res in all_results.items():
            r = res[call]
            n = r["calls"]
            count = sum(rec[1] for rec in r["records"])
            lines.append(
                f"| {call} | {db} | {r['per_call']:.0f} B | {r['total'] / n:.0f} B"
                f" | {r['fpi'] / n:.0f} B | {count / n:.1f} |"
            )
    lines.append("")
    for call in ("persist", "finalize"):
        for db, res in all_results.items():
            r = res[call]
            n = r["calls"]
            hot = ", ".join(f"{t} {u} ({h} HOT)" for t, (u, h) in sorted(r["hot"].items()))
            lines.append(f"{call} in {db}: updates {hot or 'none'}")
            lines.append(f"{call} in {db}, biggest records per call (count, bytes, FPI bytes):")
            for name, count, rec, fp in r["records"][:top]:
                lines.append(f"  {name:32} {count / n:6.2f} {rec / n:8.0f} {fp / n:8.0f}")
            lines.append("")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    settings = {**DURABLE_SETTINGS, "max_wal_size": "4GB", "checkpoint_timeout": "1h"}
    with PostgresServer(settings=settings) as server:
        all_results: dict[str, dict[str, dict[str, Any]]] = {}
        admin = await asyncpg.connect(server.dsn("postgres"))
        for db in ("before", "head"):
            await admin.execute(f'CREATE DATABASE "{db}"')
            await migrate.install(server.dsn(db), wait_notice=lambda _: None)
            if db == "before":
                await migrate.rollback(server.dsn(db), to=args.before, wait_notice=lambda _: None)
        await admin.close()
        for db in ("before", "head"):
            all_results[f"{db}"] = await run_database(server, server.dsn(db), args)
        print(render(all_results, args.waldump_top))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reports", type=int, default=300)
    parser.add_argument("--accounts", type=int, default=50)
    parser.add_argument("--seed", type=int, default=30000, help="reports of history (7 steps)")
    parser.add_argument("--before", default="20261213000000")
    parser.add_argument("--waldump-top", type=int, default=8)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
