"""Test infrastructure: one real PostgreSQL server per session, one fresh database per test.

The session starts its own PostgreSQL (``initdb`` as the ``postgres`` OS user when run as
root, in a fresh temporary directory on /dev/shm when it has room, else under /tmp, or
under ``$TOKENTRACK_TEST_TMPDIR``; trust authentication, 127.0.0.1 only, a free port,
``fsync=off``) and stops it and removes the directory at the end, or uses the server of
``$TOKENTRACK_TEST_DSN`` when that is set.

pytest-postgresql's ``postgresql_noproc`` factory, wired to that server through
``depends_on="pg_server"``, builds one template database with every tokentrack version
installed by the migrator. Each test then gets a new database cloned from it
(``CREATE DATABASE ... TEMPLATE``), dropped after the test, so no test re-runs migrations.

Fixtures:

``pg_server``     the server (session): ``host``, ``port``, ``user``, ``dsn(dbname)``,
                  ``bin(name)`` for the matching ``pg_dump``/``psql``.
``db_dsn``        DSN of a fresh database with tokentrack installed.
``empty_db_dsn``  DSN of a fresh empty database (from ``template0``).
``make_database`` async factory for more fresh databases in one test.
``conn``          an asyncpg connection to ``db_dsn``, closed after the test.
``connect``       async factory of more asyncpg connections to ``db_dsn``, all closed after.
``schema_dump``   ``schema_dump(dsn) -> str``: normalised ``pg_dump --schema-only``.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from psycopg.conninfo import conninfo_to_dict
from pytest_postgresql import factories
from pytest_postgresql.executors.noop import NoopExecutor
from pytest_postgresql.janitor import AsyncDatabaseJanitor

from tokentrack_client import migrate

PG_MAJOR = "15"
SERVER_START_TIMEOUT = 60.0


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


def _major(bindir: Path) -> int:
    name = bindir.parent.name
    return int(name) if name.isdigit() else 0


def find_pg_bindir() -> Path:
    """Directory of the PostgreSQL server binaries (pg_ctl, pg_dump, psql...)."""
    candidates: list[Path] = []
    env = os.environ.get("TOKENTRACK_PG_BINDIR")
    if env:
        candidates.append(Path(env))
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))
    candidates.append(Path(f"/usr/lib/postgresql/{PG_MAJOR}/bin"))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_major, reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for candidate in candidates:
        if (candidate / "pg_ctl").is_file():
            return candidate
    raise RuntimeError(
        "PostgreSQL server binaries not found (looked for pg_ctl via TOKENTRACK_PG_BINDIR, "
        f"pg_config --bindir, /usr/lib/postgresql/{PG_MAJOR}/bin and PATH); "
        "run `make test`, which installs PostgreSQL"
    )


@dataclass
class PgServer:
    """Where the test server listens; duck-types what ``postgresql_noproc(depends_on=)`` reads."""

    host: str
    port: int
    user: str
    bindir: Path
    password: str | None = None
    options: str = ""
    maintenance_dbname: str = "postgres"
    template_dbname: str = "template0"  # what the noproc template database is created from

    def dsn(self, dbname: str) -> str:
        """asyncpg/libpq URL of ``dbname`` on this server."""
        auth = quote(self.user, safe="")
        if self.password:
            auth += ":" + quote(self.password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def bin(self, name: str) -> str:
        """Path of the PostgreSQL client program ``name`` (pg_dump, psql...)."""
        return str(self.bindir / name)

    def client_env(self) -> dict[str, str]:
        """Environment for client programs (password through PGPASSWORD, never argv)."""
        env = dict(os.environ)
        if self.password:
            env["PGPASSWORD"] = self.password
        return env


def _scratch_root() -> str:
    """Where the test cluster lives: ``$TOKENTRACK_TEST_TMPDIR``, else RAM, else /tmp.

    Cloning the template database is about ten times faster on tmpfs (/dev/shm) than on
    a disk, which is most of the suite's run time; /dev/shm is used when it has room.
    """
    chosen = os.environ.get("TOKENTRACK_TEST_TMPDIR")
    if chosen:
        return chosen
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= 2**30:
            return str(shm)
    except OSError:
        pass
    return "/tmp"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _as_postgres(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run server programs as the postgres OS user."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


def _run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}): {result.stderr or result.stdout}")


def _wait_ready(bindir: Path, host: str, port: int, user: str) -> None:
    """Wait until pg_isready says the server accepts connections.

    ``pg_ctl start -w`` has already waited for the postmaster; pg_isready is the gate that
    says the server answers on 127.0.0.1. It has no wait mode of its own (it answers at once
    while the server is still refusing), hence the short pause between probes.
    """
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    argv = [str(bindir / "pg_isready"), "-h", host, "-p", str(port), "-U", user, "-t", "5"]
    argv += ["-d", "postgres"]
    while True:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL on {host}:{port} not ready: {result.stdout.strip()}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server for the whole session (or the one of ``$TOKENTRACK_TEST_DSN``)."""
    external = os.environ.get("TOKENTRACK_TEST_DSN")
    if external:
        params = conninfo_to_dict(external)
        yield PgServer(
            host=str(params.get("host", "127.0.0.1")),
            port=int(params.get("port", 5432)),
            user=str(params.get("user", "postgres")),
            password=str(params["password"]) if params.get("password") else None,
            maintenance_dbname=str(params.get("dbname", "postgres")),
            bindir=find_pg_bindir(),
        )
        return

    bindir = find_pg_bindir()
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError(
                "running as root but there is no 'postgres' OS user to run the test server "
                "as; install Debian's postgresql package (make test does)"
            ) from None
    base = Path(tempfile.mkdtemp(prefix="tokentrack-pg-", dir=_scratch_root()))
    datadir, logfile = base / "data", base / "postgres.log"
    port = _free_port()
    started = False
    try:
        if os.geteuid() == 0:
            shutil.chown(base, user="postgres", group="postgres")
        _run(
            _as_postgres(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(datadir),
                    "--auth=trust",
                    "--username=postgres",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            ),
            "initdb",
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(port),
            "unix_socket_directories": f"'{base}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "128MB",
            "log_min_messages": "warning",
            "timezone": "'UTC'",
        }
        with (datadir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# tokentrack test server\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        _run(
            _as_postgres(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(datadir),
                    "-l",
                    str(logfile),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            "pg_ctl start",
        )
        started = True
        _wait_ready(bindir, "127.0.0.1", port, "postgres")
        yield PgServer(host="127.0.0.1", port=port, user="postgres", bindir=bindir)
    finally:
        if started:
            subprocess.run(
                _as_postgres(
                    [str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "fast", "-w", "stop"]
                ),
                capture_output=True,
                check=False,
            )
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Template databases (pytest-postgresql noproc + janitor)
# --------------------------------------------------------------------------------------------


def _install_tokentrack(host: str, port: int, user: str, dbname: str, **kwargs: Any) -> None:
    """pytest-postgresql loader: install every tokentrack version with the migrator."""
    password = kwargs.get("password")
    server = PgServer(host=host, port=int(port), user=user, password=password, bindir=Path())
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            asyncio.run(migrate.install(server.dsn(dbname), echo=lambda _: None))
        except BaseException as exc:  # re-raised in the calling thread
            errors.append(exc)

    # A thread of its own so that asyncio.run never meets the test's running event loop.
    thread = threading.Thread(target=worker, name="tokentrack-template-install")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


tokentrack_template = factories.postgresql_noproc(
    dbname="tokentrack_test", load=[_install_tokentrack], depends_on="pg_server"
)
"""Session fixture: the template database ``tokentrack_test_tmpl`` with tokentrack installed."""


DatabaseFactory = Callable[..., Awaitable[str]]


@pytest.fixture
async def make_database(pg_server: PgServer) -> AsyncIterator[DatabaseFactory]:
    """Factory ``await make_database(template=None) -> dsn`` of fresh databases, dropped after.

    ``template`` is a template database name; ``None`` means an empty database from template0.
    """
    janitors: list[AsyncDatabaseJanitor] = []

    async def create(template: str | None = None) -> str:
        name = f"tt_{uuid.uuid4().hex[:16]}"
        janitor = AsyncDatabaseJanitor(
            user=pg_server.user,
            host=pg_server.host,
            port=pg_server.port,
            password=pg_server.password,
            dbname=name,
            template_dbname=template or "template0",
            maintenance_dbname=pg_server.maintenance_dbname,
        )
        await janitor.init()
        janitors.append(janitor)
        return pg_server.dsn(name)

    yield create
    for janitor in reversed(janitors):
        await janitor.drop()


@pytest.fixture
async def db_dsn(tokentrack_template: NoopExecutor, make_database: DatabaseFactory) -> str:
    """DSN of a fresh database cloned from the template with every tokentrack version."""
    return await make_database(tokentrack_template.template_dbname)


@pytest.fixture
async def empty_db_dsn(make_database: DatabaseFactory) -> str:
    """DSN of a fresh, empty database (from template0), for installer tests."""
    return await make_database()


# --------------------------------------------------------------------------------------------
# Connections
# --------------------------------------------------------------------------------------------


async def _close(connection: asyncpg.Connection) -> None:
    if connection.is_closed():
        return
    try:
        await asyncio.wait_for(connection.close(), timeout=5)
    except (TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresError, OSError):
        connection.terminate()


@pytest.fixture
async def conn(db_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """An asyncpg connection to ``db_dsn`` (tokentrack installed), closed after the test."""
    connection = await asyncpg.connect(db_dsn)
    try:
        yield connection
    finally:
        await _close(connection)


ConnectFactory = Callable[[], Awaitable[asyncpg.Connection]]


@pytest.fixture
async def connect(db_dsn: str) -> AsyncIterator[ConnectFactory]:
    """Factory ``await connect()`` of extra asyncpg connections to ``db_dsn``, closed after."""
    opened: list[asyncpg.Connection] = []

    async def factory() -> asyncpg.Connection:
        connection = await asyncpg.connect(db_dsn)
        opened.append(connection)
        return connection

    try:
        yield factory
    finally:
        await asyncio.gather(*(_close(c) for c in opened))


# --------------------------------------------------------------------------------------------
# Schema dumps
# --------------------------------------------------------------------------------------------

_VARYING_PREFIXES = ("--", "SET ", "SELECT pg_catalog.set_config(", "\\restrict", "\\unrestrict")


def normalise_dump(text: str) -> str:
    """Strip comments, blank lines and the session/`\\restrict` lines that vary between dumps."""
    lines = [line.rstrip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line and not line.startswith(_VARYING_PREFIXES))


SchemaDump = Callable[[str], str]


@pytest.fixture
def schema_dump(pg_server: PgServer) -> SchemaDump:
    """``schema_dump(dsn) -> str``: normalised ``pg_dump --schema-only`` of that database."""

    def dump(dsn: str) -> str:
        result = subprocess.run(
            [pg_server.bin("pg_dump"), "--schema-only", "--no-password", "-d", dsn],
            capture_output=True,
            text=True,
            check=False,
            env=pg_server.client_env(),
        )
        if result.returncode != 0:
            raise RuntimeError(f"pg_dump failed: {result.stderr}")
        return normalise_dump(result.stdout)

    return dump
