"""The operations subcommands of ``tokentrack``: audit, verify, monitor, cleanup, cron.

Registered on the ``tokentrack`` parser by :func:`add_commands`; :func:`run` executes one
and returns its exit status: 0 when all is well, 1 when a check failed, an alert fired or a
guarded figure changed. Errors raise :class:`OpsError`, which the CLI prints as one line
``tokentrack: error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Final

from tokentrack_client.ops import audit, monitor, sweep, verify
from tokentrack_client.ops._common import EXIT_FAILED, EXIT_OK, OpsError

COMMANDS: Final = frozenset({"audit", "verify", "monitor", "cleanup", "cron"})

_URL_HELP: Final = "postgresql://user:password@host:port/dbname (default: $DATABASE_URL)"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (got {value})")
    return value


def _url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", metavar="URL", help=_URL_HELP)


def _json(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON")


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add audit, verify, monitor, cleanup and cron to the ``tokentrack`` subparsers."""
    # audit --------------------------------------------------------------------------------
    audit_parser = commands.add_parser(
        "audit",
        help="save the pre-deploy figures, or compare with them after the deploy",
        description=(
            "Usage-period counts and sums (which must not change across a deploy or a rollback), "
            "reports of the last 24 hours by status, tracked tokens of the last 7 days and "
            "active accounts."
        ),
    )
    audit_actions = audit_parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    base = audit_actions.add_parser(
        "baseline",
        help="measure and save the figures as JSON",
        description="Measure the audit figures (one snapshot) and save them as JSON to FILE.",
    )
    base.add_argument("--out", required=True, type=Path, metavar="FILE", help="where to write")
    _url(base)
    comp = audit_actions.add_parser(
        "compare",
        help="measure again and compare with a baseline (exit 1 when usage periods changed)",
        description=(
            "Measure again and print the baseline and the new figures side by side. Exits 1, "
            "naming each one, when a usage-period figure (count or sum by status) changed."
        ),
    )
    comp.add_argument(
        "baseline", type=Path, metavar="FILE", help="a file written by audit baseline"
    )
    _json(comp, "both measurements and the verdict")
    _url(comp)

    # verify -------------------------------------------------------------------------------
    ver = commands.add_parser(
        "verify",
        help="check what the install created; --functional also runs the staging tests",
        description=(
            "Check the database against the applied versions' SQL: schema_migrations versions "
            "and checksums, tables, indexes, functions with their signatures, row level "
            "security, policies, grants (EXECUTE only to the roles the SQL grants, never PUBLIC "
            "where it revokes), pinned search_path; ask the functions (a reservation for "
            "unknown uuids is refused and writes nothing); count the new tables' rows. "
            "Exits 1 when a check fails."
        ),
    )
    ver.add_argument(
        "--functional",
        action="store_true",
        help=(
            "also run the staging tests through the client in a sandbox account, inside a "
            "transaction that is rolled back (the race commits only a reservation, then "
            "deletes it)"
        ),
    )
    ver.add_argument(
        "--upto",
        metavar="VERSION",
        help="expect exactly the versions up to VERSION applied (e.g. after a rollback)",
    )
    _json(ver, "the checks")
    _url(ver)

    # monitor ------------------------------------------------------------------------------
    mon = commands.add_parser(
        "monitor",
        help="the monitoring queries with the checklist's alert thresholds (exit 1 on alert)",
        description=(
            "Active reservations older than 2h (alert above --stale-alert-count older than 3h), "
            "completed reports without step usage, usage accuracy (reconcile), reservations by "
            "status with oldest and newest, reports per hour by status (alert on a failure rate "
            "above 5%% or a completion rate below 90%%). Exits 1 when an alert fires."
        ),
    )
    fmt = mon.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument(
        "--prometheus", action="store_true", help="print the Prometheus text exposition format"
    )
    mon.add_argument("--hours", type=_positive, default=24, metavar="N", help="window (default 24)")
    mon.add_argument(
        "--stale-alert-count",
        type=int,
        default=10,
        metavar="N",
        help="alert when more than N active reservations are older than 3h (default 10)",
    )
    mon.add_argument(
        "--max-failure-rate",
        type=_ratio,
        default=monitor.FAILURE_RATE_MAX,
        metavar="R",
        help="alert above this failure rate (default 0.05)",
    )
    mon.add_argument(
        "--min-completion-rate",
        type=_ratio,
        default=monitor.COMPLETION_RATE_MIN,
        metavar="R",
        help="alert below this completion rate (default 0.90)",
    )
    mon.add_argument(
        "--min-reports",
        type=int,
        default=20,
        metavar="N",
        help="rates alert only once N reports of the window have an outcome (default 20)",
    )
    _url(mon)

    # cleanup ------------------------------------------------------------------------------
    clean = commands.add_parser(
        "cleanup",
        help="run the expiry sweep once and print what it expired and billed",
        description=(
            "Bill and expire every active reservation past its expiry: "
            "tokentrack.cleanup_expired_reservations() in one transaction, or with "
            "--batch-size N in batches of N, each committed on its own."
        ),
    )
    clean.add_argument(
        "--batch-size", type=_positive, metavar="N", help="commit every N reservations"
    )
    _json(clean, "the totals")
    _url(clean)

    # cron ---------------------------------------------------------------------------------
    cron = commands.add_parser(
        "cron",
        help="schedule the expiry sweep through pg_cron (install, remove, status)",
        description=(
            "Schedule CALL tokentrack.sweep_expired_reservations(N) through pg_cron under a "
            "fixed job name. pg_cron must be installed and in shared_preload_libraries; its "
            "database is cron.database_name (the job runs in the tokentrack database)."
        ),
    )
    cron_actions = cron.add_subparsers(dest="action", metavar="ACTION", required=True)
    install = cron_actions.add_parser(
        "install",
        help="schedule the sweep (idempotent; says so when pg_cron is missing)",
        description=(
            f"Create or update the pg_cron job (default '{sweep.DEFAULT_SCHEDULE}', every 2 "
            "hours); an identical job is left unchanged. Creates the pg_cron extension in "
            "cron.database_name when it is loaded but not created. Exits 2 when pg_cron is "
            "not installed or not loaded, unless --if-available."
        ),
    )
    install.add_argument(
        "--schedule",
        default=sweep.DEFAULT_SCHEDULE,
        help=f"cron schedule (default '{sweep.DEFAULT_SCHEDULE}')",
    )
    install.add_argument(
        "--batch-size",
        type=_positive,
        default=sweep.DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"reservations per committed batch (default {sweep.DEFAULT_BATCH_SIZE})",
    )
    for action in (
        install,
        cron_actions.add_parser(
            "remove",
            help="unschedule the sweep (before rolling back version 20260108000000)",
            description="Remove the pg_cron job of the sweep; nothing to do when absent.",
        ),
        cron_actions.add_parser(
            "status",
            help="show the job and its last runs",
            description="Show the pg_cron job of the sweep and its last runs.",
        ),
    ):
        action.add_argument(
            "--job-name",
            default=sweep.DEFAULT_JOB_NAME,
            help=f"pg_cron job name (default {sweep.DEFAULT_JOB_NAME})",
        )
        action.add_argument(
            "--cron-database-url",
            metavar="URL",
            help="the database where pg_cron lives (default: the same URL with cron.database_name)",
        )
        action.add_argument(
            "--if-available",
            action="store_true",
            help="exit 0 with a notice when pg_cron is not installed or not loaded",
        )
        _url(action)


def database_url(args: argparse.Namespace) -> str:
    """``--database-url`` or ``$DATABASE_URL``."""
    url: str | None = args.database_url or os.environ.get("DATABASE_URL")
    if not url:
        raise OpsError("no database given: pass --database-url URL or set DATABASE_URL")
    return url


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, default=str))


async def _audit(args: argparse.Namespace) -> int:
    dsn = database_url(args)
    if args.action == "baseline":
        figures = await audit.baseline(dsn, args.out)
        periods = figures["usage_periods"]
        summary = ", ".join(
            f"{status} {p['periods']} periods / {p['tokens_used']} tokens used"
            for status, p in periods.items()
        )
        print(f"audit: baseline written to {args.out} ({summary})")
        return EXIT_OK
    comparison = await audit.compare(dsn, args.baseline)
    if args.json:
        _print_json(
            {
                "ok": comparison.ok,
                "changed": [f.name for f in comparison.changed],
                "explanation": comparison.explanation(),
                "before": comparison.before,
                "after": comparison.after,
            }
        )
    else:
        print(comparison.render())
    if not comparison.ok and args.json:
        names = ", ".join(f.name for f in comparison.changed)
        print(f"tokentrack: audit: {names} changed (must not change)", file=sys.stderr)
    return EXIT_OK if comparison.ok else EXIT_FAILED


async def _verify(args: argparse.Namespace) -> int:
    dsn = database_url(args)
    report = await verify.verify(dsn, upto=args.upto)
    functional = None
    if args.functional:
        from tokentrack_client.ops import functional as functional_module

        if report.ok:
            functional = await functional_module.run(dsn)
    if args.json:
        data = report.as_json()
        if functional is not None:
            data["functional"] = functional.as_json()
            data["ok"] = report.ok and functional.ok
        _print_json(data)
    else:
        print(report.render())
        if args.functional and functional is None:
            print("verify --functional: skipped: the structural checks failed")
        if functional is not None:
            print()
            print(functional.render())
    ok = (
        report.ok
        and (functional is None or functional.ok)
        and not (args.functional and functional is None)
    )
    return EXIT_OK if ok else EXIT_FAILED


async def _monitor(args: argparse.Namespace) -> int:
    thresholds = monitor.Thresholds(
        hours=args.hours,
        stale_alert_count=args.stale_alert_count,
        failure_rate_max=args.max_failure_rate,
        completion_rate_min=args.min_completion_rate,
        min_reports=args.min_reports,
    )
    result = await monitor.monitor(database_url(args), thresholds)
    if args.json:
        print(result.render_json())
    elif args.prometheus:
        sys.stdout.write(result.render_prometheus())
    else:
        print(result.render())
    return EXIT_FAILED if result.firing else EXIT_OK


async def _cleanup(args: argparse.Namespace) -> int:
    swept = await sweep.run(database_url(args), batch_size=args.batch_size)
    if args.json:
        _print_json(swept.as_json())
    else:
        print(swept.render())
    return EXIT_OK


async def _cron(args: argparse.Namespace) -> int:
    dsn = database_url(args)
    try:
        if args.action == "install":
            result = await sweep.install_cron(
                dsn,
                schedule=args.schedule,
                job_name=args.job_name,
                batch_size=args.batch_size,
                cron_dsn=args.cron_database_url,
            )
            print(result.render())
        elif args.action == "remove":
            result = await sweep.remove_cron(
                dsn, job_name=args.job_name, cron_dsn=args.cron_database_url
            )
            print(result.render())
        else:
            status = await sweep.cron_status(
                dsn, job_name=args.job_name, cron_dsn=args.cron_database_url
            )
            _print_json(status)
    except sweep.CronUnavailable as exc:
        if not args.if_available:
            raise
        print(f"tokentrack: notice: {exc}", file=sys.stderr)
    return EXIT_OK


_HANDLERS: Final = {
    "audit": _audit,
    "verify": _verify,
    "monitor": _monitor,
    "cleanup": _cleanup,
    "cron": _cron,
}


def run(args: argparse.Namespace) -> int:
    """Run the operations command of ``args``; return its exit status (0 or 1)."""
    return asyncio.run(_HANDLERS[args.command](args))


__all__ = ["COMMANDS", "OpsError", "add_commands", "database_url", "run"]
