"""Every ``tokentrack`` subcommand that talks to a database fails the same way: one line
``tokentrack: error: ...`` on stderr and exit status 2, for a bad URL, a wrong password, an
unreachable host, a host that accepts the connection and never answers (bounded by the
connect timeout), and a role without privileges on the tokentrack schema.

The commands run in this process (the ``tokentrack`` runner of ops_history). The server is
one of this module's own: it asks ``tt_password`` for a password (the session's server
trusts every login), and its database has tokentrack installed and a baseline written.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from ops_history import CliResult, run_cli_sync, tokentrack
from tokentrack_client import migrate
from tokentrack_client.testing import PostgresServer, run_in_thread

PASSWORD_ROLE, PASSWORD = "tt_password", "right-pw-4711"
NOPRIV_ROLE = "tt_nopriv"
DBNAME = "tt_errors"
CONNECT_TIMEOUT = 0.5
"""The connect timeout the silent host is given (the default is 10 s)."""

# Every subcommand that needs a database; "{baseline}" is a baseline file written beforehand.
SUBCOMMANDS: dict[str, tuple[str, ...]] = {
    "migrate install": ("migrate", "install"),
    "migrate rollback": ("migrate", "rollback"),
    "migrate list": ("migrate", "list"),
    "migrate sql --pending": ("migrate", "sql", "--pending"),
    "audit baseline": ("audit", "baseline", "--out", "{out}"),
    "audit compare": ("audit", "compare", "{baseline}"),
    "verify": ("verify",),
    "monitor": ("monitor",),
    "cleanup": ("cleanup",),
    "cron install": ("cron", "install"),
    "cron remove": ("cron", "remove"),
    "cron status": ("cron", "status"),
    "demo --database-url": ("demo",),
    "prices import": ("prices", "import", "{prices}"),
    "prices list": ("prices", "list"),
    "budgets set": (
        "budgets",
        "set",
        "--account",
        "{account}",
        "--unit",
        "tokens",
        "--window",
        "day",
        "--limit",
        "1000",
    ),
    "budgets list": ("budgets", "list", "--account", "{account}"),
    "budgets show": ("budgets", "show", "--account", "{account}", "--budget", "{budget}"),
}
PRICES = Path(__file__).parent / "fixtures" / "litellm_prices.json"
ACCOUNT, BUDGET = "5b0c6f7e-2d4a-4e8f-9a31-0c1d2e3f4a5b", "9e8d7c6b-5a49-4382-b1a0-f9e8d7c6b5a4"


@dataclass(frozen=True)
class Target:
    """The module's server and what the failure kinds need from it."""

    server: PostgresServer
    baseline: Path

    def url(self, user: str, password: str | None = None) -> str:
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@{self.server.host}:{self.server.port}/{DBNAME}"


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    baseline = tmp_path_factory.mktemp("cli-errors") / "baseline.json"
    with PostgresServer(prefix="tokentrack-cli-errors-") as server:

        async def prepare() -> None:
            dsn = await server.create_database(DBNAME)
            await migrate.install(dsn)
            admin = await asyncpg.connect(dsn)
            try:
                await admin.execute(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD '{PASSWORD}'")
                await admin.execute(f"CREATE ROLE {NOPRIV_ROLE} LOGIN")
            finally:
                await admin.close()
            # tt_password must give its password (scram); everyone else is trusted.
            hba = server.datadir / "pg_hba.conf"
            rule = f"host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n"
            hba.write_text(rule + hba.read_text())
            admin = await asyncpg.connect(dsn)
            try:
                await admin.execute("SELECT pg_reload_conf()")
            finally:
                await admin.close()

        run_in_thread(prepare)
        written = run_cli_sync(
            "audit", "baseline", "--out", str(baseline), "--database-url", server.dsn(DBNAME)
        )
        assert written.code == 0, written
        yield Target(server, baseline)


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A loopback port whose listener accepts every connection and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # never written to, closed at the end of the test

    listener = await asyncio.start_server(hold, "127.0.0.1", 0)
    port: int = listener.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        for writer in held:
            writer.close()
        listener.close()
        await listener.wait_closed()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _argv(command: tuple[str, ...], target: Target, tmp_path: Path) -> list[str]:
    out = str(tmp_path / "new-baseline.json")
    return [
        a.format(out=out, baseline=target.baseline, prices=PRICES, account=ACCOUNT, budget=BUDGET)
        for a in command
    ]


def assert_one_line(result: CliResult, *fragments: str) -> str:
    """Exit 2, one line ``tokentrack: error: ...`` with every fragment, no traceback."""
    assert result.code == 2, result
    assert "Traceback" not in result.out + result.err, result
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("tokentrack: error: "), result.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


COMMANDS = pytest.mark.parametrize("command", list(SUBCOMMANDS.values()), ids=list(SUBCOMMANDS))


@COMMANDS
async def test_a_bad_url_is_one_line(
    command: tuple[str, ...], target: Target, tmp_path: Path
) -> None:
    url = "mysql://someone@localhost/db"
    result = await tokentrack(*_argv(command, target, tmp_path), "--database-url", url)
    assert_one_line(result, "invalid DATABASE_URL")


@COMMANDS
async def test_a_wrong_password_is_one_line(
    command: tuple[str, ...], target: Target, tmp_path: Path
) -> None:
    url = target.url(PASSWORD_ROLE, "wrong-pw-0815")
    result = await tokentrack(*_argv(command, target, tmp_path), "--database-url", url)
    line = assert_one_line(result, "cannot connect", f"{PASSWORD_ROLE}@", "28P01")
    assert "wrong-pw-0815" not in result.out + result.err
    assert "password" in line


@COMMANDS
async def test_an_unreachable_host_is_one_line(
    command: tuple[str, ...], target: Target, tmp_path: Path
) -> None:
    port = _free_port()
    url = f"postgresql://someone:s3cr3t@127.0.0.1:{port}/db"
    result = await tokentrack(*_argv(command, target, tmp_path), "--database-url", url)
    assert_one_line(result, "cannot connect", f"someone@127.0.0.1:{port}/db")
    assert "s3cr3t" not in result.out + result.err


@COMMANDS
async def test_a_host_that_never_answers_is_bounded_by_the_connect_timeout(
    command: tuple[str, ...], target: Target, tmp_path: Path, silent_port: int
) -> None:
    url = f"postgresql://someone@127.0.0.1:{silent_port}/db"
    started = time.monotonic()
    result = await tokentrack(
        *_argv(command, target, tmp_path),
        "--database-url",
        url,
        "--connect-timeout",
        str(CONNECT_TIMEOUT),
    )
    elapsed = time.monotonic() - started
    assert_one_line(result, "cannot connect", f"127.0.0.1:{silent_port}", "no answer within 0.5 s")
    assert elapsed < CONNECT_TIMEOUT + 5, elapsed


@COMMANDS
async def test_a_role_without_privileges_is_one_line(
    command: tuple[str, ...], target: Target, tmp_path: Path
) -> None:
    url = target.url(NOPRIV_ROLE)
    result = await tokentrack(*_argv(command, target, tmp_path), "--database-url", url)
    line = assert_one_line(result)
    if command[0] != "cron":  # cron may answer that pg_cron is not there, in its own words
        assert f"{NOPRIV_ROLE}@" in line
        assert "42501" in line


async def test_the_connect_timeout_comes_from_the_environment_too(
    monkeypatch: pytest.MonkeyPatch, silent_port: int
) -> None:
    monkeypatch.setenv("TOKENTRACK_CONNECT_TIMEOUT", "0.5")
    url = f"postgresql://someone@127.0.0.1:{silent_port}/db"
    started = time.monotonic()
    result = await tokentrack("migrate", "list", "--database-url", url)
    assert_one_line(result, "no answer within 0.5 s")
    assert time.monotonic() - started < CONNECT_TIMEOUT + 5


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_a_bad_connect_timeout_is_one_line(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TOKENTRACK_CONNECT_TIMEOUT", value)
    result = run_cli_sync("migrate", "list", "--database-url", "postgresql://h/db")
    assert_one_line(result, "TOKENTRACK_CONNECT_TIMEOUT", "a positive number of seconds")
