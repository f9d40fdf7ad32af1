"""``tokentrack exporter``: a real subprocess serving /metrics from a real database.

Each test starts ``tokentrack exporter --listen 127.0.0.1:0`` (a free port, read from its
first stderr line), scrapes it over HTTP and parses the answer with prometheus_client's
parser. Waiting is by polling with a generous deadline (the figures appear when the exporter
has read them); no duration is asserted.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from exporterkit import TOKENTRACK, exporter, names, parse, seed, value
from ops_history import call, tokentrack
from tokentrack_client.ops.exporter import BILLING_KEYS, BillingCounters, parse_listen

# --------------------------------------------------------------------------------------------


async def test_the_exporter_serves_every_figure_of_a_live_database(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    seeded = await seed(conn)
    async with exporter(db_dsn, "--min-interval", "0.1") as running:
        samples = await running.until(lambda s: "tokentrack_billed_tokens_total" in names(s))
        assert value(samples, "tokentrack_up") == 1
        assert value(samples, "tokentrack_billed_tokens_total") == 50 + 5 + 5
        assert value(samples, "tokentrack_billed_cost_micros_total") == 50 + 5
        assert value(samples, "tokentrack_reports_billed_total") == 1
        assert value(samples, "tokentrack_reservations_expired_total") == 1
        assert value(samples, "tokentrack_late_steps_total") == 1
        assert value(samples, "tokentrack_late_step_tokens_total") == 5
        refusals = {
            labels: v
            for (name, labels), v in samples.items()
            if name == "tokentrack_refusals_total"
        }
        assert len(refusals) == 68
        budget = {
            "operation": "reserve",
            "code": "insufficient_budget",
            "budget_unit": "tokens",
            "budget_window": "day",
            "budget_scope": "account",
        }
        assert value(samples, "tokentrack_refusals_total", **budget) == 3
        none = {"budget_unit": "", "budget_window": "", "budget_scope": ""}
        account_not_found = dict(operation="reserve", code="account_not_found", **none)
        assert value(samples, "tokentrack_refusals_total", **account_not_found) == 1
        assert sum(refusals.values()) == 4
        window = {"account": seeded["account"], "subject": "", "unit": "tokens", "window": "day"}
        assert value(samples, "tokentrack_budget_used", **window) == 60
        assert value(samples, "tokentrack_budget_held", **window) == 200
        assert value(samples, "tokentrack_budget_limit", **window) == 1_000
        assert value(samples, "tokentrack_budget_windows", **window) == 1
        assert value(samples, "tokentrack_budget_windows_exhausted", **window) == 0
        assert value(samples, "tokentrack_reservations_active") == 1
        assert value(samples, "tokentrack_reservations_active_past_expiry") == 0
        assert value(samples, "tokentrack_reservation_oldest_active_age_seconds") >= 0
        assert value(samples, "tokentrack_reports", status="complete") == 1
        # The swept report stays processing (the sweep bills, it sets no outcome).
        assert value(samples, "tokentrack_reports", status="processing") == 2
        assert value(samples, "tokentrack_reports_finished") == 1
        assert value(samples, "tokentrack_reconcile_ok") == 1
        assert value(samples, "tokentrack_reconcile_up") == 1
        assert value(samples, "tokentrack_report_duration_seconds_avg") >= 0
        # health()'s notifications (version 20261212000000): none crossed yet.
        assert value(samples, "tokentrack_notifications_pending") == 0
        assert value(samples, "tokentrack_notifications_claimed") == 0
        assert value(samples, "tokentrack_notifications_oldest_pending_age_seconds") == 0
        # 600 more held takes the day budget from 26% to 86%: across its 80% threshold.
        crossing = await call(
            conn, "try_reserve_tokens", uuid.UUID(seeded["account"]), uuid.uuid4(), 600
        )
        assert crossing["success"] is True
        crossed = await running.until(lambda s: value(s, "tokentrack_notifications_pending") == 1)
        assert value(crossed, "tokentrack_budget_held", **window) == 800
        # A refusal after the start shows at the next read: a monotonic counter.
        await call(conn, "try_reserve_tokens", uuid.uuid4(), uuid.uuid4(), 1)
        later = await running.until(
            lambda s: value(s, "tokentrack_refusals_total", **account_not_found) == 2
        )
        assert value(later, "tokentrack_billed_tokens_total") == 60
        code, err = running.stop()
    assert code == 0, err
    assert "stopped (SIGTERM)" in err


async def test_the_slow_task_advances_the_verified_point_and_catches_a_later_discrepancy(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    """The exporter is the incremental reconcile's writer: each run checks what changed since
    the point and moves it over the settled ledger rows; a discrepancy after it is caught."""
    await seed(conn)
    last = await conn.fetchval("SELECT max(id) FROM tokentrack.usage_ledger")
    args = ("--min-interval", "0.1", "--reconcile-interval", "0.2")
    async with exporter(db_dsn, *args) as running:
        samples = await running.until(
            lambda s: (
                ("tokentrack_reconcile_point_entry", ()) in s
                and value(s, "tokentrack_reconcile_point_entry") == last
            )
        )
        assert value(samples, "tokentrack_reconcile_incremental") == 1
        assert value(samples, "tokentrack_reconcile_ok") == 1
        point = await conn.fetchrow(
            "SELECT through_entry, pending_entry FROM tokentrack.reconcile_point"
        )
        assert point is not None
        assert (point["through_entry"], point["pending_entry"]) == (last, None)
        quiet = await running.until(lambda s: value(s, "tokentrack_reconcile_entries_checked") == 0)
        assert value(quiet, "tokentrack_reconcile_ok") == 1
        await conn.execute(
            "UPDATE tokentrack.usage_periods SET tokens_used = tokens_used + 3"
            " WHERE status = 'active'"
        )
        broken = await running.until(lambda s: value(s, "tokentrack_reconcile_ok") == 0)
        assert value(broken, "tokentrack_reconcile_discrepancies") == 1
        assert value(broken, "tokentrack_reconcile_point_entry") == last
        code, err = running.stop()
    assert code == 0, err


async def test_reconcile_full_runs_the_audit_and_leaves_the_point(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    await seed(conn)
    args = ("--min-interval", "0.1", "--reconcile-interval", "0.2", "--reconcile-full")
    async with exporter(db_dsn, *args) as running:
        samples = await running.until(lambda s: ("tokentrack_reconcile_ok", ()) in s)
        assert value(samples, "tokentrack_reconcile_ok") == 1
        assert value(samples, "tokentrack_reconcile_incremental") == 0
        assert "tokentrack_reconcile_point_entry" not in names(samples)
        code, err = running.stop()
    assert code == 0, err
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.reconcile_point") == 0


async def test_scrapes_within_the_min_interval_share_one_read(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    async with exporter(db_dsn, "--min-interval", "3600", "--reconcile-interval", "0") as running:
        await running.until(lambda s: value(s, "tokentrack_up") == 1)
        first = await asyncio.to_thread(running.scrape_text)
        await call(conn, "try_reserve_tokens", uuid.uuid4(), uuid.uuid4(), 1)  # a refusal
        text = await asyncio.to_thread(running.scrape_text)
        second = parse(text)
        assert value(second, "tokentrack_exporter_reads_total") == 1
        assert text == first  # served from the one read: the refusal is not seen yet
        # --reconcile-interval 0: no reconcile figures at all.
        assert not {n for n in names(second) if n.startswith("tokentrack_reconcile")}
        code, _ = running.stop()
    assert code == 0


class Proxy:
    """A TCP forwarder to the test server that can be closed (the database "goes down":
    connections drop, new ones are refused) and opened again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_the_exporter_keeps_serving_up_0_while_the_database_is_down(
    db_dsn: str, pg_server: Any
) -> None:
    proxy = Proxy((pg_server.host, pg_server.port))
    await proxy.open()
    dsn = db_dsn.replace(f":{pg_server.port}/", f":{proxy.port}/")
    assert dsn != db_dsn
    async with exporter(dsn, "--min-interval", "0.1", "--reconcile-interval", "0") as running:
        await running.until(lambda s: value(s, "tokentrack_up") == 1)
        await proxy.close()
        down = await running.until(lambda s: value(s, "tokentrack_up") == 0)
        assert value(down, "tokentrack_exporter_errors_total", stage="scrape") >= 1
        assert "tokentrack_reservations_active" not in names(down)  # no stale figures
        await proxy.open()
        again = await running.until(lambda s: value(s, "tokentrack_up") == 1)
        assert "tokentrack_reservations_active" in names(again)
        code, err = running.stop()
    assert code == 0, err
    assert "database reachable again" in err


async def test_the_budget_series_are_capped_at_the_top_accounts(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    accounts = []
    for i in range(5):
        account = uuid.uuid4()
        accounts.append(str(account))
        await call(conn, "open_usage_period", account, 100_000, None)
        await call(conn, "set_budget", account, None, "tokens", "day", 100, "{}")
        await call(conn, "set_budget", account, f"user:{i}", "tokens", "hour", 100, "{}")
        assert (await call(conn, "try_reserve_tokens", account, uuid.uuid4(), 10 + i))["success"]
    extra = ("--top-accounts", "2", "--top-subjects", "0", "--reconcile-interval", "0")
    async with exporter(db_dsn, *extra) as running:
        samples = await running.until(lambda s: "tokentrack_budget_used" in names(s))
        series = {
            dict(labels)["account"] + "/" + dict(labels)["subject"]
            for name, labels in samples
            if name == "tokentrack_budget_used"
        }
        assert series == {
            f"{accounts[4]}/",
            f"{accounts[4]}/other",
            f"{accounts[3]}/",
            f"{accounts[3]}/other",
            "other/other",
        }
        assert value(samples, "tokentrack_budget_accounts") == 5
        rest = {"account": "other", "subject": "other", "unit": "tokens", "window": "day"}
        assert value(samples, "tokentrack_budget_windows", **rest) == 3
        assert value(samples, "tokentrack_budget_held", **rest) == 10 + 11 + 12
        running.stop()


async def test_the_exporter_refuses_a_bad_listen_address_and_a_port_in_use(db_dsn: str) -> None:
    bad = await tokentrack("exporter", "--listen", "nowhere", "--database-url", db_dsn)
    assert bad.code == 2
    assert "HOST:PORT" in bad.err
    async with exporter(db_dsn, "--reconcile-interval", "0") as running:
        taken = await asyncio.to_thread(
            subprocess.run,
            [TOKENTRACK, "exporter", "--listen", f"127.0.0.1:{running.port}"],
            capture_output=True,
            text=True,
            env={**os.environ, "DATABASE_URL": db_dsn},
            check=False,
        )
        running.stop()
    assert taken.returncode == 2
    assert taken.stderr.count("\n") == 1
    assert taken.stderr.startswith("tokentrack: error: cannot listen on 127.0.0.1:")


def test_parse_listen() -> None:
    assert parse_listen("0.0.0.0:9419") == ("0.0.0.0", 9419)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("9419", ":9419", "host:port", "host:70000"):
        with pytest.raises(ValueError, match=r"PORT|port"):
            parse_listen(bad)


# --------------------------------------------------------------------------------------------
# The billing counters' settling (sql/functions/billing_totals.sql answers, as given)
# --------------------------------------------------------------------------------------------


def answer(last: int, xmin: int, xmax: int, everything: int, settled: int) -> dict[str, Any]:
    def totals(tokens: int) -> dict[str, int]:
        return {k: (tokens if k == "tokens" else 0) for k in BILLING_KEYS}

    return {
        "last_entry": last,
        "all": totals(everything),
        "settled": totals(settled),
        "snapshot_xmin": str(xmin),
        "snapshot_xmax": str(xmax),
    }


def readings() -> Iterator[tuple[dict[str, Any], tuple[int, int], int]]:
    """(answer, the arguments it was read with, the counter's value after it)."""
    # Start: entries 1..10 (100 tokens), read while xid 50 still runs (xmax 60).
    yield answer(10, 50, 60, 100, 0), (0, 0), 100
    # Entry 8 of xid 50 committed late (+7): xmin 55 < 60, nothing settles, all re-read.
    yield answer(12, 55, 70, 100 + 7 + 20, 0), (0, 10), 127
    # Every transaction of the first read has ended: settle through entry 10.
    yield answer(12, 61, 75, 127, 107), (0, 10), 127
    # Only entries after 10 are read now (11, 12: 20 tokens, and 13: 5), settling through 12.
    yield answer(13, 80, 90, 25, 20), (10, 12), 132


def test_the_billing_counters_settle_without_losing_or_repeating_an_entry() -> None:
    counters: BillingCounters | None = None
    for got, arguments, expected in readings():
        if counters is None:
            counters = BillingCounters.start(got)
        else:
            assert counters.arguments() == arguments
            counters.update(got, arguments)
        assert counters.totals()["tokens"] == expected
    assert counters is not None
    assert counters.settled_through == 12
    assert counters.candidate == (13, 90)


def test_an_answer_read_with_other_arguments_is_ignored() -> None:
    """A scrape that took its arguments before the counters started (or changed) must not
    settle with an answer that was not read for that: the counters stay as they were."""
    counters = BillingCounters.start(answer(10, 50, 60, 100, 0))
    assert counters.arguments() == (0, 10)
    # Read with (0, 0): its "settled" part is empty, although xmin has passed 60.
    counters.update(answer(10, 61, 70, 100, 0), (0, 0))
    assert (counters.totals()["tokens"], counters.arguments()) == (100, (0, 10))
    counters.update(answer(10, 61, 70, 100, 100), (0, 10))
    assert (counters.totals()["tokens"], counters.arguments()) == (100, (10, 0))
    counters.update(answer(10, 71, 80, 0, 0), (10, 0))
    assert counters.totals()["tokens"] == 100
