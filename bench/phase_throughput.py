"""Phase throughput: pgbench at the same clients, threads and duration for simple-update and
for each workload, spread over the accounts and on one hot account, in rounds interleaved
with simple-update (each run is compared with the simple-update runs around it; record_step
with the persist_step_usage run next to it)."""

from __future__ import annotations

from typing import Any

import report
from workloads import Workloads, round_order


async def throughput(workloads: Workloads) -> dict[str, Any]:
    rounds = workloads.args.rounds
    runs: list[dict[str, Any]] = []
    for round_no in range(1, rounds + 1):
        for workload, mode in round_order(round_no, workloads.args.workloads):
            runs.append(await workloads.one(workload, mode, round_no))
    runs.append(await workloads.one("simple-update", "-", rounds + 1))
    return {"runs": runs, "summary": report.throughput_summary(runs)}
