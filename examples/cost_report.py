"""A report whose steps call three provider APIs, recorded by token class and priced.

Each step gets the provider SDK's own response type, as a real call would return it (built
offline here by ``FakeProviders``, with the SDKs' validation), and records it with the
matching ``Usage`` adapter:

* ``AN0``: OpenAI Chat Completions (``gpt-4o-mini``), part of the prompt read from the cache;
* ``AN2``: an Anthropic Messages stream (``claude-sonnet-4-5``) that reads and writes the
  prompt cache: its ``message_start`` and final ``message_delta`` events;
* ``AN3``: an OpenAI Responses stream (``o3-mini``, a reasoning model): its
  ``response.completed`` event.

Prices are the installation's (the SQL function ``set_model_price``, called by the schema
owner); ``PRICES`` holds the ones this example is priced with, in micros per million tokens
(with the US dollar as the currency, 1 micro is $0.000001). ``generate`` returns one line per
step with its tokens and cost, then the report's total.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from anthropic.types import Message, RawMessageDeltaEvent, RawMessageStartEvent
from openai.types.chat import ChatCompletion
from openai.types.responses import ResponseCompletedEvent

from tokentrack_client import StepRecord, TokenTracker, Usage

MODE = "standard"
STEPS = ("AN0", "AN2", "AN3")
ESTIMATE = 40_000
"""What the report reserves: more than its three steps use."""

PRICES: dict[str, dict[str, int]] = {
    "gpt-4o-mini": {"input": 150_000, "cached_input": 75_000, "output": 600_000},
    "claude-sonnet-4-5": {
        "input": 3_000_000,
        "cached_input": 300_000,
        "cache_write": 3_750_000,
        "output": 15_000_000,
    },
    "o3-mini": {"input": 1_100_000, "cached_input": 550_000, "output": 4_400_000},
}


class FakeProviders:
    """Answers each step as the provider's SDK would, offline, with fixed usage."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def chat_completion(self, prompt: str) -> ChatCompletion:
        """``client.chat.completions.create(model="gpt-4o-mini", ...)``."""
        self.calls.append("AN0")
        return ChatCompletion.model_validate(
            {
                "id": "chatcmpl-an0",
                "object": "chat.completion",
                "created": 1_764_000_000,
                "model": "gpt-4o-mini",
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": f"[AN0: scope {prompt}]"},
                    }
                ],
                "usage": {
                    "prompt_tokens": 2_400,
                    "completion_tokens": 380,
                    "total_tokens": 2_780,
                    "prompt_tokens_details": {"cached_tokens": 1_024},
                    "completion_tokens_details": {"reasoning_tokens": 0},
                },
            }
        )

    async def message_stream(
        self, prompt: str
    ) -> list[RawMessageStartEvent | RawMessageDeltaEvent]:
        """The usage-carrying events of ``client.messages.create(..., stream=True)``: the
        ``message_start`` (input counts, 1 output token so far) and the final
        ``message_delta`` (cumulative output; the input counts left out)."""
        self.calls.append("AN2")
        message = Message.model_validate(
            {
                "id": "msg_an2",
                "type": "message",
                "role": "assistant",
                "model": "claude-sonnet-4-5",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": 750,
                    "cache_read_input_tokens": 5_000,
                    "cache_creation_input_tokens": 2_000,
                    "output_tokens": 1,
                },
            }
        )
        return [
            RawMessageStartEvent(type="message_start", message=message),
            RawMessageDeltaEvent.model_validate(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {
                        "output_tokens": 1_200,
                        "output_tokens_details": {"thinking_tokens": 400},
                    },
                }
            ),
        ]

    async def response_stream(self, prompt: str) -> list[ResponseCompletedEvent]:
        """The last event of ``client.responses.create(model="o3-mini", ..., stream=True)``."""
        self.calls.append("AN3")
        return [
            ResponseCompletedEvent.model_validate(
                {
                    "type": "response.completed",
                    "sequence_number": 17,
                    "response": {
                        "id": "resp_an3",
                        "object": "response",
                        "created_at": 1_764_000_000,
                        "model": "o3-mini",
                        "status": "completed",
                        "output": [],
                        "parallel_tool_calls": True,
                        "tool_choice": "auto",
                        "tools": [],
                        "usage": {
                            "input_tokens": 8_000,
                            "input_tokens_details": {
                                "cached_tokens": 2_048,
                                "cache_write_tokens": 0,
                            },
                            "output_tokens": 3_200,
                            "output_tokens_details": {"reasoning_tokens": 2_304},
                            "total_tokens": 11_200,
                        },
                    },
                }
            )
        ]


def describe(name: str, model: str, usage: Usage, record: StepRecord) -> str:
    """One line of the report's cost table."""
    cost = "unpriced" if record.cost_micros is None else f"{record.cost_micros} micros"
    return (
        f"{name} {model}: {usage.input_tokens} in ({usage.cached_input_tokens} cached, "
        f"{usage.cache_write_tokens} written), {usage.output_tokens} out "
        f"({usage.reasoning_tokens} reasoning), {record.total_tokens} tokens, {cost}"
    )


def last_of(events: Sequence[Any], kind: str) -> Any:
    """The last stream event of type ``kind``."""
    return [event for event in events if event.type == kind][-1]


async def generate(
    tracker: TokenTracker,
    account_id: uuid.UUID,
    report_id: uuid.UUID,
    providers: FakeProviders,
    topic: str,
) -> str:
    """Write a short report on ``topic``; each step is recorded by token class."""
    lines = []
    async with tracker.track_report(account_id, report_id, ESTIMATE) as report:
        completion = await providers.chat_completion(topic)
        usage = Usage.from_openai(completion)
        record = await report.step("AN0", usage=usage, model=completion.model)
        lines.append(describe("AN0", completion.model, usage, record))

        events = await providers.message_stream(topic)
        start = last_of(events, "message_start")
        usage = Usage.from_anthropic(last_of(events, "message_delta"), start=start)
        record = await report.step("AN2", usage=usage, model=start.message.model)
        lines.append(describe("AN2", start.message.model, usage, record))

        completed = last_of(await providers.response_stream(topic), "response.completed")
        usage = Usage.from_openai(completed)
        record = await report.step("AN3", usage=usage, model=completed.response.model)
        lines.append(describe("AN3", completed.response.model, usage, record))
    costs = [step.cost_micros for step in report.steps]
    total = "unpriced" if None in costs else f"{sum(c for c in costs if c is not None)} micros"
    lines.append(f"{report.tokens_recorded} tokens, {total}")
    return "\n".join(lines)
