"""``tokentrack_client.testing``: the throwaway server and the pytest plugin users enable.

A user's own test session (run by pytester in a subprocess, on this session's server through
``$TOKENTRACK_TEST_DSN``) enables the plugin in its conftest.py, gets a fresh database with
tokentrack installed and a pool, and records a report with TokenTracker. The server itself
stops what it started when the code inside its ``with`` fails or its start fails, and binds
to loopback only.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest

from tokentrack_client.testing import PostgresServer, PostgresServerError, default_data_root

USER_CONFTEST = """
pytest_plugins = ["tokentrack_client.testing.pytest_plugin"]
"""

USER_TESTS = '''
import uuid

import pytest

from tokentrack_client import TokenTracker

ACCOUNT = uuid.UUID("00000000-0000-4000-8000-000000000001")


async def generate(tracker, account_id, report_id):
    """A user's report generator: two steps, then billed on the way out."""
    async with tracker.track_report(account_id, report_id, estimated_tokens=5_000) as report:
        await report.step("outline", input_tokens=1_200, output_tokens=300, model="m")
        await report.step("draft", input_tokens=2_000, output_tokens=700, model="m")


@pytest.mark.asyncio
async def test_my_generator_bills_what_it_used(pool):
    tracker = TokenTracker(pool)
    await tracker.open_usage_period(ACCOUNT, 100_000)
    report_id = uuid.uuid4()
    await generate(tracker, ACCOUNT, report_id)
    billed = await pool.fetchval(
        "SELECT billed_tokens FROM tokentrack.report_reservations WHERE report_id = $1",
        report_id,
    )
    assert billed == 4_200
    assert (await tracker.reconcile()).ok


@pytest.mark.asyncio
async def test_each_test_gets_a_fresh_database(conn):
    accounts = await conn.fetchval("SELECT count(*) FROM tokentrack.accounts")
    assert accounts == 0
'''


def test_a_user_session_enables_the_plugin_and_tests_its_generator(
    pytester: pytest.Pytester, pg_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENTRACK_TEST_DSN", pg_server.dsn())
    pytester.makeconftest(USER_CONFTEST)
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=2)


def test_the_server_is_stopped_and_removed_when_the_code_inside_fails() -> None:
    server = PostgresServer(prefix="tokentrack-testing-")
    seen: list[tuple[Path, int]] = []

    def use_then_fail() -> None:
        with server:
            assert server.base is not None
            assert server.running()
            seen.append((server.base, server.port))
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        use_then_fail()
    base, port = seen[0]
    assert server.base is None
    assert not base.exists()
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_a_start_that_fails_leaves_nothing_behind() -> None:
    prefix = f"tokentrack-testing-{uuid.uuid4().hex[:8]}-"
    server = PostgresServer(settings={"shared_preload_libraries": "no_such_library"}, prefix=prefix)
    with pytest.raises(PostgresServerError, match="no_such_library"):
        server.start()
    assert server.base is None
    assert list(default_data_root().glob(f"{prefix}*")) == []


def test_the_server_listens_on_loopback_only() -> None:
    with pytest.raises(ValueError, match="listen_addresses"):
        PostgresServer(settings={"listen_addresses": "*"})
