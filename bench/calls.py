"""The calls the growth phase times and explains, one at a time: one report's lifecycle
function by function (as the client makes them), and the queries of `tokentrack monitor`."""

from __future__ import annotations

import json
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import measure
from workloads import STEPS, account

MONITOR_HOURS = 24

# call(name, sql, *args): one named call, made by whoever times or explains it.
Call = Callable[..., Awaitable[None]]


def monitor_queries() -> list[tuple[str, str, tuple[Any, ...]]]:
    """What `tokentrack monitor` reads (24-hour window) as (name, SQL, arguments): the one
    statement that calls tokentrack.health(), and its usage accuracy check, the incremental
    reconcile_recent() of every account (`monitor --full`'s reconcile() is timed on its own).

    The one place that knows what the monitor runs: timed by time_monitoring(), explained by
    plans().
    """
    from tokentrack_client.ops.monitor import HEALTH_SQL

    return [
        ("monitor: health()", HEALTH_SQL, (MONITOR_HOURS,) if "$1" in HEALTH_SQL else ()),
        ("monitor: reconcile_recent()", "SELECT tokentrack.reconcile_recent(NULL)::text", ()),
    ]


async def lifecycle_calls(accounts: int, rng: random.Random, i: int, call: Call) -> None:
    """Report ``i``'s calls for a random one of accounts 1..``accounts``, each through
    ``call(name, sql, *args)``: reserve, 7 steps, finish (odd ``i``) or finalize (even), and
    every tenth report an empty sweep and reconcile(one account)."""
    who = account(rng.randint(1, accounts))
    report_id = uuid.uuid4()
    await call(
        "try_reserve_tokens",
        "SELECT tokentrack.try_reserve_tokens($1, $2, 20000)::text",
        who,
        report_id,
    )
    for name, inputs, outputs in STEPS:
        await call(
            "persist_step_usage",
            "SELECT tokentrack.persist_step_usage($1, $2, $3, $4, $5, NULL, 'gpt-4o')::text",
            report_id,
            who,
            name,
            inputs,
            outputs,
        )
    if i % 2:
        await call(
            "finish_report (7 steps)",
            "SELECT tokentrack.finish_report($1, $2, 'complete')::text",
            report_id,
            who,
        )
    else:
        await call(
            "finalize_report_usage (7 steps)",
            "SELECT tokentrack.finalize_report_usage($1, $2)::text",
            report_id,
            who,
        )
    if i % 10 == 0:
        await call(
            "expire_reservations(500), none due",
            "SELECT tokentrack.expire_reservations(500)::text",
        )
        await call("reconcile(one account)", "SELECT tokentrack.reconcile($1)::text", who)


async def time_functions(
    conn: asyncpg.Connection, accounts: int, iterations: int, times: dict[str, list[float]]
) -> None:
    """Time ``iterations`` report lifecycles call by call, adding to ``times``."""
    rng = random.Random(len(times.get("try_reserve_tokens", [])))

    async def call(name: str, sql: str, *args: Any) -> None:
        seconds, answer = await measure.timed(conn, sql, *args)
        if isinstance(answer, str) and '"success": false' in answer:
            raise RuntimeError(f"{name} refused during the growth measurement: {answer}")
        times.setdefault(name, []).append(seconds)

    for i in range(iterations):
        await lifecycle_calls(accounts, rng, i, call)


async def time_monitoring(
    conn: asyncpg.Connection, repeats: int, times: dict[str, list[float]]
) -> None:
    """The queries of ``tokentrack monitor`` (24-hour window), as it runs them."""
    for name, sql, args in monitor_queries():
        for _ in range(repeats):
            began = time.perf_counter()
            await conn.fetch(sql, *args)
            times.setdefault(name, []).append(time.perf_counter() - began)


async def plans(conn: asyncpg.Connection, accounts: int) -> dict[str, Any]:
    """The scans each function and monitor query really uses, and the shared blocks each call
    touches (auto_explain with nested statements, in a transaction rolled back)."""
    found: dict[str, set[str]] = {}
    blocks: dict[str, list[int]] = {}
    calls: dict[str, str] = {}  # SQL text of each call made -> its name
    current = [""]

    def listener(_: Any, message: Any) -> None:
        text = str(message.message)
        if "plan:" not in text:
            return
        document = json.loads(text.split("plan:", 1)[1])
        name = calls.get(document.get("Query Text", "").strip())
        if name is not None:
            # The call itself, logged when its portal is dropped (during the next call):
            # its buffers include those of every statement it ran.
            top = document["Plan"]
            used = top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0)
            blocks.setdefault(name, []).append(used)
            found.setdefault(name, set()).update(measure.plan_scans([document]))
        elif current[0]:
            found.setdefault(current[0], set()).update(measure.plan_scans([document]))

    async def call(name: str, sql: str, *args: Any) -> None:
        current[0] = name
        calls[sql.strip()] = name
        await conn.fetchval(sql, *args)

    await conn.execute("LOAD 'auto_explain'")
    conn.add_log_listener(listener)
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute(
            "SET LOCAL auto_explain.log_min_duration = 0;"
            " SET LOCAL auto_explain.log_nested_statements = on;"
            " SET LOCAL auto_explain.log_analyze = on;"
            " SET LOCAL auto_explain.log_buffers = on;"
            " SET LOCAL auto_explain.log_timing = off;"
            " SET LOCAL auto_explain.log_format = json;"
            " SET LOCAL client_min_messages = log"
        )
        for i in range(4):
            await lifecycle_calls(accounts, random.Random(i), 10 * (i % 2) + i % 2, call)
        for name, sql, args in monitor_queries():
            await call(name, sql, *args)
        current[0] = ""
        await conn.execute("SELECT 1")  # drops the last call's portal: its plan is logged
    finally:
        await transaction.rollback()
        conn.remove_log_listener(listener)
    return {
        "scans": {name: sorted(scans) for name, scans in found.items()},
        "blocks": {name: statistics.median(used) for name, used in blocks.items()},
    }
