"""Security: the replaceable account hook, the Supabase recipes and the audit queries.

The SQL blocks of docs/SECURITY.md marked ``<!-- tested: NAME -->`` are run here verbatim
(role and schema names are made unique for the shared test cluster), so the documentation
cannot drift from what works.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from securitykit import (
    Account,
    LoginRoles,
    assert_denied,
    login_roles,
    rows_by_account,
    seed_account,
)
from sqlkit import TABLES
from tokentrack_client import migrate

SECURITY_DOC = Path(__file__).resolve().parents[2] / "docs" / "SECURITY.md"

# Supabase's own definition of auth.uid() (the JWT's sub), stubbed in a schema of the test.
SUPABASE_UID = """
CREATE FUNCTION {schema}.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        nullif(current_setting('request.jwt.claim.sub', true), ''),
        (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
    )::uuid
$$
"""


def doc_sql(name: str) -> str:
    """The ```sql block that follows ``<!-- tested: name -->`` in docs/SECURITY.md."""
    text = SECURITY_DOC.read_text(encoding="utf-8")
    marker = f"<!-- tested: {name} -->\n"
    assert text.count(marker) == 1, f"{marker!r} must appear once in {SECURITY_DOC}"
    found = re.match(r"```sql\n(.*?)\n```", text[text.index(marker) + len(marker) :], re.S)
    assert found, f"no ```sql block right after {marker!r}"
    return found.group(1)


@pytest.fixture
async def roles(conn: asyncpg.Connection, db_dsn: str) -> AsyncIterator[LoginRoles]:
    async with login_roles(conn, db_dsn) as made:
        yield made


@pytest.fixture
async def accounts(conn: asyncpg.Connection) -> tuple[Account, Account]:
    return await seed_account(conn), await seed_account(conn)


async def visible(connection: asyncpg.Connection, setting: str, value: str) -> dict[str, set]:
    """{table: account ids seen} inside a transaction with ``setting`` set locally."""
    async with connection.transaction():
        await connection.execute("SELECT pg_catalog.set_config($1, $2, true)", setting, value)
        return {t: set(n) for t, n in (await rows_by_account(connection)).items()}


def only(account: uuid.UUID) -> dict[str, set]:
    return {t: {account} for t in TABLES}


NOTHING: dict[str, set] = {t: set() for t in TABLES}


async def test_the_policies_follow_a_replaced_hook(
    conn: asyncpg.Connection, roles: LoginRoles, accounts: tuple[Account, Account]
) -> None:
    a, b = (x.id for x in accounts)
    reader = await roles.connect(await roles.create("reader", "tokentrack_reader"))
    assert await visible(reader, "tokentrack.account_id", str(a)) == only(a)
    assert await visible(reader, "app.tenant_id", str(b)) == NOTHING

    hook = "SELECT 'tokentrack.current_account_id()'::regprocedure::oid"
    acl = "SELECT proacl::text[] FROM pg_proc WHERE oid = $1"
    oid = await conn.fetchval(hook)
    grants = await conn.fetchval(acl, oid)
    await conn.execute(doc_sql("hook-other-setting"))
    assert await conn.fetchval(hook) == oid  # the same function: the policies follow it
    assert await conn.fetchval(acl, oid) == grants  # and it keeps its grants

    # The same reader connection, the new body: app.tenant_id decides, the old setting is moot.
    assert await visible(reader, "app.tenant_id", str(b)) == only(b)
    assert await visible(reader, "app.tenant_id", str(a)) == only(a)
    assert await visible(reader, "tokentrack.account_id", str(a)) == NOTHING

    # Dropping the hook instead of replacing it is refused: the policies depend on it.
    with pytest.raises(asyncpg.DependentObjectsStillExistError):
        await conn.execute("DROP FUNCTION tokentrack.current_account_id()")


async def test_supabase_auth_uid_hook_and_the_noinherit_authenticated_role(
    conn: asyncpg.Connection, roles: LoginRoles, accounts: tuple[Account, Account]
) -> None:
    a, b = (x.id for x in accounts)
    # Supabase's shape: NOINHERIT authenticated, and a NOINHERIT login role (PostgREST's
    # authenticator) that switches to it per request and sets the JWT claims.
    authenticated = await roles.create("authenticated", login=False, options="NOINHERIT")
    authenticator = await roles.create("authenticator", authenticated, options="NOINHERIT")
    auth = f"tt_sec_auth_{uuid.uuid4().hex[:8]}"
    await conn.execute(f"CREATE SCHEMA {auth}")
    await conn.execute(SUPABASE_UID.format(schema=auth))
    await conn.execute(f"GRANT USAGE ON SCHEMA {auth} TO {authenticated}")

    def supabase(sql: str) -> str:
        sql = re.sub(r"\bauthenticated\b", authenticated, sql)
        return sql.replace("auth.uid()", f"{auth}.uid()")

    await conn.execute(supabase(doc_sql("supabase-hook")))
    web = await roles.connect(authenticator)

    async def as_user(sub: uuid.UUID | None) -> dict[str, set]:
        async with web.transaction():
            await web.execute(f"SET LOCAL ROLE {authenticated}")
            claims = json.dumps({"sub": str(sub), "role": "authenticated"}) if sub else ""
            await web.execute("SELECT set_config('request.jwt.claims', $1, true)", claims)
            return {t: set(n) for t, n in (await rows_by_account(web)).items()}

    # The pitfall the docs warn about: a plain GRANT does nothing for a NOINHERIT role.
    await conn.execute(f"GRANT tokentrack_reader TO {authenticated}")
    await assert_denied(lambda: as_user(a), "NOINHERIT authenticated with a plain GRANT")

    # The documented PostgreSQL 15 recipe.
    await conn.execute(supabase(doc_sql("supabase-reader-pg15")))
    assert await as_user(a) == only(a)
    assert await as_user(b) == only(b)
    assert await as_user(uuid.uuid4()) == NOTHING
    assert await as_user(None) == NOTHING
    # The user cannot pick another account through tokentrack's own setting any more.
    async with web.transaction():
        await web.execute(f"SET LOCAL ROLE {authenticated}")
        await web.execute(f"SET LOCAL tokentrack.account_id = '{b}'")
        claims = json.dumps({"sub": str(a)})
        await web.execute("SELECT set_config('request.jwt.claims', $1, true)", claims)
        assert {t: set(n) for t, n in (await rows_by_account(web)).items()} == only(a)
        # ...and still writes nothing and calls nothing.
        for sql in (
            "DELETE FROM tokentrack.usage_ledger",
            "UPDATE tokentrack.usage_periods SET tokens_used = 0",
            f"SELECT tokentrack.finalize_report_usage('{accounts[0].running_report}', '{a}')",
        ):

            async def attempt(sql: str = sql) -> None:
                async with web.transaction():  # a savepoint per attempt
                    await web.execute(sql)

            await assert_denied(attempt, f"authenticated: {sql}")


AUDITS = ("audit-privileges", "audit-functions", "audit-rls")


async def test_the_audit_queries_pass_on_a_fresh_install(conn: asyncpg.Connection) -> None:
    for name in AUDITS:
        assert await conn.fetch(doc_sql(name)) == [], name


async def test_the_audit_queries_catch_default_privileges_and_stray_grants(
    empty_db_dsn: str, roles: LoginRoles
) -> None:
    # Default privileges of the installing role apply to tokentrack's objects too: the
    # install cannot know every role they name, the audit shows them.
    app = await roles.create("app")
    admin = await asyncpg.connect(empty_db_dsn)
    try:
        await admin.execute(f"ALTER DEFAULT PRIVILEGES GRANT INSERT, DELETE ON TABLES TO {app}")
        await admin.execute(f"ALTER DEFAULT PRIVILEGES GRANT EXECUTE ON FUNCTIONS TO {app}")
        await migrate.install(empty_db_dsn)
        tables = await admin.fetch(doc_sql("audit-privileges"))
        assert {(r["relname"], r["privilege_type"]) for r in tables} >= {
            (t, p) for t in TABLES for p in ("INSERT", "DELETE")
        }
        functions = await admin.fetch(doc_sql("audit-functions"))
        assert {r["grantee"] for r in functions} == {app}
        assert await admin.fetch(doc_sql("audit-rls")) == []
        await admin.execute("ALTER TABLE tokentrack.reports DISABLE ROW LEVEL SECURITY")
        await admin.execute(
            "CREATE POLICY oops ON tokentrack.usage_ledger FOR DELETE TO PUBLIC USING (true)"
        )
        problems = {(r["relname"], r["problem"]) for r in await admin.fetch(doc_sql("audit-rls"))}
        assert problems == {
            ("reports", "row level security disabled"),
            ("usage_ledger", "unexpected policy oops"),
        }
    finally:
        await admin.execute(f"DROP OWNED BY {app}")  # its default privileges, before DROP ROLE
        await admin.close()
