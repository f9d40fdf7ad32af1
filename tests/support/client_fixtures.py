"""Fixtures of the client tests (registered by ``pytest_plugins`` in conftest.py).

``tracker``         a ``TokenTracker`` over ``pool`` (the plugin's) with a fast retry policy.
``pgbouncer``       Debian's PgBouncer (session), transaction pooling, in front of ``pg_server``.
``bouncer_pool``    an asyncpg pool to ``db_dsn`` through ``pgbouncer`` (statement_cache_size=0).
``fault_proxy``     a TCP proxy in front of ``pg_server`` that can cut a connection right after
                    the server answered a COMMIT (the call committed; the client never hears).
``own_server``      a PostgreSQL server of its own (session) with tokentrack installed, for
                    tests that shut it down or change its settings; running at each test's
                    start.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tokentrack_client import RetryPolicy, TokenTracker, migrate
from tokentrack_client.testing import (
    PostgresServer,
    PostgresServerError,
    find_bindir,
    free_port,
    run_in_thread,
)

FAST_RETRY = RetryPolicy(max_attempts=6, initial_delay=0.01, max_delay=0.2)
"""Retries fast enough for tests, with the same shape as the default policy."""


def with_port(dsn: str, host: str, port: int) -> str:
    """The same URL pointing at ``host:port`` (user and database unchanged)."""
    parts = urlsplit(dsn)
    user = parts.netloc.rpartition("@")[0]
    netloc = f"{user}@{host}:{port}" if user else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
def tracker(pool: asyncpg.Pool[Any]) -> TokenTracker:
    """A TokenTracker over ``pool``."""
    return TokenTracker(pool, retry=FAST_RETRY)


# --------------------------------------------------------------------------------------------
# A server of the tests' own, to shut down
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OwnServer:
    """A server started for these tests, and the URL of its database with tokentrack."""

    server: PostgresServer
    dsn: str


@pytest.fixture(scope="session")
def _own_server() -> Iterator[OwnServer]:
    try:
        find_bindir()
    except PostgresServerError as exc:
        pytest.skip(f"these tests start a server of their own: {exc}")
    with PostgresServer(prefix="tokentrack-pg-own-") as server:

        async def build() -> str:
            dsn = await server.create_database("tokentrack_own")
            await migrate.install(dsn)
            return dsn

        yield OwnServer(server, run_in_thread(build))


@pytest.fixture
def own_server(_own_server: OwnServer) -> OwnServer:
    """A server of its own (never the session's shared one, whose other tests would fail
    while it is down), started again if a previous test left it down."""
    if not _own_server.server.running():
        _own_server.server.restart()
    return _own_server


# --------------------------------------------------------------------------------------------
# PgBouncer
# --------------------------------------------------------------------------------------------


def find_pgbouncer() -> str | None:
    """Debian's pgbouncer binary, if installed."""
    return shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None
    )


class PgBouncer:
    """A PgBouncer process in transaction pooling mode that this test session started."""

    def __init__(self, binary: str, server_host: str, server_port: int, pg_isready: str) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.pool_size = 3
        self._dir = Path(tempfile.mkdtemp(prefix="tokentrack-pgbouncer-"))
        config = self._dir / "pgbouncer.ini"
        (self._dir / "userlist.txt").write_text('"postgres" ""\n', encoding="utf-8")
        config.write_text(
            "\n".join(
                [
                    "[databases]",
                    f"* = host={server_host} port={server_port}",
                    "[pgbouncer]",
                    f"listen_addr = {self.host}",
                    f"listen_port = {self.port}",
                    "unix_socket_dir =",
                    "auth_type = trust",
                    f"auth_file = {self._dir / 'userlist.txt'}",
                    "pool_mode = transaction",
                    # Few server connections for many clients: calls of different clients
                    # really share server connections, which is where the traps are.
                    f"default_pool_size = {self.pool_size}",
                    "max_client_conn = 200",
                    "server_reset_query =",
                    "ignore_startup_parameters = extra_float_digits",
                    f"logfile = {self._dir / 'pgbouncer.log'}",
                    "",
                ]
            ),
            encoding="utf-8",
        )
        argv = [binary, str(config)]
        if os.geteuid() == 0:
            # PgBouncer refuses to run as root; -u switches to the postgres user itself, so
            # that the process we start (and stop) is pgbouncer and not a wrapper.
            shutil.chown(self._dir, user="postgres", group="postgres")
            for path in self._dir.iterdir():
                shutil.chown(path, user="postgres", group="postgres")
            argv = [binary, "-u", "postgres", str(config)]
        self.process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        self._wait_ready(pg_isready)

    def _wait_ready(self, pg_isready: str) -> None:
        deadline = time.monotonic() + 30
        argv = [pg_isready, "-h", self.host, "-p", str(self.port), "-U", "postgres"]
        argv += ["-d", "postgres", "-t", "5"]
        while True:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"pgbouncer exited with {self.process.returncode}: {err}")
            if subprocess.run(argv, capture_output=True, check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pgbouncer on port {self.port} did not become ready")
            time.sleep(0.05)

    def dsn(self, database_dsn: str) -> str:
        """The URL of ``database_dsn``'s database through this PgBouncer."""
        return with_port(database_dsn, self.host, self.port)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process.stderr:
            self.process.stderr.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pgbouncer(pg_server: PostgresServer) -> Iterator[PgBouncer]:
    """PgBouncer in transaction pooling mode in front of the test server (session)."""
    binary = find_pgbouncer()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("pgbouncer is not installed (.ci/run installs Debian's pgbouncer)")
        pytest.skip("pgbouncer is not installed: `apt-get install pgbouncer` (make test does)")
    bouncer = PgBouncer(binary, pg_server.host, pg_server.port, pg_server.bin("pg_isready"))
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
async def bouncer_pool(pgbouncer: PgBouncer, db_dsn: str) -> AsyncIterator[asyncpg.Pool[Any]]:
    """A pool to the test database through PgBouncer, as callers must create it there."""
    created = await asyncpg.create_pool(
        pgbouncer.dsn(db_dsn), min_size=1, max_size=12, statement_cache_size=0
    )
    try:
        yield created
    finally:
        await asyncio.wait_for(created.close(), timeout=10)


# --------------------------------------------------------------------------------------------
# A TCP proxy that loses a COMMIT's answer
# --------------------------------------------------------------------------------------------

# CommandComplete for COMMIT: 'C', int32 length (4 + len("COMMIT\0") = 11), "COMMIT\0".
COMMIT_COMPLETE = b"C\x00\x00\x00\x0bCOMMIT\x00"
# A call made as a statement of its own (no BEGIN): asyncpg's Execute asks for one row, so the
# call's answer ends with PortalSuspended ('s', length 4), and its transaction commits at the
# Sync that follows, before the server answers ReadyForQuery, idle ('Z', length 5, 'I').
# (Inside BEGIN the ReadyForQuery says 'T'; the pool's reset query ends with CommandComplete.)
IMPLICIT_COMMIT_COMPLETE = b"s\x00\x00\x00\x04Z\x00\x00\x00\x05I"


class FaultProxy:
    """Forwards TCP connections to PostgreSQL; ``cut_after_commit()`` arms it to drop the next
    connection whose server answers a COMMIT (or a call that committed as a statement of its
    own), without passing the answer on: the transaction committed, the client sees a broken
    connection."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.host = "127.0.0.1"
        self.port = 0
        self.cuts = 0
        self._armed = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut_after_commit(self) -> None:
        """Drop the next connection that receives a COMMIT's CommandComplete."""
        self._armed = True

    def dsn(self, database_dsn: str) -> str:
        """The URL of ``database_dsn``'s database through this proxy."""
        return with_port(database_dsn, self.host, self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        pair = (writer, up_writer)
        task_up = asyncio.create_task(self._pump(reader, up_writer, pair, inspect=False))
        task_down = asyncio.create_task(self._pump(up_reader, writer, pair, inspect=True))
        self._tasks.update((task_up, task_down))
        await asyncio.gather(task_up, task_down, return_exceptions=True)
        self._tasks.difference_update((task_up, task_down))

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        *,
        inspect: bool,
    ) -> None:
        try:
            while data := await source.read(65536):
                if (
                    inspect
                    and self._armed
                    and (COMMIT_COMPLETE in data or IMPLICIT_COMMIT_COMPLETE in data)
                ):
                    self._armed = False
                    self.cuts += 1
                    break
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in pair:
                w.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


@pytest.fixture
async def fault_proxy(pg_server: PostgresServer) -> AsyncIterator[FaultProxy]:
    """A FaultProxy in front of the test server, closed after the test."""
    proxy = FaultProxy(pg_server.host, pg_server.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


# --------------------------------------------------------------------------------------------
# Helpers of the client tests
# --------------------------------------------------------------------------------------------

USAGE = {
    "AN0": (2_100, 340),
    "AN1.5": (7_400, 1_150),
    "AN1.7": (4_200, 720),
    "AN2": (15_300, 2_210),
    "AN3": (8_800, 1_300),
    "AN4": (11_000, 1_640),
    "AN5": (5_600, 3_100),
}
"""(input, output) tokens of each step in the scripted generators."""


def cost(*steps: str) -> int:
    """Total tokens of ``steps`` under USAGE."""
    return sum(USAGE[s][0] + USAGE[s][1] for s in steps)


class GatedLLM:
    """A stand-in LLM whose calls can be held: ``hold(step)`` makes the call of ``step`` wait
    until ``release(step)``; ``started(step)`` is set as soon as that call began."""

    def __init__(self) -> None:
        self._gates: dict[str, asyncio.Event] = {}
        self._started: dict[str, asyncio.Event] = {}
        self.calls: list[str] = []

    def hold(self, step: str) -> None:
        self._gates[step] = asyncio.Event()

    def release(self, step: str) -> None:
        self._gates[step].set()

    def started(self, step: str) -> asyncio.Event:
        return self._started.setdefault(step, asyncio.Event())

    async def call(self, step: str) -> tuple[int, int]:
        self.calls.append(step)
        self.started(step).set()
        gate = self._gates.get(step)
        if gate is not None:
            await gate.wait()
        return USAGE[step]


async def run_steps(report: Any, llm: GatedLLM, steps: tuple[str, ...]) -> None:
    """The body of a generator: call the LLM for each step and record it."""
    for step in steps:
        inputs, outputs = await llm.call(step)
        await report.step(step, input_tokens=inputs, output_tokens=outputs, model="gpt-4o")


async def report_state(conn: asyncpg.Connection, report_id: Any) -> dict[str, Any]:
    """Everything the database holds about one report, for assertions."""
    report = await conn.fetchrow(
        "SELECT status, error_message, token_usage::text AS token_usage"
        " FROM tokentrack.reports WHERE id = $1",
        report_id,
    )
    reservation = await conn.fetchrow(
        "SELECT status, reserved_tokens, billed_tokens FROM tokentrack.report_reservations"
        " WHERE report_id = $1",
        report_id,
    )
    steps = await conn.fetch(
        "SELECT step_name, total_tokens, late, billed_at IS NOT NULL AS billed"
        " FROM tokentrack.report_step_usage WHERE report_id = $1 ORDER BY completed_at, step_name",
        report_id,
    )
    ledger = await conn.fetch(
        "SELECT kind, tokens, reports FROM tokentrack.usage_ledger WHERE report_id = $1"
        " ORDER BY id",
        report_id,
    )
    return {
        "status": report["status"] if report else None,
        "error_message": report["error_message"] if report else None,
        "token_usage": json.loads(report["token_usage"])
        if report and report["token_usage"]
        else None,
        "reservation": dict(reservation) if reservation else None,
        "steps": {s["step_name"]: dict(s) for s in steps},
        "ledger": [dict(r) for r in ledger],
    }


async def wait_for_backend(
    conn: asyncpg.Connection,
    function: str,
    *,
    waiting: bool = True,
    exclude: set[int] | None = None,
) -> int:
    """The pid of the backend that runs ``tokentrack.<function>`` (waiting on a lock when
    ``waiting``), polling pg_stat_activity for at most 10 seconds."""
    deadline = time.monotonic() + 10
    while True:
        pids = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND state = 'active' AND query LIKE $1"
            " AND ($2 = false OR wait_event_type = 'Lock')",
            f"%tokentrack.{function}(%",
            waiting,
        )
        found = [r["pid"] for r in pids if r["pid"] not in (exclude or set())]
        if found:
            return int(found[0])
        if time.monotonic() > deadline:
            raise AssertionError(f"no backend is running tokentrack.{function}")
        await asyncio.sleep(0.01)
