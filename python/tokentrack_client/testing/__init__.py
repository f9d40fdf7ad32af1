"""A throwaway PostgreSQL server for tests, benchmarks and the demo.

:class:`PostgresServer` runs ``initdb`` into a new temporary directory, starts the server on
a free 127.0.0.1 port (its unix socket inside that directory, trust authentication), and
on :meth:`~PostgresServer.stop` shuts it down and removes the directory. PostgreSQL refuses
to run as root, so when run as root the server programs run as the ``postgres`` OS user
(``runuser``) on a directory handed to that user. It can also be crashed
(:meth:`~PostgresServer.kill`, SIGKILL to every server process), shut down cleanly
(:meth:`~PostgresServer.shutdown`, its directory kept) and started again
(:meth:`~PostgresServer.restart`, after a kill with crash recovery)::

    from tokentrack_client.testing import PostgresServer

    with PostgresServer() as server:
        dsn = asyncio.run(server.create_database("app"))
        ...  # stopped and removed on the way out, also on an error or Ctrl-C

:meth:`PostgresServer.existing` describes a server that runs already (``$TOKENTRACK_TEST_DSN``
in the pytest plugin): the same DSN and client-program helpers, and nothing to stop.

The pytest fixtures (a session server, a fresh database with tokentrack installed per test,
connections and a pool) are in :mod:`tokentrack_client.testing.pytest_plugin`; this module
needs nothing but the standard library and asyncpg.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Final, TypeVar
from urllib.parse import quote, unquote, urlsplit

import asyncpg

__all__ = [
    "DEFAULT_SETTINGS",
    "DURABLE_SETTINGS",
    "PostgresServer",
    "PostgresServerError",
    "default_data_root",
    "find_bindir",
    "free_port",
    "run_in_thread",
]

PREFERRED_MAJOR: Final = 15
TIMEOUT: Final = 60.0

DEFAULT_SETTINGS: Final[Mapping[str, str]] = {
    # A throwaway server: nothing it holds must survive a crash of the machine.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",  # the test suite's races and pools at once
    "shared_buffers": "128MB",
    "log_min_messages": "warning",
    "timezone": "UTC",
}
"""What every :class:`PostgresServer` runs with unless its ``settings`` say otherwise."""

DURABLE_SETTINGS: Final[Mapping[str, str]] = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
}
"""Settings that make an acknowledged commit durable (crash tests, benchmarks)."""

# Set by PostgresServer itself: loopback only, a free port, the socket in its own directory.
_OWN_SETTINGS: Final = frozenset({"listen_addresses", "port", "unix_socket_directories"})

T = TypeVar("T")


class PostgresServerError(RuntimeError):
    """The server could not be found, started or stopped; the message says what to fix."""


def _major(bindir: Path) -> int:
    name = bindir.parent.name
    return int(name) if name.isdigit() else 0


def find_bindir() -> Path:
    """The directory of the PostgreSQL programs (initdb, pg_ctl, pg_isready, psql, pg_dump...).

    In this order, the first that holds ``initdb`` and ``pg_ctl``: ``$TOKENTRACK_PG_BINDIR``,
    ``pg_config --bindir``, Debian's ``/usr/lib/postgresql/15/bin``, the newest other Debian
    version, then the directory of ``pg_ctl`` on ``PATH``.
    """
    candidates: list[Path] = []
    if os.environ.get("TOKENTRACK_PG_BINDIR"):
        candidates.append(Path(os.environ["TOKENTRACK_PG_BINDIR"]))
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))
    candidates.append(Path(f"/usr/lib/postgresql/{PREFERRED_MAJOR}/bin"))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_major, reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    raise PostgresServerError(
        "PostgreSQL server programs (initdb, pg_ctl) not found via TOKENTRACK_PG_BINDIR, "
        f"pg_config --bindir, /usr/lib/postgresql/{PREFERRED_MAJOR}/bin or PATH; install "
        f"PostgreSQL {PREFERRED_MAJOR} (Debian: apt-get install postgresql; `make test` and "
        "`make demo` do it) or set TOKENTRACK_PG_BINDIR"
    )


def default_data_root() -> Path:
    """Where servers put their directory: ``$TOKENTRACK_TEST_TMPDIR``, else RAM, else /tmp.

    Cloning a template database is about ten times faster on tmpfs (/dev/shm) than on a
    disk, which is most of the test suite's run time; /dev/shm is used when it has 1 GiB
    free. Never a private ``$TMPDIR``: as root, the ``postgres`` user must reach it.
    """
    chosen = os.environ.get("TOKENTRACK_TEST_TMPDIR")
    if chosen:
        return Path(chosen)
    shm = Path("/dev/shm")
    with suppress(OSError):
        if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= 2**30:
            return shm
    return Path("/tmp")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _conf_value(value: str) -> str:
    """A postgresql.conf value: always quoted (PostgreSQL accepts quotes around any value)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    """``name`` as an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _parse_dsn(dsn: str) -> dict[str, str]:
    """host, port, user, password, dbname of a ``postgresql://`` URL or a libpq
    ``key=value`` string (values without spaces or quotes)."""
    if "://" in dsn:
        parts = urlsplit(dsn)
        found = {
            "host": unquote(parts.hostname or ""),
            "port": str(parts.port or ""),
            "user": unquote(parts.username or ""),
            "password": unquote(parts.password or ""),
            "dbname": unquote(parts.path.lstrip("/")),
        }
    else:
        found = dict(item.split("=", 1) for item in dsn.split())
    return {key: value for key, value in found.items() if value}


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (Linux /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _child_pids(parent: int) -> list[int]:
    """The live children of ``parent`` (every server process is a child of the postmaster)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            children.append(int(entry.name))
    return children


def _wait_gone(pid: int, deadline: float) -> None:
    """Block until ``pid`` has exited: a pidfd becomes readable when the process ends (zombie
    or reaped), so this waits on the kernel, not on a timer."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:  # no pidfd (an old kernel, a seccomp filter): look again every 10 ms
        while _alive(pid):
            if time.monotonic() > deadline:
                raise PostgresServerError(f"server process {pid} survived SIGKILL") from None
            time.sleep(0.01)
        return
    try:
        while _alive(pid):
            left = deadline - time.monotonic()
            if left <= 0:
                raise PostgresServerError(f"server process {pid} survived SIGKILL")
            select.select([fd], [], [], left)
    finally:
        os.close(fd)


class PostgresServer:
    """A PostgreSQL server in a temporary directory, for as long as the ``with`` block lasts.

    ``settings`` go into postgresql.conf over :data:`DEFAULT_SETTINGS` (plain values; they
    are quoted when written); ``listen_addresses``, ``port`` and ``unix_socket_directories``
    are the server's own (127.0.0.1, a free port, its directory). ``data_root`` is where its
    directory goes (:func:`default_data_root` when ``None``), ``bindir`` where the programs
    are (:func:`find_bindir` when ``None``).
    """

    def __init__(
        self,
        *,
        settings: Mapping[str, str] | None = None,
        bindir: Path | None = None,
        data_root: Path | None = None,
        prefix: str = "tokentrack-pg-",
    ) -> None:
        own = _OWN_SETTINGS & set(settings or {})
        if own:
            raise ValueError(f"PostgresServer sets {', '.join(sorted(own))} itself")
        self.settings: dict[str, str] = {**DEFAULT_SETTINGS, **(settings or {})}
        self._bindir = bindir
        self.data_root = data_root
        self.prefix = prefix
        self.host = "127.0.0.1"
        self.port = 0
        self.user = "postgres"
        self.password: str | None = None
        self.maintenance_dbname = "postgres"
        self.base: Path | None = None
        """The server's directory (data directory, log, socket) while it exists."""
        self._owned = True
        self._as_postgres = os.geteuid() == 0

    @classmethod
    def existing(cls, dsn: str, *, bindir: Path | None = None) -> PostgresServer:
        """A server that runs already, at ``dsn`` (its database is the maintenance database,
        where databases are created from). :meth:`stop` leaves it alone; it cannot be
        killed or restarted."""
        params = _parse_dsn(dsn)
        server = cls(bindir=bindir)
        server._owned = False
        server.host = params.get("host", "127.0.0.1")
        server.port = int(params.get("port", "5432"))
        server.user = params.get("user", "postgres")
        server.password = params.get("password")
        server.maintenance_dbname = params.get("dbname", "postgres")
        return server

    # ----------------------------------------------------------------------------------------
    # Where it is
    # ----------------------------------------------------------------------------------------

    @property
    def bindir(self) -> Path:
        """The directory of the PostgreSQL programs this server runs (found when first asked)."""
        if self._bindir is None:
            self._bindir = find_bindir()
        return self._bindir

    @property
    def datadir(self) -> Path:
        """The data directory (inside :attr:`base`)."""
        if self.base is None:
            raise PostgresServerError("the server is not started (or is not one of ours)")
        return self.base / "data"

    def dsn(self, dbname: str | None = None) -> str:
        """The URL of ``dbname`` (default: the maintenance database) as :attr:`user`."""
        auth = quote(self.user, safe="")
        if self.password:
            auth += ":" + quote(self.password, safe="")
        name = quote(dbname or self.maintenance_dbname, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{name}"

    # ----------------------------------------------------------------------------------------
    # Client programs of the same installation
    # ----------------------------------------------------------------------------------------

    def bin(self, program: str) -> str:
        """The path of ``program`` (pg_dump, psql, pgbench...) next to this server's."""
        return str(self.bindir / program)

    def client_env(self) -> dict[str, str]:
        """The environment for client programs (a password through PGPASSWORD, never argv)."""
        env = dict(os.environ)
        if self.password:
            env["PGPASSWORD"] = self.password
        return env

    def run(
        self, program: str, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a client program (``server.run("psql", "-d", dsn, "-c", "SELECT 1")``) with
        :meth:`client_env`; raise :class:`PostgresServerError` on failure when ``check``."""
        result = subprocess.run(
            [self.bin(program), *args],
            input=input,
            capture_output=True,
            text=True,
            check=False,
            env=self.client_env(),
        )
        if check and result.returncode != 0:
            output = (result.stderr or result.stdout).strip()
            raise PostgresServerError(f"{program} failed ({result.returncode}): {output}")
        return result

    # ----------------------------------------------------------------------------------------
    # Databases
    # ----------------------------------------------------------------------------------------

    async def create_database(self, name: str, *, template: str | None = None) -> str:
        """``CREATE DATABASE name [TEMPLATE template]``; return its DSN."""
        sql = f"CREATE DATABASE {quote_ident(name)}"
        if template:
            sql += f" TEMPLATE {quote_ident(template)}"
        admin = await asyncpg.connect(self.dsn())
        try:
            await admin.execute(sql)
        finally:
            await admin.close()
        return self.dsn(name)

    async def drop_database(self, name: str) -> None:
        """``DROP DATABASE IF EXISTS name WITH (FORCE)`` (its connections are ended)."""
        admin = await asyncpg.connect(self.dsn())
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        finally:
            await admin.close()

    # ----------------------------------------------------------------------------------------
    # Start, stop, kill, restart
    # ----------------------------------------------------------------------------------------

    def _argv(self, program: str, *args: str) -> list[str]:
        argv = [self.bin(program), *args]
        return ["runuser", "-u", "postgres", "--", *argv] if self._as_postgres else argv

    def _run_server_program(self, what: str, argv: list[str]) -> None:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            output = (result.stderr or result.stdout).strip()
            log = self.base / "postgres.log" if self.base else None
            if log is not None and log.exists():
                output += "\n" + log.read_text(errors="replace").strip()
            raise PostgresServerError(f"{what} failed ({result.returncode}): {output}")

    def start(self) -> PostgresServer:
        """initdb, start, and return once the server accepts connections. On any failure
        whatever was started is stopped and the directory removed."""
        if not self._owned:
            raise PostgresServerError("an existing server is not started by PostgresServer")
        if self.base is not None:
            raise PostgresServerError(f"the server in {self.base} is already started")
        if self._as_postgres:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresServerError(
                    "running as root, and PostgreSQL refuses to: there is no 'postgres' OS user "
                    "to run it as (Debian's postgresql package creates it)"
                ) from None
        bindir = self.bindir
        root = self.data_root or default_data_root()
        self.base = Path(tempfile.mkdtemp(prefix=self.prefix, dir=root))
        try:
            if self._as_postgres:
                shutil.chown(self.base, user="postgres", group="postgres")
            self.port = free_port()
            self._run_server_program(
                "initdb",
                self._argv(
                    "initdb",
                    "-D",
                    str(self.datadir),
                    "--auth=trust",
                    f"--username={self.user}",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ),
            )
            settings = {
                **self.settings,
                "listen_addresses": "127.0.0.1",
                "port": str(self.port),
                "unix_socket_directories": str(self.base),
            }
            with (self.datadir / "postgresql.conf").open("a", encoding="utf-8") as conf:
                conf.write(f"\n# tokentrack_client.testing.PostgresServer ({bindir})\n")
                conf.writelines(f"{key} = {_conf_value(v)}\n" for key, v in settings.items())
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        """``pg_ctl start -w`` (it returns once the postmaster says it accepts connections),
        then ``pg_isready`` over TCP as the gate: the server answers on 127.0.0.1."""
        self._run_server_program(
            "pg_ctl start",
            self._argv(
                "pg_ctl",
                "-D",
                str(self.datadir),
                "-l",
                str(self.datadir.parent / "postgres.log"),
                "-w",
                "-t",
                str(int(TIMEOUT)),
                "start",
            ),
        )
        ready = subprocess.run(
            [
                *(self.bin("pg_isready"), "-h", self.host, "-p", str(self.port)),
                *("-U", self.user, "-d", self.maintenance_dbname, "-t", str(int(TIMEOUT))),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if ready.returncode != 0:
            raise PostgresServerError(
                f"PostgreSQL on {self.host}:{self.port} is not ready: {ready.stdout.strip()}"
            )

    def postmaster_pid(self) -> int:
        """The PID in postmaster.pid (the file stays behind after :meth:`kill`)."""
        return int((self.datadir / "postmaster.pid").read_text().split()[0])

    def running(self) -> bool:
        """Whether the postmaster of this server's directory is alive."""
        if self.base is None:
            return False
        try:
            return _alive(self.postmaster_pid())
        except (FileNotFoundError, ValueError, IndexError):
            return False

    def kill(self) -> None:
        """Crash the server: SIGKILL to the postmaster and every server process at once (a
        crash of the machine, minus the loss of what the OS had not written yet). Returns
        once they are all gone; :meth:`restart` starts it again."""
        self._own("killed")
        postmaster = self.postmaster_pid()
        victims = [postmaster, *_child_pids(postmaster)]
        for pid in victims:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + TIMEOUT
        for pid in victims:
            _wait_gone(pid, deadline)

    def restart(self) -> None:
        """Stop the server if it runs (fast shutdown) and start it again on the same
        directory and port; after :meth:`kill` this runs crash recovery.

        A postmaster killed with SIGKILL is reparented to init; where init does not reap
        orphans it stays a zombie, which PostgreSQL's lock-file checks take for a running
        postmaster. Its lock files (postmaster.pid, and the socket's) are removed only when
        the PID they name is gone or a zombie.
        """
        self._own("restarted")
        if self.running():
            self._pg_ctl_stop()
        for lock in (
            self.datadir / "postmaster.pid",
            self.datadir.parent / f".s.PGSQL.{self.port}.lock",
        ):
            if not lock.exists():
                continue
            first = lock.read_text().split()[:1]
            if first and first[0].lstrip("-").isdigit() and _alive(abs(int(first[0]))):
                raise PostgresServerError(f"postmaster {first[0]} of {self.datadir} still runs")
            lock.unlink()
        self._start()

    def shutdown(self) -> None:
        """Stop the server (fast shutdown: its sessions are ended) and keep its directory and
        port, so that :meth:`restart` starts it again with its data: a server that is down for
        as long as the caller waits in between (a restart, a failover)."""
        self._own("shut down")
        if self.running():
            self._pg_ctl_stop()

    def _pg_ctl_stop(self) -> None:
        """Fast shutdown, then immediate; a server that outlives both is killed, so that no
        postmaster is ever left running without its directory."""
        wait = str(int(TIMEOUT // 2))
        for mode in ("fast", "immediate"):
            with suppress(subprocess.TimeoutExpired):
                result = subprocess.run(
                    self._argv("pg_ctl", "-D", str(self.datadir), "-m", mode, "-t", wait, "stop"),
                    capture_output=True,
                    check=False,
                    timeout=TIMEOUT,
                )
                if result.returncode == 0:
                    return
            if not self.running():
                return
        self.kill()
        raise PostgresServerError(
            f"pg_ctl stop of {self.datadir} failed (fast and immediate): the server was killed"
        )

    def stop(self) -> None:
        """Stop the server (fast shutdown, then immediate) and remove its directory.

        Safe to call more than once, after a start that failed halfway and after
        :meth:`kill`; does nothing to an :meth:`existing` server. SIGINT and SIGTERM are
        ignored meanwhile, so an impatient second Ctrl-C cannot leave a server behind.
        """
        if self.base is None:
            return
        with _signals_deferred():
            try:
                if self.running():
                    self._pg_ctl_stop()
            finally:
                shutil.rmtree(self.base, ignore_errors=True)
                self.base = None

    def _own(self, what: str) -> None:
        if not self._owned or self.base is None:
            raise PostgresServerError(f"only a server started by PostgresServer can be {what}")

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f" in {self.base}" if self.base else ""
        return f"<PostgresServer {self.host}:{self.port}{where}>"


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM for the duration (main thread only), then restore the handlers."""
    try:
        saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals cannot be touched, nor can they arrive
        yield
        return
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def run_in_thread(work: Callable[[], Awaitable[T]]) -> T:
    """``asyncio.run(work())`` in a thread of its own and its result: for synchronous code
    (session fixtures) that may be called while an event loop runs in this thread."""
    result: list[T] = []
    errors: list[BaseException] = []

    async def main() -> T:
        return await work()

    def worker() -> None:
        try:
            result.append(asyncio.run(main()))
        except BaseException as exc:  # re-raised in the calling thread
            errors.append(exc)

    thread = threading.Thread(target=worker, name="tokentrack-testing")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]
