"""Run one example report generator against a database with tokentrack installed.

    DATABASE_URL=postgresql://... python examples/run.py dd --seed 7

A new account with a 500,000-token period is opened for the run (``--account`` reuses one);
the script prints what was billed and the reconcile verdict of that account.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid

import asyncpg
import dd_report
import discovery_report
import hybrid_report
import standard_report
from fake_llm import FakeLLM

from tokentrack_client import TokenTracker

GENERATORS = {
    module.MODE: module for module in (standard_report, dd_report, discovery_report, hybrid_report)
}


async def run(database_url: str, mode: str, seed: int, account: uuid.UUID | None) -> int:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        tracker = TokenTracker(pool)
        if account is None:
            account = uuid.uuid4()
            await tracker.open_usage_period(account, 500_000)
        report_id = uuid.uuid4()
        text = await GENERATORS[mode].generate(
            tracker, account, report_id, FakeLLM(seed), topic=f"{mode} report, seed {seed}"
        )
        settlement = await tracker.finalize(report_id, account)  # idempotent: just reads it
        verdict = await tracker.reconcile(account)
        print(text)
        print(
            f"report {report_id} ({mode}): {settlement.billed_tokens} tokens billed over "
            f"{settlement.steps} steps; account {account} has used {settlement.tokens_used} of "
            f"{settlement.tokens_limit}; reconcile: {'ok' if verdict.ok else 'FAILED'}"
        )
        return 0 if verdict.ok else 1
    finally:
        await pool.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=sorted(GENERATORS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--account", type=uuid.UUID, help="an account with an active period")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    args = parser.parse_args()
    if not args.database_url:
        parser.error("pass --database-url or set DATABASE_URL")
    return asyncio.run(run(args.database_url, args.mode, args.seed, args.account))


if __name__ == "__main__":
    sys.exit(main())
