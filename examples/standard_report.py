"""Standard report: scope, analyse, synthesise, write, one step after the other."""

from __future__ import annotations

import uuid

from fake_llm import FakeLLM, ask, estimate

from tokentrack_client import TokenTracker

MODE = "standard"
STEPS = ("AN0", "AN2", "AN4", "AN5")


async def generate(
    tracker: TokenTracker, account_id: uuid.UUID, report_id: uuid.UUID, llm: FakeLLM, topic: str
) -> str:
    """Write a standard report on ``topic``; the report is billed whatever happens."""
    async with tracker.track_report(account_id, report_id, estimate(STEPS)) as report:
        text = topic
        for step in STEPS:
            text += "\n" + await ask(report, llm, step, text)
    return text
