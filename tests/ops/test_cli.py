"""The one CLI front end: one error base class, one connection helper, one wording.

The migrator and the operations commands connect through ``tokentrack_client.connection``,
so a failure to connect reads the same whichever command met it; every error a command
reports is a ``CommandError``, which the CLI prints as one line with exit status 2.
"""

from __future__ import annotations

import socket
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from ops_history import run_cli_sync, tokentrack
from tokentrack_client import connection, migrate
from tokentrack_client.connection import CommandError, ConnectionFailed, describe_target
from tokentrack_client.ops import OpsError
from tokentrack_client.ops.sweep import CronUnavailable


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_every_command_error_derives_from_command_error() -> None:
    for error in (migrate.MigrationError, migrate.ApplyError, OpsError, CronUnavailable):
        assert issubclass(error, CommandError), error
    # The migrator's connection failure is both: `except MigrationError` callers still see it.
    assert issubclass(migrate.ConnectionFailed, migrate.MigrationError)
    assert issubclass(migrate.ConnectionFailed, ConnectionFailed)
    assert CommandError("first\n  second").line == "first second"
    assert CommandError("x").exit_code == 2


def test_the_target_never_shows_the_password() -> None:
    assert (
        describe_target("postgresql://ann:s3cr3t@db.example:6543/acc") == "ann@db.example:6543/acc"
    )
    assert describe_target("postgresql://h") == "h:5432/(default database)"
    assert describe_target("postgresql://h:notaport/x") == "the database"


@pytest.mark.parametrize(
    "command", [("migrate", "install"), ("migrate", "list"), ("verify",), ("monitor",)]
)
def test_one_wording_for_an_unreachable_server(command: tuple[str, ...]) -> None:
    port = _free_port()
    result = run_cli_sync(
        *command, "--database-url", f"postgresql://nobody:s3cr3t-pw@127.0.0.1:{port}/x"
    )
    assert result.code == 2
    assert result.out == ""
    assert result.err.startswith(
        f"tokentrack: error: cannot connect to nobody@127.0.0.1:{port}/x: "
    )
    assert result.err.count("\n") == 1
    assert "s3cr3t" not in result.err


@pytest.mark.parametrize("command", [("migrate", "list"), ("verify",), ("cleanup",)])
def test_one_wording_for_an_invalid_url(command: tuple[str, ...]) -> None:
    result = run_cli_sync(*command, "--database-url", "notaurl")
    assert (result.code, result.out) == (2, "")
    assert result.err == (
        "tokentrack: error: invalid DATABASE_URL: expected a URL like "
        "postgresql://user:password@host:5432/dbname\n"
    )


async def test_connect_names_the_command_and_close_is_idempotent(db_dsn: str) -> None:
    conn = await connection.connect(db_dsn, "tokentrack test")
    try:
        assert (
            await conn.fetchval("SELECT current_setting('application_name')") == "tokentrack test"
        )
    finally:
        await connection.close(conn)
    assert conn.is_closed()
    await connection.close(conn)  # closing twice neither raises nor hangs


async def test_a_refused_login_is_one_line_with_the_sqlstate(db_dsn: str) -> None:
    parts = urlsplit(db_dsn)
    stranger = parts._replace(netloc=f"no_such_role@{parts.hostname}:{parts.port}").geturl()
    result = await tokentrack("cleanup", "--database-url", stranger)
    assert result.code == 2
    assert result.err.startswith("tokentrack: error: cannot connect to no_such_role@")
    assert "SQLSTATE 28000" in result.err


def test_monitor_help_prints_percent_signs_once() -> None:
    result = run_cli_sync("monitor", "--help")
    assert result.code == 0
    text = " ".join(result.out.split())
    assert "a failure rate above 5% or a completion rate below 90%" in text
    assert "%%" not in result.out


# --------------------------------------------------------------------------------------------
# Packaging: what the operators' make targets install, and the wheel's metadata
# --------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("target", ["install-sql", "rollback-sql", "install-cron"])
def test_the_operators_make_targets_install_only_the_runtime_package(
    target: str, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"  # a fresh one: make must say how it would create it
    dry = subprocess.run(
        ["make", "-n", "-C", str(REPO), target, "DATABASE_URL=postgresql://x/db", f"VENV={venv}"],
        capture_output=True,
        text=True,
        check=True,
    )
    installs = [line for line in dry.stdout.splitlines() if "pip install" in line]
    assert installs, dry.stdout
    for line in installs:
        assert line.rstrip().endswith(" -e ."), line  # the package, not '.[dev]'
    assert "[dev]" not in dry.stdout
    assert f"{venv}/bin/tokentrack" in dry.stdout


def test_the_wheel_metadata_invents_no_license_or_url() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["keywords"]
    assert "Programming Language :: Python :: 3 :: Only" in project["classifiers"]
    # No LICENSE file and no public address: neither is claimed until the owner decides.
    assert not (REPO / "LICENSE").exists()
    assert "license" not in project
    assert "urls" not in project
