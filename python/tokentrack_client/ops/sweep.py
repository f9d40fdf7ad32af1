"""``tokentrack cleanup`` and ``tokentrack cron install|remove|status``: the expiry sweep.

``cleanup`` (:func:`run`) runs the sweep once: ``tokentrack.cleanup_expired_reservations()``
(one transaction), or with ``--batch-size N`` batches of N reservations, each committed on its
own (what ``CALL tokentrack.sweep_expired_reservations(N)`` does, with the totals returned).
Each answer is read as the client reads it (:func:`tokentrack_client.answers.read_answer`,
:class:`~tokentrack_client.SweepResult`).

``cron install`` schedules ``CALL tokentrack.sweep_expired_reservations(50)`` every 2 hours
(``0 */2 * * *``) through pg_cron, under a fixed job name, idempotently: pg_cron (1.3 and
later) upserts a named job on (job name, user), and an unchanged job is left alone. pg_cron
lives in one database of the server (``cron.database_name``); when that is not the
tokentrack database, the job is created there with ``cron.schedule_in_database`` (pg_cron
1.4 and later), connecting with the same URL and that database name (or
``--cron-database-url``). When pg_cron is not installed or not loaded, it says so and what
to do, and schedules nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from tokentrack_client.answers import read_answer
from tokentrack_client.connection import pg_error
from tokentrack_client.errors import TokenTrackError
from tokentrack_client.ops._common import OpsError, connected, iso, require_installed
from tokentrack_client.results import SweepResult

DEFAULT_JOB_NAME: Final = "tokentrack-expiry-sweep"
DEFAULT_SCHEDULE: Final = "0 */2 * * *"
DEFAULT_BATCH_SIZE: Final = 50
SWEEP_PROCEDURE: Final = "tokentrack.sweep_expired_reservations(integer)"
_SWEEP_ALL: Final = "SELECT tokentrack.cleanup_expired_reservations()::text"
_SWEEP_BATCH: Final = "SELECT tokentrack.expire_reservations($1)::text"


class CronUnavailable(OpsError):
    """pg_cron is not installed or not loaded on the server: nothing was scheduled."""


# --------------------------------------------------------------------------------------------
# cleanup: the sweep, once
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepRun:
    """What one ``tokentrack cleanup`` run did: the sweep's :class:`SweepResult`, summed over
    the ``batches`` transactions it took (1 without ``--batch-size``)."""

    result: SweepResult
    batches: int

    def as_json(self) -> dict[str, int]:
        """The figures of ``tokentrack cleanup --json``."""
        return {
            "expired": self.result.expired,
            "billed_tokens": self.result.billed_tokens,
            "steps": self.result.steps,
            "batches": self.batches,
        }

    def render(self) -> str:
        """One line for the terminal."""
        swept = self.result
        return (
            f"cleanup: expired {swept.expired} reservation(s), billed {swept.billed_tokens} "
            f"tokens ({swept.steps} step(s)) in {self.batches} transaction(s)"
        )


async def _sweep_once(
    conn: asyncpg.Connection, function: str, sql: str, *args: object
) -> SweepResult:
    """One sweep transaction's answer, read as the client reads it."""
    try:
        return SweepResult.from_answer(read_answer(function, await conn.fetchval(sql, *args)))
    except TokenTrackError as exc:
        raise OpsError(f"{function}: {exc}") from exc


def _sum(results: list[SweepResult]) -> SweepResult:
    return SweepResult(
        expired=sum(r.expired for r in results),
        billed_tokens=sum(r.billed_tokens for r in results),
        steps=sum(r.steps for r in results),
    )


async def run(dsn: str, *, batch_size: int | None = None) -> SweepRun:
    """Run the expiry sweep once; with ``batch_size``, commit after every batch."""
    if batch_size is not None and batch_size < 1:
        raise OpsError(f"--batch-size must be at least 1 (got {batch_size})")
    async with connected(dsn, "tokentrack cleanup") as conn:
        await require_installed(conn, table="report_reservations")
        if batch_size is None:
            return SweepRun(
                await _sweep_once(conn, "cleanup_expired_reservations", _SWEEP_ALL), batches=1
            )
        batches: list[SweepResult] = []
        while True:
            # Each call is its own transaction (autocommit), as in sweep_expired_reservations.
            batch = await _sweep_once(conn, "expire_reservations", _SWEEP_BATCH, batch_size)
            batches.append(batch)
            if batch.expired < batch_size:
                return SweepRun(_sum(batches), batches=len(batches))


# --------------------------------------------------------------------------------------------
# cron
# --------------------------------------------------------------------------------------------


def sweep_command(batch_size: int = DEFAULT_BATCH_SIZE) -> str:
    """The SQL the pg_cron job runs."""
    return f"CALL tokentrack.sweep_expired_reservations({int(batch_size)})"


@dataclass(frozen=True)
class CronJob:
    """A pg_cron job as stored in ``cron.job``."""

    jobid: int
    jobname: str
    schedule: str
    command: str
    database: str
    username: str
    active: bool


@dataclass(frozen=True)
class CronResult:
    """What ``cron install`` / ``cron remove`` did."""

    action: str  # created | updated | unchanged | removed | absent
    job: CronJob | None
    cron_database: str
    extension_version: str
    created_extension: bool = False

    def render(self) -> str:
        """Lines for the terminal."""
        lines = []
        if self.created_extension:
            lines.append(f"cron: created extension pg_cron in database {self.cron_database}")
        job = self.job
        if self.action == "absent":
            lines.append("cron: no tokentrack sweep job was scheduled; nothing to remove")
        elif self.action == "removed" and job is not None:
            lines.append(f"cron: removed job {job.jobid} ({job.jobname})")
        elif job is not None:
            lines.append(
                f"cron: job {job.jobid} '{job.jobname}' {self.action}: '{job.schedule}' runs "
                f"{job.command!r} in database {job.database} as {job.username} "
                f"(pg_cron {self.extension_version}, in database {self.cron_database})"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class _CronSite:
    target_db: str
    cron_db: str
    version: str
    created_extension: bool


def _with_database(dsn: str, dbname: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))


async def _preloaded(conn: asyncpg.Connection) -> bool:
    libraries = await conn.fetchval("SELECT current_setting('shared_preload_libraries')")
    names = [name.strip().strip('"') for name in str(libraries).split(",")]
    return "pg_cron" in names


async def _locate(conn: asyncpg.Connection) -> tuple[str, str]:
    """(this database, pg_cron's database), or CronUnavailable with what to do."""
    available = await conn.fetchrow(
        "SELECT default_version FROM pg_available_extensions WHERE name = 'pg_cron'"
    )
    if available is None:
        raise CronUnavailable(
            "pg_cron is not installed on this server, so nothing was scheduled: install it "
            "(Debian: apt-get install postgresql-15-cron), add pg_cron to "
            "shared_preload_libraries, restart, and run this again; or run `tokentrack cleanup` "
            "every 2 hours from another scheduler"
        )
    if not await _preloaded(conn):
        raise CronUnavailable(
            "pg_cron is installed but not loaded, so nothing was scheduled: add pg_cron to "
            "shared_preload_libraries (and set cron.database_name), restart the server, and run "
            "this again"
        )
    target_db = str(await conn.fetchval("SELECT current_database()"))
    cron_db = await conn.fetchval("SELECT current_setting('cron.database_name', true)")
    return target_db, str(cron_db or "postgres")


@asynccontextmanager
async def _cron_connection(
    dsn: str, cron_dsn: str | None, *, create_extension: bool
) -> AsyncIterator[tuple[asyncpg.Connection, _CronSite]]:
    async with connected(dsn, "tokentrack cron") as conn:
        target_db, cron_db = await _locate(conn)
        if cron_db == target_db and cron_dsn is None:
            site = await _ensure_extension(conn, target_db, cron_db, create_extension)
            yield conn, site
            return
        async with connected(cron_dsn or _with_database(dsn, cron_db), "tokentrack cron") as cconn:
            actual = str(await cconn.fetchval("SELECT current_database()"))
            if actual != cron_db:
                raise OpsError(
                    f"--cron-database-url points at database {actual}, but pg_cron runs in "
                    f"{cron_db} (cron.database_name)"
                )
            site = await _ensure_extension(cconn, target_db, cron_db, create_extension)
            yield cconn, site


async def _ensure_extension(
    conn: asyncpg.Connection, target_db: str, cron_db: str, create: bool
) -> _CronSite:
    version = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'")
    created = False
    if version is None:
        if not create:
            raise CronUnavailable(
                f"pg_cron is loaded but the extension is not created in database {cron_db}: "
                "nothing is scheduled"
            )
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_cron")
        except asyncpg.PostgresError as exc:
            raise OpsError(
                f"cannot create extension pg_cron in database {cron_db}: {pg_error(exc)}; a "
                "superuser must run CREATE EXTENSION pg_cron there"
            ) from exc
        version = await conn.fetchval(
            "SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'"
        )
        created = True
    return _CronSite(target_db, cron_db, str(version), created)


async def _find_job(conn: asyncpg.Connection, job_name: str) -> CronJob | None:
    row = await conn.fetchrow(
        "SELECT jobid, jobname, schedule, command, database, username, active FROM cron.job"
        " WHERE jobname = $1 AND username = current_user",
        job_name,
    )
    if row is None:
        return None
    return CronJob(
        jobid=int(row["jobid"]),
        jobname=str(row["jobname"]),
        schedule=str(row["schedule"]),
        command=str(row["command"]),
        database=str(row["database"]),
        username=str(row["username"]),
        active=bool(row["active"]),
    )


async def install_cron(
    dsn: str,
    *,
    schedule: str = DEFAULT_SCHEDULE,
    job_name: str = DEFAULT_JOB_NAME,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cron_dsn: str | None = None,
) -> CronResult:
    """Schedule the sweep through pg_cron (idempotent); CronUnavailable when pg_cron is not."""
    if batch_size < 1:
        raise OpsError(f"--batch-size must be at least 1 (got {batch_size})")
    command = sweep_command(batch_size)
    async with connected(dsn, "tokentrack cron") as conn:
        if not await conn.fetchval("SELECT to_regprocedure($1) IS NOT NULL", SWEEP_PROCEDURE):
            raise OpsError(
                f"{SWEEP_PROCEDURE} not found in this database: install tokentrack first "
                "(make install-sql DATABASE_URL=...)"
            )
        allowed = await conn.fetchval(
            "SELECT has_function_privilege(current_user, $1, 'EXECUTE')", SWEEP_PROCEDURE
        )
        if not allowed:
            user = await conn.fetchval("SELECT current_user")
            raise OpsError(
                f"the job would run as {user}, who may not EXECUTE {SWEEP_PROCEDURE}: "
                f"GRANT tokentrack_service TO {user}, or install the job as the owner"
            )
    async with _cron_connection(dsn, cron_dsn, create_extension=True) as (cconn, site):
        before = await _find_job(cconn, job_name)
        wanted = (schedule, command, site.target_db)
        if (
            before is not None
            and before.active
            and (before.schedule, before.command, before.database) == wanted
        ):
            return CronResult(
                "unchanged", before, site.cron_db, site.version, site.created_extension
            )
        try:
            if site.target_db == site.cron_db:
                await cconn.fetchval(
                    "SELECT cron.schedule($1, $2, $3)", job_name, schedule, command
                )
            else:
                await cconn.fetchval(
                    "SELECT cron.schedule_in_database($1, $2, $3, $4)",
                    job_name,
                    schedule,
                    command,
                    site.target_db,
                )
        except asyncpg.PostgresError as exc:
            raise OpsError(f"pg_cron refused the job: {pg_error(exc)}") from exc
        after = await _find_job(cconn, job_name)
        if after is None:  # pragma: no cover - cron.schedule just wrote it
            raise OpsError("pg_cron did not record the job")
        if not after.active or after.database != site.target_db:
            await cconn.execute(
                "SELECT cron.alter_job($1, database => $2, active => true)",
                after.jobid,
                site.target_db,
            )
            after = await _find_job(cconn, job_name)
            assert after is not None
        action = "created" if before is None else "updated"
        return CronResult(action, after, site.cron_db, site.version, site.created_extension)


async def remove_cron(
    dsn: str, *, job_name: str = DEFAULT_JOB_NAME, cron_dsn: str | None = None
) -> CronResult:
    """Unschedule the sweep job (before a rollback of version 20260108000000)."""
    async with _cron_connection(dsn, cron_dsn, create_extension=False) as (cconn, site):
        job = await _find_job(cconn, job_name)
        if job is None:
            return CronResult("absent", None, site.cron_db, site.version)
        await cconn.fetchval("SELECT cron.unschedule($1::bigint)", job.jobid)
        return CronResult("removed", job, site.cron_db, site.version)


async def cron_status(
    dsn: str, *, job_name: str = DEFAULT_JOB_NAME, cron_dsn: str | None = None, runs: int = 5
) -> dict[str, Any]:
    """The job and its last runs (from cron.job_run_details)."""
    async with _cron_connection(dsn, cron_dsn, create_extension=False) as (cconn, site):
        job = await _find_job(cconn, job_name)
        recent: list[dict[str, Any]] = []
        if job is not None and await cconn.fetchval(
            "SELECT to_regclass('cron.job_run_details') IS NOT NULL"
        ):
            for r in await cconn.fetch(
                "SELECT runid, status, return_message, start_time, end_time"
                " FROM cron.job_run_details WHERE jobid = $1 ORDER BY runid DESC LIMIT $2",
                job.jobid,
                runs,
            ):
                recent.append(
                    {
                        "runid": int(r["runid"]),
                        "status": r["status"],
                        "return_message": r["return_message"],
                        "start_time": iso(r["start_time"]),
                        "end_time": iso(r["end_time"]),
                    }
                )
        return {
            "cron_database": site.cron_db,
            "pg_cron": site.version,
            "job": None if job is None else job.__dict__,
            "runs": recent,
        }
