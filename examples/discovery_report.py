"""Discovery report: a quick, broad look: scope, sources, entities, write-up (no deep analysis)."""

from __future__ import annotations

import uuid

from fake_llm import FakeLLM, estimate

from tokentrack_client import ReportTracker, TokenTracker

MODE = "discovery"
STEPS = ("AN0", "AN1.5", "AN1.7", "AN5")


async def ask(report: ReportTracker, llm: FakeLLM, step: str, prompt: str) -> str:
    """Call the LLM for one step and record what it cost."""
    reply = await llm.complete(step, prompt)
    await report.step(
        step,
        input_tokens=reply.input_tokens,
        output_tokens=reply.output_tokens,
        total_tokens=reply.total_tokens,
        model=reply.model,
    )
    return reply.text


async def generate(
    tracker: TokenTracker, account_id: uuid.UUID, report_id: uuid.UUID, llm: FakeLLM, topic: str
) -> str:
    """Write a discovery report on ``topic``; the report is billed whatever happens."""
    async with tracker.track_report(account_id, report_id, estimate(STEPS)) as report:
        text = topic
        for step in STEPS:
            text += "\n" + await ask(report, llm, step, text)
    return text
