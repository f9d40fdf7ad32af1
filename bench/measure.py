"""What the benchmark measures around each run: pgbench itself, CPU, WAL, wait events,
pg_stat_statements, and the scans of a plan.

On a machine shared with other work, throughput alone is noisy; each run therefore also
records the CPU that the server and the driver used (from /proc, so CPU per transaction can be
compared even when other processes compete for the cores), the whole machine's CPU use (to
see that competition), the WAL written and flushed (pg_stat_wal), and what the driven
backends were doing, sampled from pg_stat_activity ten times a second. ``Measurement`` puts
all of it around one run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import statistics
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SAMPLE_EVERY = 0.1


# --------------------------------------------------------------------------------------------
# Timing one call
# --------------------------------------------------------------------------------------------


async def timed(conn: asyncpg.Connection, sql: str, *args: Any) -> tuple[float, Any]:
    """The time of one statement inside its own transaction (BEGIN/COMMIT not timed)."""
    async with conn.transaction():
        began = time.perf_counter()
        value = await conn.fetchval(sql, *args)
        return time.perf_counter() - began, value


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, 90th percentile and minimum of durations in seconds, in milliseconds."""
    ordered = sorted(values)
    return {
        "median_ms": statistics.median(ordered) * 1000,
        "p90_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))] * 1000,
        "min_ms": ordered[0] * 1000,
        "n": len(ordered),
    }


# --------------------------------------------------------------------------------------------
# CPU accounting
# --------------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def server_cpu_seconds(postmaster_pid: int) -> float:
    """CPU seconds used by a PostgreSQL server so far: the postmaster, its live children and
    (through the postmaster's cutime/cstime) every backend that has exited."""
    total = 0.0
    own = _stat_fields(postmaster_pid)
    if own is None:
        return 0.0
    # Fields after the command: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    total += sum(int(own[i]) for i in (11, 12, 13, 14)) / CLOCK_TICKS
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and int(fields[1]) == postmaster_pid:
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def children_cpu_seconds() -> float:
    """CPU seconds of this process's exited children (pgbench runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuSnapshot:
    wall: float
    server: float
    machine_busy: float
    machine_total: float
    children: float
    own: float

    @classmethod
    def take(cls, postmaster_pid: int) -> CpuSnapshot:
        busy, total = machine_cpu()
        return cls(
            wall=time.monotonic(),
            server=server_cpu_seconds(postmaster_pid),
            machine_busy=busy,
            machine_total=total,
            children=children_cpu_seconds(),
            own=time.process_time(),
        )

    def since(self, start: CpuSnapshot, *, driver: str) -> dict[str, float]:
        """CPU used between ``start`` and this snapshot, in cores (CPU seconds per second).

        ``driver`` says who drove the load: ``pgbench`` (an exited child process) or
        ``python`` (this process, the asyncio client).
        """
        wall = self.wall - start.wall
        driver_cpu = self.children - start.children if driver == "pgbench" else self.own - start.own
        machine_total = self.machine_total - start.machine_total
        cores = os.cpu_count() or 1
        return {
            "wall_s": wall,
            "server_cpu_s": self.server - start.server,
            "driver_cpu_s": driver_cpu,
            "server_cores": (self.server - start.server) / wall,
            "driver_cores": driver_cpu / wall,
            "machine_busy_cores": (self.machine_busy - start.machine_busy) / machine_total * cores
            if machine_total
            else 0.0,
        }


# --------------------------------------------------------------------------------------------
# Wait events and WAL
# --------------------------------------------------------------------------------------------

_WAITS_SQL = """
SELECT
    pid,
    CASE
        WHEN state = 'active' THEN coalesce(wait_event_type || ':' || wait_event, 'CPU')
        ELSE 'Client:' || coalesce(state, 'unknown')
    END AS what
FROM pg_stat_activity
WHERE datname = $1 AND application_name = $2 AND pid <> pg_backend_pid()
"""


async def sample_waits(
    conn: asyncpg.Connection,
    dbname: str,
    application: str,
    stop: asyncio.Event,
    pids: set[int],
) -> Counter[str]:
    """Count, ten times a second until ``stop``, what the driven backends are doing; add
    their process ids to ``pids``.

    ``CPU`` is a backend running (or waiting for a core); ``Lock:transactionid``/``Lock:tuple``
    a row lock wait; ``IO:WALSync``/``LWLock:WALWrite`` the commit flush; ``Client:idle`` a
    backend waiting for its driver.
    """
    seen: Counter[str] = Counter()
    while not stop.is_set():
        for row in await conn.fetch(_WAITS_SQL, dbname, application):
            seen[row["what"]] += 1
            pids.add(row["pid"])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY)
    return seen


def wait_reaped(pids: set[int], within: float = 10.0) -> None:
    """Wait until these backends have exited and the postmaster has reaped them, so that
    their CPU time shows in its cutime/cstime (a backend leaves pg_stat_activity first).
    Blocking, but only for the milliseconds between a backend's exit and its reaping."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.01)


async def wait_for_backends_gone(
    conn: asyncpg.Connection, dbname: str, application: str, within: float = 10.0
) -> None:
    """Wait until the driver's backends have exited (and flushed their statistics)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        left = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
            dbname,
            application,
        )
        if left == 0:
            return
        await asyncio.sleep(0.05)


async def reset_wal_stats(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT pg_stat_reset_shared('wal')")


async def wal_stats(conn: asyncpg.Connection) -> dict[str, float]:
    row = await conn.fetchrow(
        "SELECT wal_records, wal_fpi, wal_bytes::float8 AS wal_bytes, wal_write, wal_sync,"
        " wal_sync_time, wal_buffers_full FROM pg_stat_wal"
    )
    assert row is not None
    return {key: float(value) for key, value in dict(row).items()}


# --------------------------------------------------------------------------------------------
# pg_stat_statements and plans
# --------------------------------------------------------------------------------------------


async def pgss_top(conn: asyncpg.Connection, dbname: str, limit: int = 15) -> list[dict[str, Any]]:
    """The statements of database ``dbname`` by total execution time (the bench's own
    account-id helper calls left out)."""
    rows = await conn.fetch(
        "SELECT s.toplevel, s.calls, s.total_exec_time, s.mean_exec_time, s.rows,"
        " s.shared_blks_hit, s.shared_blks_read, s.shared_blks_dirtied,"
        " s.shared_blks_written, s.wal_records, s.wal_fpi, s.wal_bytes::float8 AS wal_bytes,"
        " regexp_replace(s.query, '\\s+', ' ', 'g') AS query"
        " FROM pg_stat_statements AS s JOIN pg_database AS d ON d.oid = s.dbid"
        " WHERE d.datname = $1 AND s.query !~ '^SELECT \\(\\$\\d+ \\|\\| lpad'"
        " ORDER BY s.total_exec_time DESC LIMIT $2",
        dbname,
        limit,
    )
    return [dict(r) for r in rows]


def _plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _plan_nodes(child)


def plan_scans(explain_json: Any) -> list[str]:
    """The scans of an EXPLAIN (FORMAT JSON) plan: 'Seq Scan on reports', 'Index Scan using ...'."""
    document = json.loads(explain_json) if isinstance(explain_json, str) else explain_json
    scans = []
    for node in _plan_nodes(document[0]["Plan"]):
        kind = node["Node Type"]
        if "Scan" not in kind or kind in ("CTE Scan", "Subquery Scan", "Function Scan"):
            continue
        target = node.get("Index Name") or node.get("Relation Name")
        scans.append(f"{kind} {'using' if node.get('Index Name') else 'on'} {target}")
    return scans


# --------------------------------------------------------------------------------------------
# One run, measured
# --------------------------------------------------------------------------------------------


class Measurement:
    """Everything measured around one run whose backends connect to ``dbname`` as
    ``application``: start() before it, stop_sampling() as soon as it ends, finish() once
    its connections are closed. Then ``cpu``, ``wal``, ``waits`` and ``statements``.

    ``control`` runs the checkpoint, resets and reads the statistics; ``sampler`` (a second
    connection) samples pg_stat_activity meanwhile.
    """

    def __init__(
        self,
        control: asyncpg.Connection,
        sampler: asyncpg.Connection,
        postmaster_pid: int,
        dbname: str,
        application: str,
    ) -> None:
        self.control = control
        self.sampler = sampler
        self.postmaster_pid = postmaster_pid
        self.dbname = dbname
        self.application = application
        self.cpu: dict[str, float] = {}
        self.wal: dict[str, float] = {}
        self.waits: Counter[str] = Counter()
        self.statements: list[dict[str, Any]] = []
        self._stop = asyncio.Event()
        self._pids: set[int] = set()
        self._sampling: asyncio.Task[Counter[str]] | None = None
        self._start: CpuSnapshot | None = None

    async def start(self) -> Measurement:
        """A checkpoint, WAL and statement statistics reset, sampling started, CPU noted."""
        await self.control.execute("CHECKPOINT")
        await reset_wal_stats(self.control)
        await self.control.execute("SELECT pg_stat_statements_reset()")
        self._sampling = asyncio.create_task(
            sample_waits(self.sampler, self.dbname, self.application, self._stop, self._pids)
        )
        self._start = CpuSnapshot.take(self.postmaster_pid)
        return self

    async def stop_sampling(self) -> None:
        self._stop.set()
        if self._sampling is not None:
            self.waits = await self._sampling

    async def finish(self, *, driver: str, statements: int) -> None:
        """Once the run's backends are gone and reaped: CPU (``driver`` as in
        CpuSnapshot.since), WAL, and the top ``statements`` of pg_stat_statements."""
        assert self._start is not None, "finish() before start()"
        await wait_for_backends_gone(self.control, self.dbname, self.application)
        wait_reaped(self._pids)
        self.cpu = CpuSnapshot.take(self.postmaster_pid).since(self._start, driver=driver)
        self.wal = await wal_stats(self.control)
        self.statements = await pgss_top(self.control, self.dbname, statements)


# --------------------------------------------------------------------------------------------
# pgbench
# --------------------------------------------------------------------------------------------

_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)
_TRANSACTIONS = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
_STATEMENT = re.compile(r"^\s+([0-9.]+)\s+(\d+)\s+(\S.*)$")


@dataclass
class PgbenchOutput:
    tps: float
    transactions: int
    failed: int
    latency_ms: float
    statements: list[dict[str, Any]] = field(default_factory=list)


def parse_pgbench(text: str) -> PgbenchOutput:
    """The figures of a pgbench (PostgreSQL 15) report run with ``-r``."""

    def number(pattern: re.Pattern[str]) -> str:
        found = pattern.search(text)
        if found is None:
            raise RuntimeError(f"unexpected pgbench output (no {pattern.pattern!r}):\n{text}")
        return found.group(1)

    failed = _FAILED.search(text)
    statements: list[dict[str, Any]] = []
    in_statements = False
    for line in text.splitlines():
        if line.startswith("statement latencies in milliseconds"):
            in_statements = True
            continue
        if in_statements:
            found = _STATEMENT.match(line)
            if found is None:
                break
            command = found.group(3).strip()
            if not command.startswith("\\"):
                statements.append(
                    {
                        "latency_ms": float(found.group(1)),
                        "failures": int(found.group(2)),
                        "command": command,
                    }
                )
    return PgbenchOutput(
        tps=float(number(_TPS)),
        transactions=int(number(_TRANSACTIONS)),
        failed=int(failed.group(1)) if failed else 0,
        latency_ms=float(number(_LATENCY)),
        statements=statements,
    )


async def run_pgbench(argv: list[str], env: dict[str, str]) -> PgbenchOutput:
    """Run pgbench to its end (killed if this task is cancelled) and parse its report."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    try:
        out, err = await process.communicate()
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    stdout, stderr = out.decode(), err.decode()
    if process.returncode != 0 or "aborted" in stderr:
        raise RuntimeError(
            f"pgbench failed (exit {process.returncode}): {' '.join(argv)}\n{stderr}\n{stdout}"
        )
    return parse_pgbench(stdout)
