"""Phase profile: each workload once more with pg_stat_statements.track = all, so that the
statements inside the functions show where the time goes."""

from __future__ import annotations

from typing import Any

from server import log
from workloads import BASELINE, Workloads, round_order


async def profile(workloads: Workloads) -> dict[str, Any]:
    duration = workloads.args.profile_duration
    profiles: dict[str, Any] = {}
    for workload, mode in round_order(1, workloads.args.workloads):
        if workload.endswith(BASELINE):  # where the time goes now, not at the baseline
            continue
        log(f"profile: {workload} {mode} ({duration} s)")
        run = await workloads.run_pgbench(workload, mode, duration=duration, track_all=True)
        profiles[f"{workload}/{mode}"] = {
            "transactions": run["transactions"],
            "calls": run["transactions"] * run["calls_per_tx"],
            "statements": run["pg_stat_statements"],
        }
    return profiles
