"""Running ``tokentrack exporter`` as a real subprocess in tests, and scraping it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ops_history import call

TOKENTRACK = str(Path(sys.executable).with_name("tokentrack"))
SERVING = re.compile(r"serving http://127\.0\.0\.1:(\d+)/metrics")
DEADLINE = 60.0
"""Seconds a test waits for a figure to appear (a failure after it, never a timing check)."""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Running:
    process: subprocess.Popen[str]
    port: int

    def scrape_text(self) -> str:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as answer:
            body: bytes = answer.read()
        return body.decode()

    async def scrape(self) -> Samples:
        text = await asyncio.to_thread(self.scrape_text)
        return parse(text)

    async def until(self, found: Callable[[Samples], bool]) -> Samples:
        """Scrape until ``found`` holds (or fail after :data:`DEADLINE`)."""
        give_up = time.monotonic() + DEADLINE
        while True:
            samples = await self.scrape()
            if found(samples):
                return samples
            if time.monotonic() > give_up:
                pytest.fail(f"not found within {DEADLINE:g} s in:\n{samples}")
            await asyncio.sleep(0.2)

    def stop(self) -> tuple[int, str]:
        """SIGTERM; the exit status and everything it wrote on stderr."""
        self.process.send_signal(signal.SIGTERM)
        _, err = self.process.communicate(timeout=DEADLINE)
        return self.process.returncode, err


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


@asynccontextmanager
async def exporter(dsn: str, *extra: str) -> AsyncIterator[Running]:
    argv = [TOKENTRACK, "exporter", "--listen", "127.0.0.1:0", "--database-url", dsn, *extra]
    env = {**os.environ, "TOKENTRACK_CONNECT_TIMEOUT": "5"}
    # Popen returns at once (the exporter runs on its own): not a blocking call.
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)  # noqa: ASYNC220
    try:
        assert process.stderr is not None
        first = await asyncio.to_thread(process.stderr.readline)
        match = SERVING.search(first)
        assert match, first
        yield Running(process, int(match[1]))
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=DEADLINE)


async def seed(conn: asyncpg.Connection) -> dict[str, Any]:
    """An account with a day budget, a billed report with a late step, an expired
    reservation billed by the sweep, and refusals."""
    await call(conn, "set_model_price", "m", json.dumps({"input": 1_000_000, "output": 1_000_000}))
    account = uuid.uuid4()
    assert (await call(conn, "open_usage_period", account, 100_000, None))["success"]
    budget = await call(conn, "set_budget", account, None, "tokens", "day", 1_000, "{}")
    report = uuid.uuid4()
    assert (await call(conn, "try_reserve_tokens", account, report, 100))["success"]
    await call(conn, "persist_step_usage", report, account, "a", 30, 20, None, "m")
    assert (await call(conn, "finish_report", report, account, "complete", None))["success"]
    late = await call(conn, "persist_step_usage", report, account, "late", 2, 3, None, "m")
    assert late["late"] is True
    expired = uuid.uuid4()
    assert (await call(conn, "try_reserve_tokens", account, expired, 100))["success"]
    await call(conn, "persist_step_usage", expired, account, "a", 4, 1, None, None)
    await conn.execute(
        "UPDATE tokentrack.report_reservations SET created_at = now() - interval '3 hours',"
        " expires_at = now() - interval '1 hour' WHERE report_id = $1",
        expired,
    )
    assert (await call(conn, "cleanup_expired_reservations"))["expired"] == 1
    held = uuid.uuid4()
    assert (await call(conn, "try_reserve_tokens", account, held, 200))["success"]
    for _ in range(3):
        refused = await call(conn, "try_reserve_tokens", account, uuid.uuid4(), 900)
        assert refused["error"] == "insufficient_budget"
    assert (await call(conn, "try_reserve_tokens", uuid.uuid4(), uuid.uuid4(), 1))[
        "error"
    ] == "account_not_found"
    return {"account": str(account), "budget": budget["budget_id"]}
