"""Phase client: the lifecycle through tokentrack_client (TokenTracker.track_report) with
--client-tasks asyncio tasks on a pool of as many connections, in rounds interleaved with
the pgbench lifecycle on the spread accounts.

Then, in the same rounds, a replayed workload through the client two ways: ``reports``, each
report through track_report (reserve, its steps, finish), and ``bare``, the same steps as bare
increment_usage calls (what a gateway that only counts would make). The workload is a plan
drawn once per round: each task walks its own list of reports of 1 to 7 steps (token counts
drawn per step), on accounts chosen Zipf-like over the spread accounts (weight 1/rank^1.1, so a
few accounts take most reports), and one report in twenty on an account with little budget
left (a period of 1,000 tokens, below every estimate: refused at reserve, so no steps; the
refusal is part of what the report path costs). Both ways walk the same plans (same accounts,
token counts, order and concurrency) for --duration seconds each, the order of the two
alternating by round; the cost of a step is the driver's and the server's CPU over the steps
recorded, and the ratio reports / bare is the price of exactness per step.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import report
from server import log
from workloads import STEPS, Workloads, account

from tokentrack_client import InsufficientTokens, TokenTracker, create_pool

APPLICATION = "tokentrack-bench-client"

LOW_ACCOUNTS = 2_000_000  # bench.account(LOW_ACCOUNTS + n), n in 1..LOW_COUNT: little budget
LOW_COUNT = 20
LOW_LIMIT = 1_000  # below every report's estimate: each reserve on them is refused
LOW_SHARE = 0.05  # one report in twenty goes to a low-budget account
ZIPF_S = 1.1
REPLAY_MODES = ("reports", "bare")
POOLS = ("create_pool", "asyncpg")  # tokentrack_client.create_pool; asyncpg's default reset


async def client(workloads: Workloads) -> dict[str, Any]:
    args = workloads.args
    runs: list[dict[str, Any]] = []
    replays: list[dict[str, Any]] = []
    await workloads.bench.execute(
        "SELECT tokentrack.open_usage_period(bench.account(n), $3)"
        " FROM generate_series($1::bigint, $2::bigint) AS n",
        LOW_ACCOUNTS + 1,
        LOW_ACCOUNTS + LOW_COUNT,
        LOW_LIMIT,
    )
    for round_no in range(1, args.rounds + 1):
        pg = await workloads.one("lifecycle", "spread", round_no)
        pg["driver"] = "pgbench"
        runs.append(pg)
        for pool in POOLS:
            log(f"round {round_no}: client lifecycle, {pool} pool ({args.duration} s)")
            run = await client_run(workloads, pool)
            run["round"] = round_no
            runs.append(run)
            log(
                f"  {run['calls_per_s']:.0f} calls/s,"
                f" client {run['cpu']['driver_cores']:.2f} cores,"
                f" {run['client_cpu_ms_per_call']:.3f} ms/call,"
                f" server {run['cpu']['server_cores']:.2f} cores"
            )
        plans = make_plans(args.client_tasks, args.accounts, seed=round_no)
        order = REPLAY_MODES if round_no % 2 else REPLAY_MODES[::-1]
        for mode in order:
            log(f"round {round_no}: client replay, {mode} ({args.duration} s)")
            done = await replay_run(workloads, plans, mode)
            done["round"] = round_no
            replays.append(done)
            log(
                f"  {done['steps_per_s']:.0f} steps/s, {done['cpu_ms_per_step']:.3f} ms CPU/step"
                f" (driver {done['driver_cpu_ms_per_step']:.3f},"
                f" server {done['server_cpu_ms_per_step']:.3f})"
            )
    return {
        "runs": runs,
        "summary": report.client_summary(runs),
        "replay": replays,
        "replay_summary": report.replay_summary(replays),
    }


@dataclass(frozen=True)
class PlannedReport:
    """One report of the replay: its account, estimate and steps (name, input, output)."""

    account: uuid.UUID
    estimate: int
    steps: tuple[tuple[str, int, int], ...]
    low: bool  # on a low-budget account: refused at reserve


def make_plans(tasks: int, accounts: int, *, seed: int) -> list[list[PlannedReport]]:
    """Each task's reports (enough for any run: a task cycles through its list)."""
    rng = random.Random(f"replay-{seed}")
    cumulative = list(itertools.accumulate(1 / rank**ZIPF_S for rank in range(1, accounts + 1)))
    ranked = list(range(1, accounts + 1))
    rng.shuffle(ranked)  # which accounts are the busy ones
    names = [name for name, _, _ in STEPS]
    plans = []
    for _ in range(tasks):
        plan = []
        for _ in range(5_000):
            low = rng.random() < LOW_SHARE
            if low:
                who = account(LOW_ACCOUNTS + rng.randint(1, LOW_COUNT))
            else:
                pick = bisect.bisect_left(cumulative, rng.random() * cumulative[-1])
                who = account(ranked[min(pick, accounts - 1)])
            count = rng.randint(1, 7)
            steps = tuple(
                (names[k], rng.randint(200, 4_000), rng.randint(50, 1_500)) for k in range(count)
            )
            plan.append(PlannedReport(who, 2_000 + 5_500 * count, steps, low))
        plans.append(plan)
    return plans


async def replay_run(
    workloads: Workloads, plans: list[list[PlannedReport]], mode: str
) -> dict[str, Any]:
    """One run of the replay, ``reports`` (track_report) or ``bare`` (increment_usage)."""
    args = workloads.args
    tasks = len(plans)
    pool = await create_pool(
        workloads.session.dsn("bench"),
        min_size=tasks,
        max_size=tasks,
        server_settings={"application_name": APPLICATION},
    )
    try:
        tracker = TokenTracker(pool)
        measured = await workloads.measurement(APPLICATION).start()
        deadline = time.monotonic() + args.duration

        async def as_report(planned: PlannedReport) -> tuple[int, int, int]:
            try:
                async with tracker.track_report(
                    planned.account, uuid.uuid4(), planned.estimate
                ) as tracked:
                    for name, inputs, outputs in planned.steps:
                        await tracked.step(
                            name, input_tokens=inputs, output_tokens=outputs, model="gpt-4o"
                        )
            except InsufficientTokens:
                return 0, 1, 1
            return len(planned.steps), 0, len(planned.steps) + 2

        async def as_bare(planned: PlannedReport) -> tuple[int, int, int]:
            if planned.low:
                return 0, 1, 0  # the report the other way refuses: no steps
            last = len(planned.steps) - 1
            for k, (_, inputs, outputs) in enumerate(planned.steps):
                await tracker.increment_usage(
                    planned.account, inputs + outputs, is_report=k == last
                )
            return len(planned.steps), 0, len(planned.steps)

        one = as_report if mode == "reports" else as_bare

        async def worker(plan: list[PlannedReport]) -> tuple[int, int, int, int]:
            steps = refused = calls = reports = 0
            for planned in itertools.cycle(plan):
                if time.monotonic() >= deadline:
                    break
                s, r, c = await one(planned)
                steps, refused, calls, reports = steps + s, refused + r, calls + c, reports + 1
            return steps, refused, calls, reports

        began = time.monotonic()
        try:
            counts = await asyncio.gather(*(worker(plan) for plan in plans))
        finally:
            elapsed = time.monotonic() - began
            await measured.stop_sampling()
    finally:
        await pool.close()
    await measured.finish(driver="python", statements=6)
    cpu = measured.cpu
    steps, refused, calls, reports = (sum(c[i] for c in counts) for i in range(4))
    per_step = 1000 / max(steps, 1)
    return {
        "driver": "tokentrack_client",
        "workload": f"replay-{mode}",
        "mode": mode,
        "tasks": tasks,
        "reports": reports,
        "refused": refused,
        "steps": steps,
        "calls": calls,
        "steps_per_s": steps / elapsed,
        "cpu": cpu,
        "driver_cpu_ms_per_step": cpu["driver_cpu_s"] * per_step,
        "server_cpu_ms_per_step": cpu["server_cpu_s"] * per_step,
        "cpu_ms_per_step": (cpu["driver_cpu_s"] + cpu["server_cpu_s"]) * per_step,
        "wal_bytes_per_step": measured.wal["wal_bytes"] / max(steps, 1),
        "waits": dict(measured.waits.most_common()),
        "pg_stat_statements": measured.statements,
    }


async def client_run(workloads: Workloads, kind: str) -> dict[str, Any]:
    """The lifecycle through the client on a pool of ``kind`` (one of POOLS)."""
    args = workloads.args
    tasks = args.client_tasks
    make = create_pool if kind == "create_pool" else asyncpg.create_pool
    pool = await make(
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
        "pool": kind,
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
