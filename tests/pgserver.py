"""A throwaway PostgreSQL server: used by the test session (conftest.py) and by `make lint`.

``running_server()`` runs ``initdb`` as the ``postgres`` OS user when run as root, in a fresh
temporary directory on /dev/shm when it has room, else under /tmp, or under
``$TOKENTRACK_TEST_TMPDIR``; trust authentication, 127.0.0.1 only, a free port,
``fsync=off``. It waits for the server with ``pg_isready`` and, on exit, stops it and
removes the directory. ``server_from_dsn()`` describes an existing server instead.
``PgServer.kill()`` crashes a server started by ``running_server()`` (SIGKILL to every
server process) and ``PgServer.restart()`` starts it again (crash recovery).
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
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from psycopg.conninfo import conninfo_to_dict

PG_MAJOR = "15"
SERVER_START_TIMEOUT = 60.0


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
    datadir: Path | None = None  # the data directory of a server started by running_server()
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

    def postmaster_pid(self) -> int:
        """PID of the postmaster of a server started by ``running_server()``."""
        return int(self._own_datadir().joinpath("postmaster.pid").read_text().split()[0])

    def kill(self) -> None:
        """Crash the server: SIGKILL to the postmaster and every server process at once
        (a crash of the machine, minus the loss of what the OS had not written yet)."""
        postmaster = self.postmaster_pid()
        victims = [postmaster, *_child_pids(postmaster)]
        for pid in victims:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while any(_alive(pid) for pid in victims):
            if time.monotonic() > deadline:
                raise RuntimeError(f"server processes {victims} survived SIGKILL")
            time.sleep(0.01)

    def restart(self) -> None:
        """Start a server that was stopped or killed (it runs crash recovery) and wait for it.

        A postmaster killed with SIGKILL is reparented to init; where init does not reap
        orphans it stays a zombie, which PostgreSQL's lock-file checks take for a running
        postmaster. Its lock files (postmaster.pid, and the socket's, next to the data
        directory) are removed only when the PID they name is gone or a zombie.
        """
        datadir = self._own_datadir()
        for lock in (datadir / "postmaster.pid", datadir.parent / f".s.PGSQL.{self.port}.lock"):
            if not lock.exists():
                continue
            first = lock.read_text().split()[:1]
            if first and first[0].lstrip("-").isdigit() and _alive(abs(int(first[0]))):
                raise RuntimeError(f"postmaster {first[0]} of {datadir} is still running")
            lock.unlink()
        _start(self.bindir, datadir)
        _wait_ready(self.bindir, self.host, self.port, self.user)

    def _own_datadir(self) -> Path:
        if self.datadir is None:
            raise RuntimeError("only a server started by running_server() can be killed")
        return self.datadir


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


def server_from_dsn(dsn: str) -> PgServer:
    """The existing server of a libpq DSN/URL (``$TOKENTRACK_TEST_DSN``)."""
    params = conninfo_to_dict(dsn)
    return PgServer(
        host=str(params.get("host", "127.0.0.1")),
        port=int(params.get("port", 5432)),
        user=str(params.get("user", "postgres")),
        password=str(params["password"]) if params.get("password") else None,
        maintenance_dbname=str(params.get("dbname", "postgres")),
        bindir=find_pg_bindir(),
    )


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


def _start(bindir: Path, datadir: Path) -> None:
    """``pg_ctl start`` the cluster in ``datadir`` and wait for the postmaster."""
    _run(
        _as_postgres(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(datadir),
                "-l",
                str(datadir.parent / "postgres.log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        ),
        "pg_ctl start",
    )


@contextmanager
def running_server(
    bindir: Path | None = None, extra_settings: dict[str, str] | None = None
) -> Iterator[PgServer]:
    """Start a throwaway PostgreSQL server; stop it and remove its files on exit.

    ``extra_settings`` are appended to postgresql.conf (values written as given, quoted
    where PostgreSQL needs quotes).
    """
    bindir = bindir or find_pg_bindir()
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError(
                "running as root but there is no 'postgres' OS user to run the test server "
                "as; install Debian's postgresql package (make test does)"
            ) from None
    base = Path(tempfile.mkdtemp(prefix="tokentrack-pg-", dir=_scratch_root()))
    datadir = base / "data"
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
        settings: dict[str, str] = {
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
            **(extra_settings or {}),
        }
        with (datadir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# tokentrack test server\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        _start(bindir, datadir)
        started = True
        _wait_ready(bindir, "127.0.0.1", port, "postgres")
        yield PgServer(host="127.0.0.1", port=port, user="postgres", bindir=bindir, datadir=datadir)
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
