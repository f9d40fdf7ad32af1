"""Phase client: the lifecycle through tokentrack_client (TokenTracker.track_report) with
--client-tasks asyncio tasks on a pool of as many connections, in rounds interleaved with
the pgbench lifecycle on the spread accounts."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any

import asyncpg
import report
from server import log
from workloads import STEPS, Workloads, account

from tokentrack_client import TokenTracker

APPLICATION = "tokentrack-bench-client"


async def client(workloads: Workloads) -> dict[str, Any]:
    args = workloads.args
    runs: list[dict[str, Any]] = []
    for round_no in range(1, args.rounds + 1):
        pg = await workloads.one("lifecycle", "spread", round_no)
        pg["driver"] = "pgbench"
        runs.append(pg)
        log(f"round {round_no}: client lifecycle ({args.duration} s)")
        run = await client_run(workloads)
        run["round"] = round_no
        runs.append(run)
        log(
            f"  {run['calls_per_s']:.0f} calls/s,"
            f" client {run['cpu']['driver_cores']:.2f} cores,"
            f" server {run['cpu']['server_cores']:.2f} cores"
        )
    return {"runs": runs, "summary": report.client_summary(runs)}


async def client_run(workloads: Workloads) -> dict[str, Any]:
    args = workloads.args
    tasks = args.client_tasks
    pool = await asyncpg.create_pool(
        workloads.session.dsn("bench"),
        min_size=tasks,
        max_size=tasks,
        server_settings={"application_name": APPLICATION},
    )
    assert pool is not None
    try:
        tracker = TokenTracker(pool)
        before = await workloads.state()
        measured = await workloads.measurement(APPLICATION).start()
        deadline = time.monotonic() + args.duration

        async def worker(seed: int) -> int:
            rng = random.Random(seed)
            done = 0
            while time.monotonic() < deadline:
                who = account(rng.randint(1, args.accounts))
                async with tracker.track_report(who, uuid.uuid4(), 20_000) as tracked:
                    for name, inputs, outputs in STEPS:
                        await tracked.step(
                            name, input_tokens=inputs, output_tokens=outputs, model="gpt-4o"
                        )
                done += 1
            return done

        began = time.monotonic()
        try:
            counts = await asyncio.gather(*(worker(i) for i in range(tasks)))
        finally:
            elapsed = time.monotonic() - began
            await measured.stop_sampling()
    finally:
        await pool.close()
    await measured.finish(driver="python", statements=8)
    cpu, wal = measured.cpu, measured.wal
    lifecycles = sum(counts)
    workloads.check("lifecycle", lifecycles, before, await workloads.state())
    calls = lifecycles * 9
    return {
        "driver": "tokentrack_client",
        "workload": "lifecycle",
        "accounts": "spread",
        "tasks": tasks,
        "tps": lifecycles / elapsed,
        "transactions": lifecycles,
        "calls_per_tx": 9,
        "calls_per_s": calls / elapsed,
        "cpu": cpu,
        "server_cpu_ms_per_call": cpu["server_cpu_s"] * 1000 / max(calls, 1),
        "client_cpu_ms_per_call": cpu["driver_cpu_s"] * 1000 / max(calls, 1),
        "wal_bytes_per_call": wal["wal_bytes"] / max(calls, 1),
        "waits": dict(measured.waits.most_common()),
        "pg_stat_statements": measured.statements,
    }
