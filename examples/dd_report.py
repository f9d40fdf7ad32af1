"""Due diligence report: every step; sources and entities are worked on in parallel."""

from __future__ import annotations

import asyncio
import uuid

from fake_llm import FakeLLM, ask, estimate

from tokentrack_client import TokenTracker

MODE = "dd"
STEPS = ("AN0", "AN1.5", "AN1.7", "AN2", "AN3", "AN4", "AN5")


async def generate(
    tracker: TokenTracker, account_id: uuid.UUID, report_id: uuid.UUID, llm: FakeLLM, topic: str
) -> str:
    """Write a due diligence report on ``topic``; the report is billed whatever happens."""
    async with tracker.track_report(account_id, report_id, estimate(STEPS)) as report:
        scope = await ask(report, llm, "AN0", topic)
        sources, entities = await asyncio.gather(
            ask(report, llm, "AN1.5", scope), ask(report, llm, "AN1.7", scope)
        )
        text = "\n".join((scope, sources, entities))
        for step in ("AN2", "AN3", "AN4", "AN5"):
            text += "\n" + await ask(report, llm, step, text)
    return text
