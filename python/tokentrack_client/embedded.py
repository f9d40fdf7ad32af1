"""A throwaway PostgreSQL server for ``tokentrack demo``.

``EmbeddedPostgres`` runs ``initdb`` into a new temporary directory, starts the server on a
free 127.0.0.1 port (its unix socket inside that directory), and on ``stop()`` shuts it down
and removes the directory. PostgreSQL refuses to run as root, so when run as root the server
programs run as the ``postgres`` OS user (``runuser``) on a directory handed to that user.

``pg_ctl`` makes the server a session leader of its own, so a Ctrl-C in the terminal reaches
the demo and not the server: the demo stops it itself, in a ``finally``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

__all__ = ["EmbeddedPostgres", "EmbeddedPostgresError", "find_server_bindir"]

PREFERRED_MAJOR = 15
START_TIMEOUT = 60.0


class EmbeddedPostgresError(RuntimeError):
    """The throwaway server could not be set up; the message says what to install or fix."""


def _major(bindir: Path) -> int:
    name = bindir.parent.name
    return int(name) if name.isdigit() else 0


def find_server_bindir() -> Path:
    """The directory of ``initdb``/``pg_ctl``: ``$TOKENTRACK_PG_BINDIR``, ``pg_config
    --bindir``, Debian's ``/usr/lib/postgresql/15/bin``, the newest other Debian version,
    then ``PATH``."""
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
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    raise EmbeddedPostgresError(
        "PostgreSQL server programs (initdb, pg_ctl) not found; install PostgreSQL 15 "
        "(Debian: apt-get install postgresql; `make demo` does it) or set TOKENTRACK_PG_BINDIR, "
        "or point the demo at a database with DATABASE_URL"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedPostgres:
    """A PostgreSQL server in a temporary directory, for as long as the ``with`` block lasts::

    with EmbeddedPostgres() as server:
        asyncio.run(work(server.dsn))
    """

    def __init__(self, bindir: Path | None = None, *, prefix: str = "tokentrack-demo-") -> None:
        self.bindir = bindir or find_server_bindir()
        self.prefix = prefix
        self.host = "127.0.0.1"
        self.port = 0
        self.user = "postgres"
        self.base: Path | None = None
        self._as_postgres = os.geteuid() == 0

    @property
    def datadir(self) -> Path:
        """The data directory (inside :attr:`base`)."""
        if self.base is None:
            raise EmbeddedPostgresError("the server is not started")
        return self.base / "data"

    @property
    def dsn(self) -> str:
        """The URL of the ``postgres`` database, as the ``postgres`` superuser (trust auth)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/postgres"

    def _argv(self, program: str, *args: str) -> list[str]:
        argv = [str(self.bindir / program), *args]
        return ["runuser", "-u", "postgres", "--", *argv] if self._as_postgres else argv

    def _run(self, what: str, argv: list[str]) -> None:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            output = (result.stderr or result.stdout).strip()
            raise EmbeddedPostgresError(f"{what} failed ({result.returncode}): {output}")

    def start(self) -> EmbeddedPostgres:
        """initdb, start, and wait until the server accepts connections (pg_isready)."""
        if self._as_postgres:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise EmbeddedPostgresError(
                    "running as root, and PostgreSQL refuses to: there is no 'postgres' OS user "
                    "to run it as (Debian's postgresql package creates it)"
                ) from None
        # As root, the postgres user must reach the directory: /tmp, not a private $TMPDIR.
        self.base = Path(
            tempfile.mkdtemp(prefix=self.prefix, dir="/tmp" if self._as_postgres else None)
        )
        if self._as_postgres:
            shutil.chown(self.base, user="postgres", group="postgres")
        self.port = _free_port()
        self._run(
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
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.base}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "50",
            "log_min_messages": "warning",
            "timezone": "'UTC'",
        }
        with (self.datadir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# tokentrack demo server\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        self._run(
            "pg_ctl start",
            self._argv(
                "pg_ctl",
                "-D",
                str(self.datadir),
                "-l",
                str(self.base / "postgres.log"),
                "-w",
                "-t",
                str(int(START_TIMEOUT)),
                "start",
            ),
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        """pg_isready until it answers (pg_ctl -w has already waited for the postmaster)."""
        argv = [str(self.bindir / "pg_isready"), "-h", self.host, "-p", str(self.port)]
        argv += ["-U", self.user, "-d", "postgres", "-t", "5"]
        deadline = time.monotonic() + START_TIMEOUT
        while subprocess.run(argv, capture_output=True, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(f"PostgreSQL on port {self.port} is not ready")
            time.sleep(0.05)

    def running(self) -> bool:
        """Whether the server's postmaster.pid is still there (the server is up)."""
        return self.base is not None and (self.datadir / "postmaster.pid").exists()

    def stop(self) -> None:
        """Stop the server (fast shutdown, then immediate) and remove its directory.

        Safe to call more than once, and after a start that failed halfway. SIGINT and
        SIGTERM are ignored meanwhile, so an impatient second Ctrl-C cannot leave a server
        behind.
        """
        if self.base is None:
            return
        with _signals_deferred():
            try:
                if self.running():
                    for mode in ("fast", "immediate"):
                        result = subprocess.run(
                            self._argv("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop"),
                            capture_output=True,
                            check=False,
                            timeout=60,
                        )
                        if result.returncode == 0 or not self.running():
                            break
            finally:
                shutil.rmtree(self.base, ignore_errors=True)
                self.base = None

    def __enter__(self) -> EmbeddedPostgres:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


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
