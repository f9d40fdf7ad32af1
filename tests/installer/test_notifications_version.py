"""Version 20261212000000 (notifications): its rollback refuses while notifications exist,
archives them with --archive (the functions it reworked come back as they were at the version
before), and a reinstall restores them, ids and delivery state included, so that no crossing
is notified twice and none is lost."""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest

from sqlkit import assert_reconciled, call, new_account, step
from tokentrack_client import migrate

NOTIFICATIONS = "20261212000000"
METRICS = "20261213000000"
WRITE_PATH = "20261214000000"
BEFORE = max(v.version for v in migrate.load_versions() if v.version < NOTIFICATIONS)
REWORKED = (
    "bill_budget_windows",
    "finalize_reservation",
    "reserve_usage",
    "extend_reservation",
    "health",
    "adjust_usage",
)


async def _reserve(conn: asyncpg.Connection, account: uuid.UUID, tokens: int) -> uuid.UUID:
    report = uuid.uuid4()
    answer = json.loads(
        await conn.fetchval(
            "SELECT tokentrack.reserve($1, $2, $3::jsonb)::text",
            account,
            report,
            json.dumps({"tokens": tokens}),
        )
    )
    assert answer["success"] is True, answer
    return report


async def _rows(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch(
        "SELECT t::text AS row FROM tokentrack.notifications AS t ORDER BY t.id"
    )
    return [r["row"] for r in rows]


def test_the_rollback_declares_the_notifications_as_billing_data() -> None:
    version = next(v for v in migrate.load_versions() if v.version == NOTIFICATIONS)
    assert version.billing_tables == ("notifications",)
    assert version.billing_columns == ()


async def test_rollback_refuses_then_archives_and_reinstall_restores_the_notifications(
    db_dsn: str,
) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        account = await new_account(conn)
        await call(conn, "set_budget", account, None, "tokens", "day", 1_000, "{}")
        report = await _reserve(conn, account, 850)  # crosses 80 %
        await step(conn, report, account, "S0", 30, 20)
        raw = await conn.fetchval("SELECT tokentrack.claim_notifications('alerts', 10)::text")
        claimed = json.loads(raw)["notifications"]
        assert [n["threshold"] for n in claimed] == [80]
        kept = await _rows(conn)

        with pytest.raises(migrate.RollbackRefused) as refused:
            await migrate.rollback(db_dsn, to=BEFORE)
        assert "tokentrack.notifications" in str(refused.value)
        assert "1 row" in str(refused.value)
        assert await _rows(conn) == kept  # nothing changed

        rolled = await migrate.rollback(db_dsn, to=BEFORE, archive=True)
        # The write path and metrics versions (no billing data of their own) go first, then
        # notifications.
        assert [v.version for v in rolled.versions] == [WRITE_PATH, METRICS, NOTIFICATIONS]
        assert await conn.fetchval("SELECT to_regclass('tokentrack.notifications')") is None
        archived = await conn.fetch(
            "SELECT id, threshold, claimed_by, archived_version"
            " FROM tokentrack_archive.notifications"
        )
        assert [tuple(r) for r in archived] == [(claimed[0]["id"], 80, "alerts", NOTIFICATIONS)]
        for name in REWORKED:
            source = await conn.fetchval(
                "SELECT source FROM tokentrack.schema_functions WHERE path = $1"
                " ORDER BY id DESC LIMIT 1",
                f"functions/{name}.sql",
            )
            history = migrate.default_sql_dir() / "history" / BEFORE / f"{name}.sql"
            assert source == history.read_text(), name
        for name in ("note_crossings", "claim_notifications", "ack_notification"):
            assert await conn.fetchval("SELECT to_regproc($1)", f"tokentrack.{name}") is None
        signatures = await conn.fetch(
            "SELECT oid::regprocedure::text AS s FROM pg_proc WHERE proname = 'bill_budget_windows'"
        )
        assert [r["s"] for r in signatures] == [
            "tokentrack.bill_budget_windows(uuid,jsonb,bigint,bigint)"
        ]
        # At the version before, reserving and billing work as they did (no notifications).
        await _reserve(conn, account, 100)  # 950 of 1,000
        settled = await call(conn, "finish_report", report, account, "complete", None)
        assert settled["billed_tokens"] == 50
        await assert_reconciled(conn)

        await migrate.install(db_dsn)
        assert await _rows(conn) == kept  # the same id, lease and attempts
        # The crossing already notified is not notified again; the identity goes on past it.
        # used 50 + held 100: back up to 800 crosses 80 % again, which was notified already.
        await _reserve(conn, account, 650)
        assert len(await _rows(conn)) == 1
        await _reserve(conn, account, 200)  # 1,000: crosses 100 %
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM tokentrack.notifications")]
        assert len(ids) == 2
        assert max(ids) > claimed[0]["id"]
        answer = await call(conn, "ack_notification", claimed[0]["id"], "alerts")
        assert answer["success"] is True
        await assert_reconciled(conn)
    finally:
        await conn.close()
