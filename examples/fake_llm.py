"""A fake LLM for the example report generators: seeded, realistic token counts, no network.

Each analysis step has a profile (model, prompt and completion sizes, reasoning tokens for the
reasoning model), and a given ``(seed, step)`` always answers the same numbers, whatever the
order or concurrency of the calls. ``total_tokens`` is input + output, plus the hidden
reasoning tokens that reasoning models bill on top. ``ask()`` is one step of a generator:
call the LLM, record the step.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from tokentrack_client import ReportTracker


@dataclass(frozen=True)
class StepProfile:
    """What one analysis step typically costs."""

    description: str
    model: str
    input_tokens: tuple[int, int]
    output_tokens: tuple[int, int]
    reasoning_tokens: tuple[int, int] = (0, 0)

    @property
    def worst_case(self) -> int:
        """The most this step can cost: what a report reserves for it."""
        return self.input_tokens[1] + self.output_tokens[1] + self.reasoning_tokens[1]


PROFILES: dict[str, StepProfile] = {
    "AN0": StepProfile("scope the question", "gpt-4o-mini", (1_800, 2_600), (250, 450)),
    "AN1.5": StepProfile("gather sources", "gpt-4o", (6_000, 9_000), (900, 1_400)),
    "AN1.7": StepProfile("resolve entities", "gpt-4o-mini", (3_500, 5_000), (600, 900)),
    "AN2": StepProfile("analyse the evidence", "gpt-4o", (12_000, 18_000), (1_800, 2_600)),
    "AN3": StepProfile("assess risks", "o3-mini", (7_000, 10_000), (1_000, 1_600), (1_500, 4_000)),
    "AN4": StepProfile("synthesise findings", "gpt-4o", (9_000, 14_000), (1_200, 2_000)),
    "AN5": StepProfile("write the report", "gpt-4o", (4_000, 7_000), (2_500, 4_000)),
}


@dataclass(frozen=True)
class Completion:
    """One LLM answer with its usage, as providers report it."""

    text: str
    model: str
    input_tokens: int
    output_tokens: int
    total_tokens: int


class LLMError(RuntimeError):
    """The fake provider failed (as real ones do: timeouts, overload)."""


class FakeLLM:
    """Answers each step after ``latency`` seconds with seeded token counts.

    ``fail_at`` names a step whose call raises :class:`LLMError` instead.
    """

    def __init__(self, seed: int = 0, *, latency: float = 0.0, fail_at: str | None = None):
        self.seed = seed
        self.latency = latency
        self.fail_at = fail_at
        self.calls: list[str] = []

    def usage(self, step: str) -> tuple[int, int, int]:
        """The (input, output, total) tokens that ``step`` costs for this seed."""
        profile = PROFILES[step]
        rng = random.Random(f"{self.seed}:{step}")
        inputs = rng.randint(*profile.input_tokens)
        outputs = rng.randint(*profile.output_tokens)
        reasoning = rng.randint(*profile.reasoning_tokens)
        return inputs, outputs, inputs + outputs + reasoning

    async def complete(self, step: str, prompt: str) -> Completion:
        """Answer ``prompt`` for ``step``."""
        self.calls.append(step)
        if self.latency:
            await asyncio.sleep(self.latency)
        if step == self.fail_at:
            raise LLMError(f"{PROFILES[step].model}: upstream timed out during {step}")
        inputs, outputs, total = self.usage(step)
        text = f"[{step}: {PROFILES[step].description} — {len(prompt)} chars in]"
        return Completion(text, PROFILES[step].model, inputs, outputs, total)


def estimate(steps: list[str] | tuple[str, ...]) -> int:
    """The reservation for a report over ``steps``: the sum of their worst cases."""
    return sum(PROFILES[step].worst_case for step in steps)


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
