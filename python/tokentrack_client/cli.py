"""The ``tokentrack`` command line.

::

    tokentrack migrate install   [--database-url URL]
    tokentrack migrate rollback  [--steps N] [--database-url URL]
    tokentrack migrate list      [--database-url URL]
    tokentrack migrate sql       [--pending --database-url URL]
    tokentrack demo
    tokentrack audit baseline --out FILE | audit compare FILE
    tokentrack verify [--functional] [--upto VERSION]
    tokentrack monitor [--json | --prometheus]
    tokentrack cleanup [--batch-size N]
    tokentrack cron install | remove | status

The database comes from ``--database-url`` or the ``DATABASE_URL`` environment variable.
Every failure prints one line ``tokentrack: error: ...`` on stderr and exits with status 2.
The checking commands (audit compare, verify, monitor) exit with status 1 when a check
fails, an alert fires or a figure that must not change changed (see docs/RUNBOOK.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from tokentrack_client import __version__, migrate
from tokentrack_client.ops import commands as ops_commands

EXIT_OK = 0
EXIT_ERROR = 2


class CliError(Exception):
    """A usage problem found after parsing (e.g. no database given)."""


def _database_url(args: argparse.Namespace) -> str:
    url: str | None = args.database_url or os.environ.get("DATABASE_URL")
    if not url:
        raise CliError("no database given: pass --database-url URL or set DATABASE_URL")
    return url


def _add_database_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help="postgresql://user:password@host:port/dbname (default: $DATABASE_URL)",
    )


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``tokentrack`` command."""
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
            "definition recorded before it."
        ),
    )
    rollback.add_argument(
        "--steps", type=int, default=1, metavar="N", help="how many versions (default: 1)"
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
        help="run the four report types on a throwaway PostgreSQL (or DATABASE_URL)",
        description=(
            "Run the four report types on several accounts at once (one cancelled from "
            "outside, one failed, two racing for one budget), print what was billed and "
            "reconcile's verdict. Without a database URL it starts a throwaway PostgreSQL in "
            "a temporary directory and removes it on exit, Ctrl-C included."
        ),
    )
    _add_database_url(demo_parser)
    ops_commands.add_commands(commands)
    return parser


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


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _print_lines(lines: Sequence[str]) -> None:
    for line in lines:
        print(line, flush=True)


async def _run_migrate(args: argparse.Namespace) -> int:
    action: str = args.action
    try:
        if action == "install":
            result = await migrate.install(_database_url(args), wait_notice=_stderr)
            _print_lines(result.lines())
        elif action == "rollback":
            undone = await migrate.rollback(
                _database_url(args), steps=args.steps, wait_notice=_stderr
            )
            _print_lines(undone.lines())
        elif action == "list":
            _print_status(await migrate.status(_database_url(args)))
        elif action == "sql":
            if args.pending:
                plan: migrate.InstallPlan | list[migrate.MigrationVersion]
                plan = await migrate.pending_plan(_database_url(args))
            else:
                plan = migrate.load_versions()
            sys.stdout.write(migrate.render_sql(plan))
        else:  # pragma: no cover - argparse rejects unknown actions
            raise CliError(f"unknown migrate action {action!r}")
    except migrate.MigrationError as exc:
        if exc.result is not None:  # what was applied before the failure stays applied
            _print_lines(exc.result.lines()[:-1])
        raise
    return EXIT_OK


def _one_line(message: str) -> str:
    return " ".join(message.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tokentrack`` command; return its exit status (0 ok, 2 error)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "migrate":
            return asyncio.run(_run_migrate(args))
        if args.command in ops_commands.COMMANDS:
            return ops_commands.run(args)
        if args.command == "demo":
            from tokentrack_client import demo  # imported here: it pulls in the throwaway server

            try:
                return demo.main(args.database_url or os.environ.get("DATABASE_URL"))
            except (demo.DemoError, demo.PostgresServerError) as exc:
                raise CliError(str(exc)) from exc
        raise CliError(f"unknown command {args.command!r}")  # pragma: no cover
    except (migrate.MigrationError, CliError, ops_commands.OpsError) as exc:
        print(f"tokentrack: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("tokentrack: error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
