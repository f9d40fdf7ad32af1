#!/usr/bin/env python3
"""tokentrack's benchmark, side by side with pgbench's built-in simple-update on one server.

    make bench          # the full run (about 30 minutes on 2 cores): bench/results/latest.{md,json}
    make bench-smoke    # about a minute, smaller sizes: bench/results/smoke.{md,json}
    .venv/bin/python bench/run.py --help

It starts its own PostgreSQL (tokentrack_client.testing.PostgresServer, the test suite's
throwaway server, with the server's default settings back: fsync, synchronous_commit and
full_page_writes on, plus pg_stat_statements preloaded) in a temporary directory on disk
(--data-root, /tmp by default, so that commit flushes are real), listening on 127.0.0.1 and
a free port, as the postgres OS user when run as root. The server is stopped and its files
removed at the end, Ctrl-C included.

Phases (--phases picks some):

throughput  pgbench at the same clients, threads and duration for simple-update and for the
            scripts of bench/scripts/ (reserve + release, step, record_step, finalize, the
            whole lifecycle), spread over 1,000 accounts and on one hot account, in rounds
            interleaved with simple-update; medians, ratios to simple-update, CPU and WAL per
            call, waits; record_step against persist_step_usage (the same priced step, by
            token class), run next to each other in every round; and reserve with three
            budgets (the account's month, a team's day, a key's minute, on accounts of their
            own) against try_reserve_tokens, and try_reserve_tokens against main's (database
            bench_main, tokentrack rolled back to the version before budgets), the three
            next to each other in every round; reserve + extend_reservation + release; and
            before/after: each of reserve, reserve with budgets, extend, step, record_step,
            finalize and the lifecycle also as "<workload>@baseline" in database
            bench_baseline (tokentrack rolled back to --baseline, the version before this
            round's write path), next to the workload in every round. --workloads picks some.
profile     each workload once more with pg_stat_statements.track = all: the statements inside
            the functions, where the time goes.
client      the lifecycle through tokentrack_client (TokenTracker.track_report) with N asyncio
            tasks on a pool of N connections (tokentrack_client.create_pool, and asyncpg's
            default pool), interleaved with the pgbench lifecycle; then a replayed workload
            (reports of 1 to 7 steps, Zipf-skewed accounts, some refusals) through
            track_report and as the same steps as bare increment_usage calls, side by side.
growth      each function and the queries of `tokentrack monitor` timed with 10 thousand and
            with 1 million existing reservations and steps.
sweep       100 thousand expired reservations with steps, swept by expire_reservations(500) one
            transaction per batch (each batch timed, commit included: the bound of how long it
            held its locks); then CALL sweep_expired_reservations(500) on as many; then a
            smaller backlog with smaller batches; then the current and the previous sweep
            (version 20261213000000's, one reservation at a time) in turns on one more.

This file parses the options, runs the phases in order and writes the results. Each phase
is a module of its own (phase_*.py), on shared machinery: server.py (the server, its
settings and connections), workloads.py (a pgbench run of a workload, measured and checked),
calls.py (one call at a time), measure.py (what is measured around a run) and report.py
(the summaries and the Markdown).

Absolute numbers depend on the machine and on what else runs on it: read the ratios, which
are measured side by side in one run, and the CPU per call.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import phase_client
import phase_growth
import phase_profile
import phase_sweep
import phase_throughput
import report
from server import BENCH_DIR, Session, benchmark_server, reconcile_ok
from workloads import BASELINE_VERSION, OPT_IN, WORKLOADS, Workloads

from tokentrack_client.testing import PostgresServer

PHASES = ("throughput", "profile", "client", "growth", "sweep")


async def run_phases(args: argparse.Namespace, server: PostgresServer) -> dict[str, Any]:
    """The phases of ``args.phases`` in their order, on the databases they need."""
    session = Session(args, server)
    await session.open()
    try:
        results: dict[str, Any] = {
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "config": dict(vars(args)),
            "environment": await session.environment(),
        }
        phases = args.phases
        # throughput, profile and client: pgbench runs in database bench.
        if {"throughput", "profile", "client"} & set(phases):
            workloads = await Workloads.setup(session)
            if "throughput" in phases:
                results["throughput"] = await phase_throughput.throughput(workloads)
            if "profile" in phases:
                results["profile"] = await phase_profile.profile(workloads)
            if "client" in phases:
                results["client"] = await phase_client.client(workloads)
            results["bench_db_reconcile_ok"] = await reconcile_ok(workloads.bench)
            if workloads.main is not None:
                results["bench_main_db_reconcile_ok"] = await reconcile_ok(workloads.main)
            await workloads.close()
        # growth and sweep: the large history database serves both.
        if "growth" in phases or "sweep" in phases:
            large = await phase_growth.setup_growth_db(session, "growth_large")
            try:
                if "growth" in phases:
                    small = await phase_growth.setup_growth_db(session, "growth_small")
                    try:
                        results["growth"] = await phase_growth.growth(session, small, large)
                        results["growth_small_db_reconcile_ok"] = await reconcile_ok(small)
                    finally:
                        await small.close()
                if "sweep" in phases:
                    results["sweep"] = await phase_sweep.sweep(session, large)
                results["growth_large_db_reconcile_ok"] = await reconcile_ok(large)
            finally:
                await large.close()
        results["environment"]["load_average_end"] = os.getloadavg()
        results["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        return results
    finally:
        await session.close()


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _sizes(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="tokentrack benchmark, side by side with pgbench simple-update",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--smoke", action="store_true", help="about a minute, smaller sizes")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--duration", type=int, default=10, help="seconds per pgbench run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each workload")
    parser.add_argument("--profile-duration", type=int, default=4)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument(
        "--hot-reports",
        type=int,
        default=16,
        help="long-lived reports of the hot account (step workload)",
    )
    parser.add_argument("--client-tasks", type=int, default=8)
    parser.add_argument(
        "--growth",
        type=_sizes,
        default=[10_000, 1_000_000],
        help="history sizes (reservations and steps), comma separated",
    )
    parser.add_argument(
        "--growth-iterations", type=int, default=200, help="report lifecycles timed per size"
    )
    parser.add_argument("--monitoring-repeats", type=int, default=16)
    parser.add_argument("--sweep-rows", type=int, default=100_000)
    parser.add_argument("--sweep-steps", type=int, default=3, help="steps per expired reservation")
    parser.add_argument("--sweep-batch", type=int, default=500)
    parser.add_argument("--sweep-small-rows", type=int, default=10_000)
    parser.add_argument(
        "--sweep-compare-batch",
        type=int,
        default=50,
        help="batch of the current and the previous sweep taking turns on one more backlog of"
        " --sweep-small-rows (0: not run)",
    )
    parser.add_argument(
        "--sweep-small-batches",
        type=_sizes,
        default=[100, 50],
        help="batch sizes tried on smaller backlogs (--sweep-small-rows each)",
    )
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}"
    )
    parser.add_argument(
        "--workloads",
        default=None,
        help="throughput and profile: only these workloads (comma separated, of "
        f"{','.join(w for w in WORKLOADS if w != 'simple-update')}; simple-update always runs;"
        f" default: all but {','.join(OPT_IN)})",
    )
    parser.add_argument(
        "--baseline",
        default=BASELINE_VERSION,
        help="the version the <workload>@baseline runs roll tokentrack back to (database "
        "bench_baseline): before and after, side by side",
    )
    parser.add_argument(
        "--data-root",
        default="/tmp",
        help="where the server's data directory goes (on disk: real fsync)",
    )
    parser.add_argument("--pg-bindir", default=None, help="PostgreSQL server binaries")
    parser.add_argument("--out", default=str(BENCH_DIR / "results"))
    parser.add_argument("--name", default=None, help="output file name (latest; smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.duration, args.rounds, args.profile_duration = 2, 1, 1
        args.growth, args.growth_iterations, args.monitoring_repeats = [5_000, 20_000], 20, 4
        args.sweep_rows, args.sweep_small_rows = 3_000, 1_000
    args.phases = [p for p in args.phases.split(",") if p]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    if args.workloads is not None:
        args.workloads = sorted({w for w in args.workloads.split(",") if w})
        unknown = set(args.workloads) - set(WORKLOADS)
        if unknown:
            parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    else:  # every workload but the opt-in ones
        args.workloads = sorted(set(WORKLOADS) - {"simple-update", *OPT_IN})
    args.name = args.name or ("smoke" if args.smoke else "latest")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("stat") is None:
        raise SystemExit("bench: needs coreutils' stat")
    signal.signal(signal.SIGTERM, _interrupt)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    try:
        with benchmark_server(args) as server:
            print(
                f"bench: PostgreSQL on {server.host}:{server.port}, phases {args.phases}",
                flush=True,
            )
            results = asyncio.run(run_phases(args, server))
    except KeyboardInterrupt:
        print("bench: interrupted; the server was stopped", file=sys.stderr)
        return 130
    results["wall_seconds"] = time.monotonic() - began
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    markdown = report.render(results)
    (out / f"{args.name}.md").write_text(markdown)
    print(markdown)
    print(f"bench: wrote {out / args.name}.md and .json in {results['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
