"""Version 20261214000000, part wpath: the write path without the steps' foreign keys to
their account, period and ledger row, the billing indexes and the BEFORE row trigger keeps what
they guaranteed (issue #16).

- deleting an account that has steps is refused with 23503 even where no remaining foreign
  key refuses (rows written by the schema owner directly);
- billing is a HOT update (no index covers the billing columns; fillfactor leaves room);
- a billed step stays immutable under the AFTER trigger, and the failed statement leaves the
  row as it was;
- new ids are time-ordered uuids (version 7).
"""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from sqlkit import call, counts, new_account, reserve, step


async def _step_of_another_accounts_report(conn: asyncpg.Connection, account: uuid.UUID) -> None:
    """A step naming ``account`` whose report is another account's (the schema owner writing
    directly): no remaining foreign key ties it to ``account``, only the trigger."""
    other = await new_account(conn)
    report = uuid.uuid4()
    await conn.execute(
        "INSERT INTO tokentrack.reports (id, account_id, status) VALUES ($1, $2, 'processing')",
        report,
        other,
    )
    await conn.execute(
        "INSERT INTO tokentrack.report_step_usage"
        " (report_id, account_id, step_name, input_tokens, output_tokens, total_tokens)"
        " VALUES ($1, $2, 'AN0', 1, 1, 2)",
        report,
        account,
    )


async def test_deleting_an_account_with_steps_is_refused_by_the_guard(
    conn: asyncpg.Connection,
) -> None:
    account = uuid.uuid4()
    await conn.execute("INSERT INTO tokentrack.accounts (id) VALUES ($1)", account)
    await _step_of_another_accounts_report(conn, account)
    before = await counts(conn)
    with pytest.raises(asyncpg.ForeignKeyViolationError) as caught:
        await conn.execute("DELETE FROM tokentrack.accounts WHERE id = $1", account)
    assert caught.value.constraint_name == "report_step_usage_account_fk"
    assert caught.value.table_name == "report_step_usage"
    assert str(account) in (caught.value.detail or "")
    assert await counts(conn) == before
    assert (
        await conn.fetchval("SELECT count(*) FROM tokentrack.accounts WHERE id = $1", account) == 1
    )


async def test_an_account_without_billing_rows_can_still_be_deleted(
    conn: asyncpg.Connection,
) -> None:
    account = uuid.uuid4()
    await conn.execute("INSERT INTO tokentrack.accounts (id) VALUES ($1)", account)
    assert await conn.execute("DELETE FROM tokentrack.accounts WHERE id = $1", account) == (
        "DELETE 1"
    )


async def test_billing_leaves_the_steps_on_their_page_and_in_no_new_index_entry(
    conn: asyncpg.Connection,
) -> None:
    assert await conn.fetchval(
        "SELECT reloptions FROM pg_class WHERE oid = 'tokentrack.report_step_usage'::regclass"
    ) == ["fillfactor=70"]
    covered = await conn.fetch(
        "SELECT a.attname FROM pg_index AS i"
        " INNER JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)"
        " WHERE i.indrelid = 'tokentrack.report_step_usage'::regclass"
        " AND a.attname IN ('billed_at', 'billed_period_id', 'billing_entry_id')"
    )
    assert covered == []
    account = await new_account(conn)
    report, _ = await reserve(conn, account)
    for name in ("AN0", "AN1", "AN2"):
        await step(conn, report, account, name, 10, 5)
    before = await conn.fetch(
        "SELECT step_name, ctid::text FROM tokentrack.report_step_usage"
        " WHERE report_id = $1 ORDER BY step_name",
        report,
    )
    answer = await call(conn, "finalize_report_usage", report, account)
    assert (answer["success"], answer["billed_tokens"]) == (True, 45)
    after = await conn.fetch(
        "SELECT step_name, ctid::text, billing_entry_id IS NOT NULL AS billed"
        " FROM tokentrack.report_step_usage WHERE report_id = $1 ORDER BY step_name",
        report,
    )
    # A HOT update writes the new version on the old one's page.
    for old, new in zip(before, after, strict=True):
        assert new["billed"] is True
        assert old["ctid"].split(",")[0] == new["ctid"].split(",")[0]


async def test_a_billed_step_stays_as_it_was_when_an_update_is_refused(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    report, _ = await reserve(conn, account)
    await step(conn, report, account, "AN0", 10, 5)
    await call(conn, "finalize_report_usage", report, account)
    before = await conn.fetchrow(
        "SELECT s.*, s.ctid::text AS at FROM tokentrack.report_step_usage AS s"
        " WHERE s.report_id = $1",
        report,
    )
    with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError):
        await conn.execute(
            "UPDATE tokentrack.report_step_usage SET total_tokens = 99 WHERE report_id = $1",
            report,
        )
    with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError):
        await conn.execute("DELETE FROM tokentrack.report_step_usage WHERE report_id = $1", report)
    after = await conn.fetchrow(
        "SELECT s.*, s.ctid::text AS at FROM tokentrack.report_step_usage AS s"
        " WHERE s.report_id = $1",
        report,
    )
    assert after == before


async def test_new_ids_are_time_ordered_version_7_uuids(conn: asyncpg.Connection) -> None:
    ids = [await conn.fetchval("SELECT tokentrack.uuid_v7()") for _ in range(3)]
    assert all(isinstance(i, uuid.UUID) and i.version == 7 for i in ids)
    assert all(i.variant == uuid.RFC_4122 for i in ids)
    assert len(set(ids)) == 3
    now_ms = await conn.fetchval("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint")
    assert abs((ids[0].int >> 80) - now_ms) < 60_000
    account = await new_account(conn)
    report, _ = await reserve(conn, account)
    await step(conn, report, account, "AN0", 1, 1)
    step_id = await conn.fetchval(
        "SELECT id FROM tokentrack.report_step_usage WHERE report_id = $1", report
    )
    reservation_id = await conn.fetchval(
        "SELECT id FROM tokentrack.report_reservations WHERE report_id = $1", report
    )
    assert step_id.version == 7
    assert reservation_id.version == 7
