"""``tokentrack cleanup`` and ``tokentrack cron install|remove|status``: the expiry sweep.

``cleanup`` (:func:`run`) runs the sweep once, in batches of ``--batch-size`` reservations
(default 100, as the procedure), each committed on its own: ``tokentrack.expire_reservations(N)``
per transaction, what ``CALL tokentrack.sweep_expired_reservations(N)`` does, with the totals
returned. It goes on until a batch expires nothing; a short batch does not stop it (rows that
a concurrent finalize billed drop out of a batch, and reservations come due while it runs).
So no period stays locked for longer than one batch. It never calls
``tokentrack.cleanup_expired_reservations()``, which sweeps everything in one transaction
(its SQL contract stays, for callers that want exactly that). Each answer is read as the
client reads it (:func:`tokentrack_client.answers.read_answer`,
:class:`~tokentrack_client.SweepResult`).

``cron install`` schedules ``CALL tokentrack.sweep_expired_reservations(100)`` every 2 hours
(``0 */2 * * *``) through pg_cron, under a fixed job name, idempotently: pg_cron (1.3 and
later) upserts a named job on (job name, user), and an unchanged job is left alone. pg_cron
lives in one database of the server (``cron.database_name``); when that is not the
tokentrack database, the job is created there with ``cron.schedule_in_database`` (pg_cron
1.4 and later), connecting with the same URL and that database name (or
``--cron-database-url``).

Everything works for a role that is not a superuser (the database owner), as pg_cron allows:
a role with USAGE on schema ``cron`` schedules, sees and removes its own jobs (a job in
another database also needs EXECUTE on ``cron.schedule_in_database``, which pg_cron revokes
from PUBLIC). Such a role may not read ``shared_preload_libraries`` or pg_cron's settings
(they need ``pg_read_all_settings``), so pg_cron is found without them
(:func:`_locate`): ``pg_available_extensions`` (installed on the server), whether pg_cron's
own superuser-only setting ``cron.database_name`` is defined (loaded), ``pg_extension`` and
the privileges on schema ``cron`` (created and usable); pg_cron's database is
``cron.database_name`` when readable, else this database when the extension is here, else
``postgres`` (pg_cron's default), said so in every message. Where pg_cron is not installed,
loaded, created or usable by the role, :class:`CronUnavailable` says which and what to do,
on one line, and nothing is scheduled.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
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
DEFAULT_BATCH_SIZE: Final = 100
SWEEP_PROCEDURE: Final = "tokentrack.sweep_expired_reservations(integer)"
_SWEEP_BATCH: Final = "SELECT tokentrack.expire_reservations($1)::text"
_SCHEDULE_IN_DATABASE: Final = "cron.schedule_in_database(text,text,text,text,text,boolean)"
_ALTER_JOB: Final = "cron.alter_job(bigint,text,text,text,text,boolean)"
PG_CRON_DEFAULT_DATABASE: Final = "postgres"


class CronUnavailable(OpsError):
    """pg_cron is not installed, not loaded, not created, or not usable by this role on the
    server: nothing was scheduled (``--if-available`` turns it into a notice)."""


# --------------------------------------------------------------------------------------------
# cleanup: the sweep, once
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepRun:
    """What one ``tokentrack cleanup`` run did: the sweep's :class:`SweepResult`, summed over
    the ``batches`` transactions it took (the last one found nothing due)."""

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


async def run(dsn: str, *, batch_size: int = DEFAULT_BATCH_SIZE) -> SweepRun:
    """Run the expiry sweep once, committing after every batch of ``batch_size``, until a
    batch expires nothing."""
    if batch_size < 1:
        raise OpsError(f"--batch-size must be at least 1 (got {batch_size})")
    async with connected(dsn, "tokentrack cleanup") as conn:
        await require_installed(conn, table="report_reservations")
        batches: list[SweepResult] = []
        while True:
            # Each call is its own transaction (autocommit), as in sweep_expired_reservations.
            batch = await _sweep_once(conn, "expire_reservations", _SWEEP_BATCH, batch_size)
            batches.append(batch)
            # Not `expired < batch_size`: a short batch can leave due reservations behind (a
            # concurrent finalize took rows out of it while more came due). Bounded: every
            # further batch expires at least one reservation.
            if batch.expired == 0:
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
    """Where the job goes: the tokentrack database, pg_cron's database, pg_cron's version."""

    target_db: str
    cron_db: str
    role: str
    version: str
    created_extension: bool


@dataclass(frozen=True)
class _Located:
    """What :func:`_locate` found. ``known``: ``cron_db`` is pg_cron's database for sure
    (cron.database_name, or the extension is there), not the assumed default."""

    target_db: str
    cron_db: str
    role: str
    known: bool

    def assumed(self) -> str:
        """The note for a message when ``cron_db`` is only pg_cron's default."""
        if self.known:
            return ""
        return (
            f" (role {self.role} may not read cron.database_name, so pg_cron's default database "
            f"{self.cron_db} was assumed; pass --cron-database-url if pg_cron lives elsewhere)"
        )


def _with_database(dsn: str, dbname: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))


async def _setting(conn: asyncpg.Connection, name: str) -> tuple[str | None, bool]:
    """(value, readable): the value is None for a setting that is not defined; readable is
    False when this role may not read it (a superuser-only setting without
    pg_read_all_settings)."""
    try:
        value = await conn.fetchval("SELECT pg_catalog.current_setting($1, true)", name)
    except asyncpg.InsufficientPrivilegeError:
        return None, False
    return (None if value is None else str(value)), True


async def _loaded(conn: asyncpg.Connection) -> tuple[bool | None, str | None]:
    """(whether pg_cron is loaded, cron.database_name when this role may read it).

    ``shared_preload_libraries`` answers when readable (superuser, pg_read_all_settings).
    Otherwise pg_cron's own setting does: pg_cron defines ``cron.database_name`` as a
    superuser-only setting when it is loaded, so being refused it means loaded and an
    undefined one means not loaded. A value this role can read is a placeholder from
    postgresql.conf or a pg_cron that lets everyone read it: not known (None), and the calls
    that follow say what is wrong.
    """
    libraries, readable = await _setting(conn, "shared_preload_libraries")
    database, database_readable = await _setting(conn, "cron.database_name")
    if readable:
        names = [name.strip().strip('"') for name in str(libraries or "").split(",")]
        return "pg_cron" in names, database or PG_CRON_DEFAULT_DATABASE
    if not database_readable:
        return True, None
    if database is None:
        return False, None
    return None, database


async def _locate(conn: asyncpg.Connection) -> _Located:
    """This database and pg_cron's, or CronUnavailable with what to do."""
    available = await conn.fetchrow(
        "SELECT default_version FROM pg_catalog.pg_available_extensions WHERE name = 'pg_cron'"
    )
    if available is None:
        raise CronUnavailable(
            "pg_cron is not installed on this server, so nothing was scheduled: install it "
            "(Debian: apt-get install postgresql-15-cron), add pg_cron to "
            "shared_preload_libraries, restart, and run this again; or run `tokentrack cleanup` "
            "every 2 hours from another scheduler"
        )
    loaded, cron_db = await _loaded(conn)
    if loaded is False:
        raise CronUnavailable(
            "pg_cron is installed but not loaded, so nothing was scheduled: add pg_cron to "
            "shared_preload_libraries (and set cron.database_name), restart the server, and run "
            "this again"
        )
    row = await conn.fetchrow(
        "SELECT pg_catalog.current_database()::text AS db, current_user::text AS role,"
        " EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'pg_cron') AS here"
    )
    assert row is not None
    target_db, role = str(row["db"]), str(row["role"])
    if cron_db is not None:
        return _Located(target_db, cron_db, role, known=True)
    if row["here"]:
        # pg_cron's extension script creates it only in cron.database_name.
        return _Located(target_db, target_db, role, known=True)
    return _Located(target_db, PG_CRON_DEFAULT_DATABASE, role, known=False)


@asynccontextmanager
async def _cron_connection(
    dsn: str, cron_dsn: str | None, *, create_extension: bool
) -> AsyncIterator[tuple[asyncpg.Connection, _CronSite]]:
    async with connected(dsn, "tokentrack cron") as conn:
        where = await _locate(conn)
        if where.cron_db == where.target_db and cron_dsn is None:
            site = await _ensure_extension(conn, where, create_extension)
            yield conn, site
            return
        async with connected(
            cron_dsn or _with_database(dsn, where.cron_db), "tokentrack cron"
        ) as cconn:
            actual = str(await cconn.fetchval("SELECT pg_catalog.current_database()::text"))
            if where.known and actual != where.cron_db:
                raise OpsError(
                    f"--cron-database-url points at database {actual}, but pg_cron runs in "
                    f"{where.cron_db} (cron.database_name)"
                )
            # An operator's --cron-database-url names pg_cron's database: no longer assumed.
            where = replace(where, cron_db=actual, known=where.known or cron_dsn is not None)
            site = await _ensure_extension(cconn, where, create_extension)
            yield cconn, site


async def _ensure_extension(conn: asyncpg.Connection, where: _Located, create: bool) -> _CronSite:
    """pg_cron's version in ``where.cron_db`` (created first when ``create``), once this role
    may use it; CronUnavailable otherwise."""
    version = await conn.fetchval(
        "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_cron'"
    )
    created = False
    if version is None:
        if not create:
            raise CronUnavailable(
                f"the pg_cron extension is not created in database {where.cron_db}"
                f"{where.assumed()}, so no tokentrack job is scheduled there"
            )
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_cron")
        except asyncpg.PostgresError as exc:
            raise CronUnavailable(
                f"cannot create extension pg_cron in database {where.cron_db} as role "
                f"{where.role}{where.assumed()}: {pg_error(exc)}; so nothing was scheduled: a "
                f"superuser must run CREATE EXTENSION pg_cron there (and GRANT USAGE ON SCHEMA "
                f"cron TO {where.role})"
            ) from exc
        version = await conn.fetchval(
            "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_cron'"
        )
        created = True
    usable = await conn.fetchval(
        "SELECT pg_catalog.has_schema_privilege('cron', 'USAGE')"
        " AND pg_catalog.has_table_privilege('cron.job', 'SELECT')"
    )
    if not usable:
        raise CronUnavailable(
            f"pg_cron {version} is in database {where.cron_db}, but role {where.role} may not "
            "use it (no USAGE on schema cron), so it can neither see nor schedule jobs: an "
            f"administrator must run GRANT USAGE ON SCHEMA cron TO {where.role} in database "
            f"{where.cron_db}"
        )
    return _CronSite(where.target_db, where.cron_db, where.role, str(version), created)


async def _may_execute(conn: asyncpg.Connection, signature: str) -> bool | None:
    """Whether this role may EXECUTE ``signature``; None when pg_cron has no such function."""
    allowed = await conn.fetchval(
        "SELECT pg_catalog.has_function_privilege(pg_catalog.to_regprocedure($1), 'EXECUTE')",
        signature,
    )
    return None if allowed is None else bool(allowed)


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
        if site.target_db != site.cron_db:
            allowed = await _may_execute(cconn, _SCHEDULE_IN_DATABASE)
            if not allowed:
                reason = (
                    f"pg_cron {site.version} has no cron.schedule_in_database (pg_cron 1.4 and "
                    "later have it)"
                    if allowed is None
                    else f"role {site.role} may not EXECUTE cron.schedule_in_database in "
                    f"database {site.cron_db} (pg_cron revokes it from PUBLIC)"
                )
                raise CronUnavailable(
                    f"{reason}, which a job in database {site.target_db} needs, so nothing was "
                    f"scheduled: an administrator must run GRANT EXECUTE ON FUNCTION "
                    f"{_SCHEDULE_IN_DATABASE} TO {site.role} there, or install tokentrack in "
                    f"database {site.cron_db}"
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
            after = await _repair(cconn, after, site, schedule, command)
        action = "created" if before is None else "updated"
        return CronResult(action, after, site.cron_db, site.version, site.created_extension)


async def _repair(
    conn: asyncpg.Connection, job: CronJob, site: _CronSite, schedule: str, command: str
) -> CronJob:
    """An upserted job left inactive or in another database (pg_cron's upsert keeps those):
    cron.alter_job where this role may call it (pg_cron revokes it from PUBLIC), else the job
    is unscheduled and scheduled again (a new jobid)."""
    if await _may_execute(conn, _ALTER_JOB):
        await conn.execute(
            "SELECT cron.alter_job($1, database => $2, active => true)", job.jobid, site.target_db
        )
    else:
        await conn.fetchval("SELECT cron.unschedule($1::bigint)", job.jobid)
        if site.target_db == site.cron_db:
            await conn.fetchval("SELECT cron.schedule($1, $2, $3)", job.jobname, schedule, command)
        else:
            await conn.fetchval(
                "SELECT cron.schedule_in_database($1, $2, $3, $4)",
                job.jobname,
                schedule,
                command,
                site.target_db,
            )
    repaired = await _find_job(conn, job.jobname)
    if repaired is None:  # pragma: no cover - just scheduled
        raise OpsError("pg_cron did not record the job")
    return repaired


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
