"""An install by a non-superuser CREATEROLE owner, and who may then add members to the roles.

PostgreSQL 16 changed CREATEROLE: a CREATEROLE role may grant, alter and drop only the roles
it holds ADMIN OPTION on, and it receives that option on each role it creates (with INHERIT
FALSE and SET FALSE under the default ``createrole_self_grant = ''``). Up to 15, CREATEROLE
alone could grant membership in any non-superuser role. Both cases are run on whatever major
the suite runs on (``make test PG=16``), each asserting that major's rule:

- the owner creates the two roles itself (first install on a cluster without them): on 16+
  it holds ADMIN OPTION on them, without their privileges; it can add an application's login
  to the service role, and that login calls the API;
- the roles were created beforehand by an administrator: the install needs nothing on them
  (docs/INSTALL.md, Privileges); on 16+ the owner's ``GRANT tokentrack_service TO app`` is
  refused (42501) until the administrator grants it ADMIN OPTION, up to 15 it is allowed.

Each test starts a server of its own: roles are cluster-wide and the session server has them.
The owner without CREATEROLE is test_first_install.py's.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from ops_history import tokentrack
from sqlkit import call
from tokentrack_client.testing import PostgresServer, run_in_thread

OWNER = "tt_creator"
APP = "tt_app_login"
ROLES = ("tokentrack_reader", "tokentrack_service")


@pytest.fixture
def server() -> Iterator[PostgresServer]:
    """A server of this test's own with a LOGIN CREATEDB CREATEROLE owner, no superuser."""
    with PostgresServer(prefix="tokentrack-createrole-") as pg:

        async def owner() -> None:
            admin = await asyncpg.connect(pg.dsn())
            try:
                await admin.execute(f"CREATE ROLE {OWNER} LOGIN CREATEDB CREATEROLE NOSUPERUSER")
            finally:
                await admin.close()

        run_in_thread(owner)
        yield pg


def as_role(server: PostgresServer, role: str, dbname: str) -> str:
    return f"postgresql://{role}@{server.host}:{server.port}/{dbname}"


async def admin_execute(server: PostgresServer, *statements: str) -> None:
    conn = await asyncpg.connect(server.dsn())
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def server_major(server: PostgresServer) -> int:
    conn = await asyncpg.connect(server.dsn())
    try:
        return int(await conn.fetchval("SHOW server_version_num")) // 10000
    finally:
        await conn.close()


async def install_as_owner(server: PostgresServer) -> str:
    """The owner creates its database (it owns it), installs tokentrack, and verify passes."""
    conn = await asyncpg.connect(as_role(server, OWNER, "postgres"))
    try:
        await conn.execute("CREATE DATABASE app")
    finally:
        await conn.close()
    dsn = as_role(server, OWNER, "app")
    installed = await tokentrack("migrate", "install", "--database-url", dsn)
    assert installed.code == 0, installed
    assert "tokentrack schema is now at version" in installed.out
    verified = await tokentrack("verify", "--database-url", dsn)
    assert verified.code == 0, verified.out + verified.err
    assert "verify: all checks passed" in verified.out
    return dsn


async def owner_memberships(server: PostgresServer) -> dict[str, tuple[bool, bool, bool]]:
    """role -> (admin_option, inherit, set) of the owner's membership in each tokentrack role.
    Up to 15 pg_auth_members has no inherit_option/set_option: (admin_option, True, True)."""
    conn = await asyncpg.connect(server.dsn())
    try:
        major = int(await conn.fetchval("SHOW server_version_num")) // 10000
        options = "m.inherit_option, m.set_option" if major >= 16 else "true, true"
        rows = await conn.fetch(
            f"SELECT r.rolname, m.admin_option, {options} FROM pg_auth_members m"
            " JOIN pg_roles r ON r.oid = m.roleid JOIN pg_roles u ON u.oid = m.member"
            " WHERE u.rolname = $1 AND r.rolname LIKE 'tokentrack%'",
            OWNER,
        )
        return {r[0]: (r[1], r[2], r[3]) for r in rows}
    finally:
        await conn.close()


async def owner_creates_app_login(server: PostgresServer, dsn: str) -> None:
    """The owner (CREATEROLE) creates the application's login role."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE ROLE {APP} LOGIN")
    finally:
        await conn.close()


async def owner_grants_service_to_app(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"GRANT tokentrack_service TO {APP}")
    finally:
        await conn.close()


async def app_calls_the_api(server: PostgresServer) -> None:
    """The application's login, a member of tokentrack_service, opens a period and reserves
    (try_reserve_tokens creates the report)."""
    conn = await asyncpg.connect(as_role(server, APP, "app"))
    try:
        account, report = uuid.uuid4(), uuid.uuid4()
        opened = await call(conn, "open_usage_period", account, 10_000, None)
        assert opened["success"] is True, opened
        reserved = await call(conn, "try_reserve_tokens", account, report, 1_000)
        assert reserved["success"] is True, reserved
    finally:
        await conn.close()


async def test_a_createrole_owner_creates_the_roles_installs_and_adds_members(
    server: PostgresServer,
) -> None:
    major = await server_major(server)
    dsn = await install_as_owner(server)

    # The roles were created by the owner: on 16+ it holds ADMIN OPTION on each, and neither
    # their privileges (INHERIT FALSE) nor SET ROLE to them (SET FALSE); up to 15 it is no
    # member at all (CREATEROLE was enough to manage them).
    memberships = await owner_memberships(server)
    if major >= 16:
        assert memberships == dict.fromkeys(ROLES, (True, False, False))
    else:
        assert memberships == {}

    # So the owner adds the application's login to the service role itself, on every major.
    await owner_creates_app_login(server, dsn)
    await owner_grants_service_to_app(dsn)
    await app_calls_the_api(server)

    # A rollback as that owner works, and leaves the cluster-wide roles (never dropped).
    rolled = await tokentrack("migrate", "rollback", "--steps", "1", "--database-url", dsn)
    assert rolled.code == 0, rolled
    conn = await asyncpg.connect(dsn)
    try:
        names = await conn.fetch(
            "SELECT rolname FROM pg_roles WHERE rolname = ANY($1::text[])", list(ROLES)
        )
        assert sorted(r[0] for r in names) == list(ROLES)
    finally:
        await conn.close()


async def test_a_createrole_owner_with_pre_created_roles_needs_admin_option_on_16(
    server: PostgresServer,
) -> None:
    major = await server_major(server)
    await admin_execute(server, *(f"CREATE ROLE {role} NOLOGIN" for role in ROLES))
    dsn = await install_as_owner(server)  # needs nothing on the roles, on every major
    assert await owner_memberships(server) == {}
    await owner_creates_app_login(server, dsn)

    if major >= 16:
        # CREATEROLE alone no longer grants membership in a role it did not create.
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="tokentrack_service"):
            await owner_grants_service_to_app(dsn)
        # docs/INSTALL.md: the administrator grants the right to grant, not the privileges.
        await admin_execute(
            server,
            f"GRANT tokentrack_service, tokentrack_reader TO {OWNER}"
            " WITH ADMIN OPTION, INHERIT FALSE, SET FALSE",
        )
    await owner_grants_service_to_app(dsn)
    await app_calls_the_api(server)
    verified = await tokentrack("verify", "--database-url", dsn)
    assert verified.code == 0, verified.out + verified.err
