"""The ``tokentrack`` command line: one argparse parser tree, one handler per command.

::

    tokentrack migrate install   [--database-url URL]
    tokentrack migrate rollback  [--steps N | --to VERSION] [--archive] [--database-url URL]
    tokentrack migrate list      [--database-url URL]
    tokentrack migrate sql       [--pending --database-url URL]
    tokentrack demo [--database-url URL]
    tokentrack audit baseline --out FILE | audit compare FILE
    tokentrack verify [--functional] [--upto VERSION]
    tokentrack monitor [--json | --prometheus] [--full]
    tokentrack exporter [--listen HOST:PORT] [--min-interval S] [--query-timeout S] [--hours N]
                        [--top-accounts N] [--top-subjects N] [--reconcile-interval S]
                        [--reconcile-timeout S] [--reconcile-full]
    tokentrack cleanup [--batch-size N]
    tokentrack cron install | remove | status
    tokentrack prices import FILE [--dry-run] [--provider NAME] [--model GLOB] [--json]
    tokentrack prices list [--model GLOB] [--json]
    tokentrack budgets set --account ID [--subject S] --unit U --window W --limit N
                           [--timezone TZ] [--threshold P ...] [--json]
    tokentrack budgets list --account ID [--json]
    tokentrack budgets show --account ID --budget BUDGET_ID [--windows N] [--json]
    tokentrack credits grant --account ID --budget BUDGET_ID --amount N [--expires-at T]
                             --key KEY --reason TEXT [--json]
    tokentrack credits list --account ID [--budget BUDGET_ID] [--json]
    tokentrack adjust --account ID [--budget BUDGET_ID] --delta N --key KEY --reason TEXT [--json]
    tokentrack refund --account ID --report REPORT_ID --key KEY --reason TEXT [--json]
    tokentrack notifications --consumer NAME [--follow] [--limit N] [--lease SECONDS]
                           [--poll-interval SECONDS]

The database comes from ``--database-url`` or the ``DATABASE_URL`` environment variable
(``tokentrack demo`` ignores the variable: it takes a database only on its command line). A
connection attempt waits at most ``--connect-timeout`` seconds (else
``$TOKENTRACK_CONNECT_TIMEOUT``, else 10). Every failure (a
:class:`~tokentrack_client.connection.CommandError`, or a database or socket error met on
the way) prints one line ``tokentrack: error: ...`` on stderr and exits with status 2. The
checking commands (audit compare, verify, monitor) exit with status 1 when a check fails, an
alert fires or a figure that must not change changed (see docs/RUNBOOK.md).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from tokentrack_client import __version__, connection, migrate
from tokentrack_client.connection import (
    CONNECT_TIMEOUT,
    CONNECT_TIMEOUT_ENV,
    DATABASE_ERRORS,
    EXIT_ERROR,
    URL_HELP,
    CommandError,
    describe_target,
    failure_line,
)
from tokentrack_client.contract import BUDGET_UNITS, BUDGET_WINDOWS
from tokentrack_client.ops import (
    audit,
    budgets,
    credits,
    monitor,
    notifications,
    prices,
    sweep,
    verify,
)
from tokentrack_client.ops._common import EXIT_FAILED, EXIT_OK

Handler = Callable[[argparse.Namespace], int]
"""What a command runs: its parsed arguments in, its exit status out."""


def _in_event_loop(
    handler: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
) -> Handler:
    """The :data:`Handler` that runs the coroutine ``handler`` in a fresh event loop."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        return asyncio.run(handler(args))

    return run


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def _database_url(args: argparse.Namespace) -> str:
    """``--database-url`` or ``$DATABASE_URL``."""
    url: str | None = args.database_url or os.environ.get("DATABASE_URL")
    if not url:
        raise CommandError("no database given: pass --database-url URL or set DATABASE_URL")
    return url


def _seconds(text: str) -> float:
    try:
        return connection.parse_seconds(text, "--connect-timeout")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_database_url(parser: argparse.ArgumentParser, url_help: str = URL_HELP) -> None:
    parser.add_argument("--database-url", metavar="URL", help=url_help)
    parser.add_argument(
        "--connect-timeout",
        type=_seconds,
        metavar="SECONDS",
        help=(
            "give up connecting after SECONDS (default: "
            f"${CONNECT_TIMEOUT_ENV}, else {CONNECT_TIMEOUT:g})"
        ),
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 86_400:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 86400 (got {text})")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (got {value})")
    return value


def _listen(text: str) -> tuple[str, int]:
    from tokentrack_client.ops.exporter import parse_listen

    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds_or_zero(text: str) -> float:
    return 0.0 if text.strip() in ("0", "0.0") else _positive_seconds(text)


def _bounded(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _integer(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high} (got {value})")
        return value

    return parse


def _json(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``tokentrack`` command; each command's parser sets
    ``run``, the :data:`Handler` that :func:`main` calls."""
    parser = argparse.ArgumentParser(
        prog="tokentrack",
        description="PostgreSQL-native exact LLM token accounting.",
    )
    parser.add_argument("--version", action="version", version=f"tokentrack {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    migrate_parser = commands.add_parser(
        "migrate",
        help="install, roll back, list or print the tokentrack SQL",
        description=(
            "Manage the tokentrack schema in a database. The SQL directory is "
            "$TOKENTRACK_SQL_DIR, else the SQL shipped with the package."
        ),
    )
    migrate_parser.set_defaults(run=_migrate)
    actions = migrate_parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    install = actions.add_parser(
        "install",
        help="apply every pending version and every changed function file",
        description=(
            "Apply every pending version in order, each in one transaction, and every "
            "function file that changed since it was recorded, under the advisory lock "
            f"{migrate.ADVISORY_LOCK_KEY}. Refuses applied schema files edited since."
        ),
    )
    _add_database_url(install)

    rollback = actions.add_parser(
        "rollback",
        help="undo the newest applied version(s)",
        description=(
            "Undo the newest applied version(s), newest first: drop the functions each "
            "introduced, run its rollback file and restore every function it changed to the "
            "definition recorded before it. Refused (exit 2, nothing changed) while a "
            "version's billing tables hold rows, or rows hold data in its billing columns, "
            "unless --archive."
        ),
    )
    how_far = rollback.add_mutually_exclusive_group()
    how_far.add_argument(
        "--steps", type=int, default=1, metavar="N", help="how many versions (default: 1)"
    )
    how_far.add_argument(
        "--to",
        metavar="VERSION",
        help="roll back every version newer than VERSION (an applied version, which stays)",
    )
    rollback.add_argument(
        "--archive",
        action="store_true",
        help=(
            f"first bill every active reservation as the sweep does, then keep the rows of "
            f"the dropped billing tables, and the values of the dropped billing columns, in "
            f"schema {migrate.ARCHIVE_SCHEMA} (the next install of the version restores them)"
        ),
    )
    _add_database_url(rollback)

    listing = actions.add_parser(
        "list",
        help="show every version, and the function files that differ from the database",
        description=(
            "Show every version with its status (applied, pending, drifted or missing), then "
            "every function file whose text differs from what the database recorded (changed, "
            "new or removed); changes nothing."
        ),
    )
    _add_database_url(listing)

    sql = actions.add_parser(
        "sql",
        help="print the SQL of every version for psql or another migration tool",
        description=(
            "Print the bootstrap and every version, each wrapped in BEGIN; ... COMMIT; with its "
            "schema_migrations row, for `psql -v ON_ERROR_STOP=1 -f FILE`."
        ),
    )
    sql.add_argument(
        "--pending",
        action="store_true",
        help="only the versions not yet applied to the database (needs a database URL)",
    )
    _add_database_url(sql)

    demo_parser = commands.add_parser(
        "demo",
        help="run the four report types on a throwaway PostgreSQL (or --database-url)",
        description=(
            "Run the four report types on several accounts at once (one cancelled from "
            "outside, one failed, two racing for one budget), print what was billed and "
            "what it cost (prices set for its models first), and "
            "reconcile's verdict. It starts a throwaway PostgreSQL in a temporary directory "
            "and removes it on exit, Ctrl-C included; DATABASE_URL is ignored. With "
            "--database-url it uses that database, and refuses one that holds accounts other "
            "than the demo's own."
        ),
    )
    demo_parser.set_defaults(run=_demo)
    _add_database_url(
        demo_parser,
        "postgresql://user:password@host:port/dbname; a database without accounts other than "
        "the demo's (DATABASE_URL is ignored)",
    )

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
    audit_parser.set_defaults(run=_audit)
    audit_actions = audit_parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    base = audit_actions.add_parser(
        "baseline",
        help="measure and save the figures as JSON",
        description="Measure the audit figures (one snapshot) and save them as JSON to FILE.",
    )
    base.add_argument("--out", required=True, type=Path, metavar="FILE", help="where to write")
    _add_database_url(base)
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
    _add_database_url(comp)

    # verify -------------------------------------------------------------------------------
    ver = commands.add_parser(
        "verify",
        help="check what the install created; --functional also runs the staging tests",
        description=(
            "Check the database against a clean install of the same SQL (sql/catalog.json): "
            "schema_migrations versions and checksums, then tables, columns, constraints, "
            "indexes, triggers, functions with their signatures and definitions (a function "
            "edited by hand is named), row level security, policies, grants and comments; ask "
            "the functions (a reservation for unknown uuids is refused and writes nothing); "
            "count the new tables' rows. Exits 1 when a check fails."
        ),
    )
    ver.set_defaults(run=_verify)
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
    _add_database_url(ver)

    # monitor ------------------------------------------------------------------------------
    mon = commands.add_parser(
        "monitor",
        help="the monitoring queries with the checklist's alert thresholds (exit 1 on alert)",
        description=(
            "Active reservations older than 2h (alert above --stale-alert-count older than 3h), "
            "completed reports without step usage, usage accuracy (reconcile), reservations by "
            "status with oldest and newest, reports per hour by status (alert on a failure rate "
            "above 5% or a completion rate below 90%), the window's steps, tokens and cost with "
            "the unpriced ones by model (a warning when prices are set and a model has none). "
            "Exits 1 when an alert fires."
        ),
    )
    mon.set_defaults(run=_monitor)
    fmt = mon.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument(
        "--prometheus", action="store_true", help="print the Prometheus text exposition format"
    )
    mon.add_argument("--hours", type=_positive, default=24, metavar="N", help="window (default 24)")
    mon.add_argument(
        "--full",
        action="store_true",
        help="usage accuracy by reconcile(), the audit of every period, rather than the "
        "incremental reconcile_recent() (what changed since the verified point)",
    )
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
    _add_database_url(mon)

    # exporter -----------------------------------------------------------------------------
    exp = commands.add_parser(
        "exporter",
        help="serve the monitoring figures on a Prometheus /metrics endpoint until SIGTERM",
        description=(
            "A long-running Prometheus endpoint (needs the extra: pip install "
            "'tokentrack[exporter]'). Reads tokentrack.health(), metrics() and billing_totals() "
            "in one read-only snapshot at most once per --min-interval, and reconcile() on its "
            "own connection every --reconcile-interval; serves tokentrack_up 0 while the "
            "database cannot be read. See docs/API.md for every metric."
        ),
    )
    exp.set_defaults(run=_exporter)
    exp.add_argument(
        "--listen",
        type=_listen,
        default=("127.0.0.1", 9419),
        metavar="HOST:PORT",
        help="address to serve /metrics on (default 127.0.0.1:9419; port 0: any free port)",
    )
    exp.add_argument(
        "--min-interval",
        type=_positive_seconds,
        default=10.0,
        metavar="SECONDS",
        help="read the database at most this often; scrapes in between get the last read "
        "(default 10)",
    )
    exp.add_argument(
        "--query-timeout",
        type=_positive_seconds,
        default=5.0,
        metavar="SECONDS",
        help="statement_timeout of a scrape's read (default 5)",
    )
    exp.add_argument(
        "--hours",
        type=_positive,
        default=1,
        metavar="N",
        help="window of the windowed figures: reports, rates, durations (default 1)",
    )
    exp.add_argument(
        "--top-accounts",
        type=_bounded(0, 1000),
        default=10,
        metavar="N",
        help="budget series for the N accounts nearest their limits, the rest summed under "
        'account="other" (default 10)',
    )
    exp.add_argument(
        "--top-subjects",
        type=_bounded(0, 1000),
        default=5,
        metavar="N",
        help="per top account, series for its N fullest subject budgets, the rest summed under "
        'subject="other" (default 5)',
    )
    exp.add_argument(
        "--reconcile-interval",
        type=_seconds_or_zero,
        default=600.0,
        metavar="SECONDS",
        help="run reconcile() this often (default 600; 0: never, no reconcile metrics)",
    )
    exp.add_argument(
        "--reconcile-timeout",
        type=_positive_seconds,
        default=60.0,
        metavar="SECONDS",
        help="statement_timeout of reconcile() and of the billing counters' first sum (default 60)",
    )
    exp.add_argument(
        "--reconcile-full",
        action="store_true",
        help="run reconcile(), the audit of every period, rather than the incremental check "
        "that advances the verified point (advance_reconcile_point())",
    )
    _add_database_url(exp)

    # cleanup ------------------------------------------------------------------------------
    clean = commands.add_parser(
        "cleanup",
        help="run the expiry sweep once and print what it expired and billed",
        description=(
            "Bill and expire every active reservation past its expiry, in batches of N "
            "reservations, each committed on its own (tokentrack.expire_reservations(N), as "
            "CALL tokentrack.sweep_expired_reservations(N) does), until a batch finds nothing "
            "due; no period stays locked for longer than one batch."
        ),
    )
    clean.set_defaults(run=_cleanup)
    clean.add_argument(
        "--batch-size",
        type=_positive,
        default=sweep.DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"reservations per committed batch (default {sweep.DEFAULT_BATCH_SIZE})",
    )
    _json(clean, "the totals")
    _add_database_url(clean)

    # cron ---------------------------------------------------------------------------------
    cron = commands.add_parser(
        "cron",
        help="schedule the expiry sweep through pg_cron (install, remove, status)",
        description=(
            "Schedule CALL tokentrack.sweep_expired_reservations(N) through pg_cron under a "
            "fixed job name. pg_cron must be installed and in shared_preload_libraries; its "
            "database is cron.database_name (the job runs in the tokentrack database). Works "
            "for a role that is not a superuser (the database owner) with USAGE on schema cron "
            "(and EXECUTE on cron.schedule_in_database when pg_cron lives in another "
            "database); where pg_cron is not installed, loaded, created or usable by the role, "
            "says which on one line and exits 2."
        ),
    )
    cron.set_defaults(run=_cron)
    cron_actions = cron.add_subparsers(dest="action", metavar="ACTION", required=True)
    cron_install = cron_actions.add_parser(
        "install",
        help="schedule the sweep (idempotent; says so when pg_cron is missing)",
        description=(
            f"Create or update the pg_cron job (default '{sweep.DEFAULT_SCHEDULE}', every 2 "
            "hours); an identical job is left unchanged. Creates the pg_cron extension in "
            "cron.database_name when it is loaded but not created (which needs a superuser). "
            "Exits 2 when pg_cron is not installed, loaded, created or usable by the role, "
            "unless --if-available."
        ),
    )
    cron_install.add_argument(
        "--schedule",
        default=sweep.DEFAULT_SCHEDULE,
        help=f"cron schedule (default '{sweep.DEFAULT_SCHEDULE}')",
    )
    cron_install.add_argument(
        "--batch-size",
        type=_positive,
        default=sweep.DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"reservations per committed batch (default {sweep.DEFAULT_BATCH_SIZE})",
    )
    for action in (
        cron_install,
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
            help=(
                "the database where pg_cron lives (default: the same URL with "
                "cron.database_name; postgres when the role may not read that setting and "
                "pg_cron is not in this database)"
            ),
        )
        action.add_argument(
            "--if-available",
            action="store_true",
            help=(
                "exit 0 with a notice when pg_cron is not installed, loaded, created or usable "
                "by this role"
            ),
        )
        _add_database_url(action)

    # prices -------------------------------------------------------------------------------
    prices_parser = commands.add_parser(
        "prices",
        help="import model prices from LiteLLM's price map, or list the prices in effect",
        description=(
            "Model prices in micros (10^-6 of the currency) per million tokens, per token "
            "class: input, cached_input, cache_write, output, reasoning."
        ),
    )
    prices_parser.set_defaults(run=_prices)
    prices_actions = prices_parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    price_import = prices_actions.add_parser(
        "import",
        help="add the prices of LiteLLM's model_prices_and_context_window.json (idempotent)",
        description=(
            "Add each model's price from a file in LiteLLM's model_prices_and_context_window.json "
            "format with tokentrack.set_model_price, all in one transaction (only the schema "
            "owner may). Costs per token become micros per million tokens (x 10^12, exactly): "
            "input_cost_per_token, cache_read_input_token_cost, "
            "cache_creation_input_token_cost, output_cost_per_token, "
            "output_cost_per_reasoning_token; tiered and service-tier keys are ignored. "
            "Entries without both an input and an output cost per token, and invalid ones, are "
            "skipped and counted. A price already in effect is left unchanged, so importing the "
            "same file twice adds nothing."
        ),
    )
    price_import.add_argument("file", type=Path, metavar="FILE", help="the JSON price map")
    price_import.add_argument(
        "--dry-run",
        action="store_true",
        help="do the same in a transaction that is rolled back: show what would change",
    )
    price_import.add_argument(
        "--provider", metavar="NAME", help="only the entries whose litellm_provider is NAME"
    )
    price_import.add_argument(
        "--model", metavar="GLOB", help="only the model names that match GLOB (* only)"
    )
    _json(price_import, "what was added, unchanged and skipped")
    _add_database_url(price_import)
    price_list = prices_actions.add_parser(
        "list",
        help="show the price in effect for each model name or pattern",
        description=(
            "Show the price in effect now for each model name or pattern in "
            "tokentrack.model_prices, in micros per million tokens."
        ),
    )
    price_list.add_argument(
        "--model",
        metavar="GLOB",
        help="only the model names (or patterns) that match GLOB (* matches any run)",
    )
    _json(price_list, "the prices")
    _add_database_url(price_list)

    # budgets ------------------------------------------------------------------------------
    budgets_parser = commands.add_parser(
        "budgets",
        help="set an account's budgets, list them with their current window, or show one",
        description=(
            "Budgets of an account besides its usage period: of the whole account or of a "
            "subject (team:research, user:42, key:sk-live-1), in tokens or cost_micros, per "
            "calendar window in a time zone (minute, hour, day, week from Monday, month) or in "
            "total (never resets)."
        ),
    )
    budgets_parser.set_defaults(run=_budgets)
    budget_actions = budgets_parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    budget_set = budget_actions.add_parser(
        "set",
        help="create or change a budget (tokentrack.set_budget; every change is recorded)",
        description=(
            "Create the account's budget for (subject, unit, window), or change its limit, "
            "time zone or thresholds, with tokentrack.set_budget. A new limit applies to the "
            "current window at once; reservations already granted keep their holds. The same "
            "settings again change nothing. An option left out keeps its value on a change."
        ),
    )
    budget_set.add_argument("--account", required=True, metavar="ID", help="the account's uuid")
    budget_set.add_argument(
        "--subject",
        metavar="S",
        help="the subject's label (default: the whole account)",
    )
    budget_set.add_argument("--unit", required=True, choices=BUDGET_UNITS, help="the unit")
    budget_set.add_argument("--window", required=True, choices=BUDGET_WINDOWS, help="the window")
    budget_set.add_argument(
        "--limit", required=True, type=_integer, metavar="N", help="the limit, in the unit (>= 0)"
    )
    budget_set.add_argument(
        "--timezone",
        metavar="TZ",
        help="the calendar windows' time zone, an IANA name such as Europe/Berlin (default UTC)",
    )
    budget_set.add_argument(
        "--threshold",
        dest="thresholds",
        action="extend",
        nargs="+",
        type=_integer,
        metavar="P",
        help="soft thresholds in percent, 1 to 1000, at most 10 (default 80 100)",
    )
    _json(budget_set, "the budget")
    _add_database_url(budget_set)
    budget_list = budget_actions.add_parser(
        "list",
        help="every budget of an account with its current window's used, held and limit",
        description=(
            "Show every budget of the account with its current window: used (billed there), "
            "held (by active reservations), the limit and what is available. Read-only; only "
            "the schema owner may run it (it calls the internal tokentrack.budget_window_start "
            "and tokentrack.budget_held)."
        ),
    )
    budget_list.add_argument("--account", required=True, metavar="ID", help="the account's uuid")
    _json(budget_list, "the budgets")
    _add_database_url(budget_list)
    budget_show = budget_actions.add_parser(
        "show",
        help="one budget: its settings, change history and windows",
        description=(
            "Show one budget of the account: its settings and current window, every change "
            "recorded in budget_changes, and its newest windows with used and held. Read-only; "
            "only the schema owner may run it."
        ),
    )
    budget_show.add_argument("--account", required=True, metavar="ID", help="the account's uuid")
    budget_show.add_argument(
        "--budget", required=True, metavar="BUDGET_ID", help="the budget's uuid"
    )
    budget_show.add_argument(
        "--windows",
        type=_positive,
        default=budgets.DEFAULT_WINDOWS_SHOWN,
        metavar="N",
        help=f"how many windows, newest first (default {budgets.DEFAULT_WINDOWS_SHOWN})",
    )
    _json(budget_show, "the budget")
    _add_database_url(budget_show)
    _add_correction_commands(commands)

    # notifications --------------------------------------------------------------------------
    notes = commands.add_parser(
        "notifications",
        help="print the budgets' threshold notifications as JSON lines, acknowledging each",
        description=(
            "Claim the unacknowledged threshold notifications for consumer NAME "
            "(tokentrack.claim_notifications), print each as one JSON line and acknowledge it "
            "right after printing (tokentrack.ack_notification): at least once delivery. "
            "Without --follow: at most --limit of them, then exit. With --follow: LISTEN for "
            "NOTIFY tokentrack_notifications and poll, until interrupted (or --limit)."
        ),
    )
    notes.set_defaults(run=_notifications)
    notes.add_argument("--consumer", required=True, metavar="NAME", help="the consumer's name")
    notes.add_argument("--follow", action="store_true", help="keep waiting for new notifications")
    notes.add_argument(
        "--limit",
        type=_positive,
        metavar="N",
        help=(
            f"at most N notifications (default without --follow: {notifications.DEFAULT_LIMIT}; "
            "with --follow: no limit)"
        ),
    )
    notes.add_argument(
        "--lease",
        type=_positive_seconds,
        metavar="SECONDS",
        help="how long a claimed notification stays with this consumer (default 60)",
    )
    notes.add_argument(
        "--poll-interval",
        type=_positive_seconds,
        default=5.0,
        metavar="SECONDS",
        help="with --follow: claim at least this often when no NOTIFY arrives (default 5)",
    )
    _add_database_url(notes)
    return parser


def _add_correction_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--key",
        required=True,
        metavar="KEY",
        help=(
            "the idempotency key (per account and command): running the command again with "
            "the same key and arguments is a retry and writes nothing more"
        ),
    )
    parser.add_argument("--reason", required=True, metavar="TEXT", help="why (kept in the record)")
    _json(parser, what)
    _add_database_url(parser)


def _add_correction_commands(commands: Any) -> None:
    """``credits grant|list``, ``adjust`` and ``refund``: the only way to correct billing."""
    credits_parser = commands.add_parser(
        "credits",
        help="grant credits to a budget, or list an account's grants",
        description=(
            "Credits raise a budget's limit by an amount until an expiry, in every window of "
            "the budget they overlap; an expired grant stops counting, usage billed stays "
            "billed. Each grant is one append-only record (tokentrack.credit_grants)."
        ),
    )
    credits_parser.set_defaults(run=_credits)
    actions = credits_parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    grant = actions.add_parser(
        "grant",
        help="grant credits to a budget (tokentrack.grant_credits)",
        description="Raise a budget's limit with tokentrack.grant_credits (one record).",
    )
    grant.add_argument("--account", required=True, metavar="ID", help="the account's uuid")
    grant.add_argument("--budget", required=True, metavar="BUDGET_ID", help="the budget's uuid")
    grant.add_argument(
        "--amount", required=True, type=_positive, metavar="N", help="in the budget's unit"
    )
    grant.add_argument(
        "--expires-at",
        metavar="T",
        help="when the grant stops counting, ISO 8601 with offset (default: never)",
    )
    _add_correction_arguments(grant, "grant_credits' answer")
    listing = actions.add_parser(
        "list",
        help="an account's grants, newest first, and whether each still counts",
        description="Read an account's grants (tokentrack.credit_grants), newest first.",
    )
    listing.add_argument("--account", required=True, metavar="ID", help="the account's uuid")
    listing.add_argument("--budget", metavar="BUDGET_ID", help="only this budget's grants")
    _json(listing, "the grants")
    _add_database_url(listing)

    adjust = commands.add_parser(
        "adjust",
        help="add a signed correction to a budget's current window or the active period",
        description=(
            "Correct usage with tokentrack.adjust_usage (one record): --delta is added to the "
            "used amount of the budget's current window (--budget, in its unit) or, without "
            "--budget, to tokens_used of the account's active usage period. Never below 0."
        ),
    )
    adjust.set_defaults(run=_adjust)
    adjust.add_argument("--account", required=True, metavar="ID", help="the account's uuid")
    adjust.add_argument("--budget", metavar="BUDGET_ID", help="the budget (default: the period)")
    adjust.add_argument(
        "--delta", required=True, type=_integer, metavar="N", help="signed, not 0 (e.g. -500)"
    )
    _add_correction_arguments(adjust, "adjust_usage's answer")

    refund = commands.add_parser(
        "refund",
        help="take a billed report's usage back out of every period and budget it was billed into",
        description=(
            "Refund a billed report with tokentrack.refund_report (one record, once per "
            "report): its billed tokens (and cost, in cost budgets) come back out of every "
            "usage period and budget window it was billed into."
        ),
    )
    refund.set_defaults(run=_refund)
    refund.add_argument("--account", required=True, metavar="ID", help="the account's uuid")
    refund.add_argument("--report", required=True, metavar="REPORT_ID", help="the report's uuid")
    _add_correction_arguments(refund, "refund_report's answer")


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _print_lines(lines: Sequence[str]) -> None:
    for line in lines:
        print(line, flush=True)


def _print_status(status: migrate.Status) -> None:
    rows = status.versions
    width = max([len(r.name) for r in rows] + [4])
    print(f"{'VERSION':<14}  {'NAME':<{width}}  {'STATUS':<8}  APPLIED AT")
    for row in rows:
        applied_at = row.applied_at.isoformat(timespec="seconds") if row.applied_at else "-"
        line = f"{row.version:<14}  {row.name:<{width}}  {row.status:<8}  {applied_at}"
        if row.changed_files:
            line += f"  changed: {', '.join(row.changed_files)}"
        print(line)
    if status.functions:
        width = max(len(f.path) for f in status.functions)
        print()
        print(f"{'FUNCTION FILE':<{width}}  {'STATUS':<8}  RECORDED AT")
        for fn in status.functions:
            recorded = fn.applied_at.isoformat(timespec="seconds") if fn.applied_at else "-"
            print(f"{fn.path:<{width}}  {fn.status:<8}  {recorded}")


@_in_event_loop
async def _migrate(args: argparse.Namespace) -> int:
    action: str = args.action
    try:
        if action == "install":
            result = await migrate.install(_database_url(args), wait_notice=_stderr)
            _print_lines(result.lines())
        elif action == "rollback":
            undone = await migrate.rollback(
                _database_url(args),
                steps=args.steps,
                to=args.to,
                wait_notice=_stderr,
                archive=args.archive,
            )
            _print_lines(undone.lines())
        elif action == "list":
            _print_status(await migrate.status(_database_url(args)))
        elif action == "sql":
            if args.pending:
                plan = await migrate.pending_plan(_database_url(args))
            else:
                plan = migrate.fresh_plan()
            sys.stdout.write(migrate.render_sql(plan))
        else:  # pragma: no cover - argparse rejects unknown actions
            raise CommandError(f"unknown migrate action {action!r}")
    except migrate.MigrationError as exc:
        if exc.result is not None:  # what was applied before the failure stays applied
            _print_lines(exc.result.lines()[:-1])
        raise
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from tokentrack_client import demo  # imported here: it pulls in the throwaway server

    try:
        return demo.main(args.database_url)  # never $DATABASE_URL: see demo.main
    except (demo.DemoError, demo.PostgresServerError) as exc:
        raise CommandError(str(exc)) from exc


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, default=str))


@_in_event_loop
async def _audit(args: argparse.Namespace) -> int:
    dsn = _database_url(args)
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


@_in_event_loop
async def _verify(args: argparse.Namespace) -> int:
    dsn = _database_url(args)
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


@_in_event_loop
async def _monitor(args: argparse.Namespace) -> int:
    thresholds = monitor.Thresholds(
        hours=args.hours,
        full=args.full,
        stale_alert_count=args.stale_alert_count,
        failure_rate_max=args.max_failure_rate,
        completion_rate_min=args.min_completion_rate,
        min_reports=args.min_reports,
    )
    result = await monitor.monitor(_database_url(args), thresholds)
    if args.json:
        print(result.render_json())
    elif args.prometheus:
        sys.stdout.write(result.render_prometheus())
    else:
        print(result.render())
    return EXIT_FAILED if result.firing else EXIT_OK


def _exporter(args: argparse.Namespace) -> int:
    from tokentrack_client.ops import exporter  # prometheus_client is an optional extra

    host, port = args.listen
    settings = exporter.Settings(
        dsn=_database_url(args),
        host=host,
        port=port,
        min_interval=args.min_interval,
        query_timeout=args.query_timeout,
        hours=args.hours,
        top_accounts=args.top_accounts,
        top_subjects=args.top_subjects,
        reconcile_interval=args.reconcile_interval,
        reconcile_timeout=args.reconcile_timeout,
        reconcile_full=args.reconcile_full,
    )
    return exporter.run(settings)


@_in_event_loop
async def _cleanup(args: argparse.Namespace) -> int:
    swept = await sweep.run(_database_url(args), batch_size=args.batch_size)
    if args.json:
        _print_json(swept.as_json())
    else:
        print(swept.render())
    return EXIT_OK


@_in_event_loop
async def _cron(args: argparse.Namespace) -> int:
    dsn = _database_url(args)
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


@_in_event_loop
async def _prices(args: argparse.Namespace) -> int:
    dsn = _database_url(args)
    result: prices.ImportResult | prices.PriceList
    if args.action == "import":
        result = await prices.import_prices(
            dsn, args.file, provider=args.provider, model=args.model, dry_run=args.dry_run
        )
    else:
        result = await prices.list_prices(dsn, model=args.model)
    print(prices.dumps(result.as_json()) if args.json else result.render())
    return EXIT_OK


@_in_event_loop
async def _budgets(args: argparse.Namespace) -> int:
    dsn = _database_url(args)
    result: budgets.SetBudgetResult | budgets.BudgetList | budgets.BudgetDetail
    if args.action == "set":
        result = await budgets.set_budget(
            dsn,
            args.account,
            args.subject,
            args.unit,
            args.window,
            args.limit,
            timezone=args.timezone,
            thresholds=args.thresholds,
        )
    elif args.action == "list":
        result = await budgets.list_budgets(dsn, args.account)
    else:
        result = await budgets.show_budget(dsn, args.account, args.budget, windows=args.windows)
    if args.json:
        _print_json(result.as_json())
    else:
        print(result.render())
    return EXIT_OK


@_in_event_loop
async def _credits(args: argparse.Namespace) -> int:
    dsn = _database_url(args)
    result: credits.GrantResult | credits.CreditList
    if args.action == "grant":
        result = await credits.grant_credits(
            dsn,
            args.account,
            args.budget,
            args.amount,
            expires_at=credits.parse_expiry(args.expires_at),
            idempotency_key=args.key,
            reason=args.reason,
        )
    else:
        result = await credits.list_credits(dsn, args.account, args.budget)
    if args.json:
        _print_json(result.as_json())
    else:
        print(result.render())
    return EXIT_OK


@_in_event_loop
async def _adjust(args: argparse.Namespace) -> int:
    result = await credits.adjust_usage(
        _database_url(args),
        args.account,
        args.delta,
        budget_id=args.budget,
        idempotency_key=args.key,
        reason=args.reason,
    )
    if args.json:
        _print_json(result.as_json())
    else:
        print(result.render())
    return EXIT_OK


@_in_event_loop
async def _refund(args: argparse.Namespace) -> int:
    result = await credits.refund_report(
        _database_url(args), args.report, args.account, idempotency_key=args.key, reason=args.reason
    )
    if args.json:
        _print_json(result.as_json())
    else:
        print(result.render())
    return EXIT_OK


@_in_event_loop
async def _notifications(args: argparse.Namespace) -> int:
    def line(text: str) -> None:
        print(text, flush=True)

    await notifications.deliver(
        _database_url(args),
        args.consumer,
        follow=args.follow,
        limit=args.limit,
        lease=args.lease,
        poll_interval=args.poll_interval,
        line=line,
        notice=lambda text: _stderr(f"tokentrack: notice: {text}"),
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tokentrack`` command; return its exit status (0 ok, 1 check failed, 2 error)."""
    args = build_parser().parse_args(argv)
    run: Handler = args.run
    try:
        with connection.connect_timeout_of(getattr(args, "connect_timeout", None)):
            return run(args)
    except CommandError as exc:
        print(f"tokentrack: error: {exc.line}", file=sys.stderr)
        return exc.exit_code
    except DATABASE_ERRORS as exc:  # what a command did not turn into a CommandError itself
        url = getattr(args, "database_url", None) or os.environ.get("DATABASE_URL")
        where = f"{describe_target(url)}: " if url else ""
        print(f"tokentrack: error: {where}{failure_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("tokentrack: error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
