"""``Usage`` and its adapters, on the real SDK objects (built offline from their JSON shapes).

The provider SDKs are dev dependencies only: ``tokentrack_client.usage`` never imports them,
these tests build ``openai``, ``anthropic`` and ``litellm`` objects with the SDKs' own
validation (``model_validate``) or, for LiteLLM, with its own normalisation of an Anthropic
answer (``AnthropicConfig.calculate_usage``), so that the mapping is checked against what
the SDKs really produce. No network: LiteLLM is told to use its bundled price map.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm: no download at import

import anthropic.types as anthropic_types
import anthropic.types.beta as anthropic_beta
import litellm
from litellm.llms.anthropic.chat.transformation import AnthropicConfig
from litellm.types.utils import ModelResponseStream
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseUsage,
)

import tokentrack_client
from tokentrack_client import InvalidArgument, Usage
from tokentrack_client.contract import INT_MAX
from tokentrack_client.usage import USAGE_KEYS

# --------------------------------------------------------------------------------------------
# Provider objects in their documented JSON shapes
# --------------------------------------------------------------------------------------------


def chat_completion_json(usage: dict[str, Any] | None, model: str = "o3-mini") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "logprobs": None,
                "message": {"role": "assistant", "content": "The answer.", "refusal": None},
            }
        ],
        "usage": usage,
    }


def chunk_json(usage: dict[str, Any] | None, *, last: bool) -> dict[str, Any]:
    choices = (
        []
        if last
        else [{"index": 0, "delta": {"content": "The"}, "finish_reason": None, "logprobs": None}]
    )
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "o3-mini",
        "choices": choices,
        "usage": usage,
    }


def response_json(usage: dict[str, Any] | None, status: str = "completed") -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1_700_000_000,
        "model": "o3",
        "status": status,
        "output": [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
    }


def anthropic_message_json(usage: dict[str, Any], model: str = "claude-sonnet-4-5") -> dict:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": "The answer."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }


def message_delta_json(usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": usage,
    }


OPENAI_REASONING = {  # an o3-mini step: 1,024 of the prompt cached, 640 of the output reasoning
    "prompt_tokens": 1_200,
    "completion_tokens": 900,
    "total_tokens": 2_100,
    "prompt_tokens_details": {"cached_tokens": 1_024, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 640,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
OPENAI_REASONING_USAGE = Usage(
    input_tokens=1_200,
    cached_input_tokens=1_024,
    output_tokens=900,
    reasoning_tokens=640,
    total_tokens=2_100,
)

ANTHROPIC_CACHE = {  # a Claude step that read 5,000 prompt tokens from the cache, wrote 2,000
    "input_tokens": 750,
    "cache_read_input_tokens": 5_000,
    "cache_creation_input_tokens": 2_000,
    "cache_creation": {"ephemeral_5m_input_tokens": 2_000, "ephemeral_1h_input_tokens": 0},
    "output_tokens": 300,
    "service_tier": "standard",
}
ANTHROPIC_CACHE_USAGE = Usage(
    input_tokens=7_750, cached_input_tokens=5_000, cache_write_tokens=2_000, output_tokens=300
)


# --------------------------------------------------------------------------------------------
# Usage itself
# --------------------------------------------------------------------------------------------


def test_usage_defaults_to_zero_and_is_exported() -> None:
    assert tokentrack_client.Usage is Usage
    assert "Usage" in tokentrack_client.__all__
    empty = Usage()
    assert empty.to_dict() == {
        "input_tokens": 0,
        "cached_input_tokens": 0,
        "cache_write_tokens": 0,
        "output_tokens": 0,
        "reasoning_tokens": 0,
    }
    assert empty.total_tokens is None


def test_the_client_imports_no_provider_sdk() -> None:
    probe = (
        "import sys, tokentrack_client\n"
        "from tokentrack_client import Usage\n"
        "Usage.from_openai({'prompt_tokens': 1, 'completion_tokens': 1})\n"
        "sdks = ('openai', 'anthropic', 'litellm', 'pydantic')\n"
        "print(sorted(m for m in sdks if m in sys.modules))"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert found.stdout.strip() == "[]"


def test_to_dict_is_p_usage_and_omits_only_a_none_total() -> None:
    usage = Usage(
        input_tokens=10,
        cached_input_tokens=3,
        cache_write_tokens=2,
        output_tokens=7,
        reasoning_tokens=4,
        total_tokens=20,
    )
    assert usage.to_dict() == {
        "input_tokens": 10,
        "cached_input_tokens": 3,
        "cache_write_tokens": 2,
        "output_tokens": 7,
        "reasoning_tokens": 4,
        "total_tokens": 20,
    }
    assert tuple(usage.to_dict()) == USAGE_KEYS
    assert "total_tokens" not in dataclasses.replace(usage, total_tokens=None).to_dict()
    # the edges of the inclusions are valid
    Usage(input_tokens=5, cached_input_tokens=5)
    Usage(input_tokens=5, cached_input_tokens=2, cache_write_tokens=3)
    Usage(output_tokens=5, reasoning_tokens=5, total_tokens=5)
    Usage(input_tokens=INT_MAX - 1, output_tokens=1)


def test_usage_is_frozen_and_keyword_only() -> None:
    usage = Usage(input_tokens=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        usage.input_tokens = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        Usage(1, 2)  # type: ignore[misc]
    assert hash(usage) == hash(Usage(input_tokens=1))


@pytest.mark.parametrize(
    ("fields", "argument", "text"),
    [
        ({"input_tokens": -1}, "input_tokens", "at least 0"),
        ({"output_tokens": True}, "output_tokens", "integer, not bool"),
        ({"cached_input_tokens": 1.0}, "cached_input_tokens", "integer, not float"),
        ({"cache_write_tokens": "5"}, "cache_write_tokens", "integer, not str"),
        ({"reasoning_tokens": None}, "reasoning_tokens", "integer, not None"),
        ({"input_tokens": INT_MAX + 1}, "input_tokens", f"at most {INT_MAX}"),
        ({"input_tokens": 5, "cached_input_tokens": 6}, "cached_input_tokens", "exceed"),
        (
            {"input_tokens": 5, "cached_input_tokens": 3, "cache_write_tokens": 3},
            "cache_write_tokens",
            "cached_input_tokens + cache_write_tokens (6) must not exceed input_tokens (5)",
        ),
        ({"input_tokens": 5, "cache_write_tokens": 6}, "cache_write_tokens", "exceed"),
        (
            {"output_tokens": 5, "reasoning_tokens": 6},
            "reasoning_tokens",
            "reasoning_tokens (6) must not exceed output_tokens (5)",
        ),
        (
            {"input_tokens": 5, "output_tokens": 5, "total_tokens": 9},
            "total_tokens",
            "must not be below input_tokens + output_tokens (10)",
        ),
        ({"total_tokens": -1}, "total_tokens", "at least 0"),
        ({"total_tokens": INT_MAX + 1}, "total_tokens", f"at most {INT_MAX}"),
        ({"input_tokens": INT_MAX, "output_tokens": 1}, "total_tokens", f"exceeds {INT_MAX}"),
    ],
)
def test_an_invalid_usage_is_refused_naming_the_field(
    fields: dict[str, Any], argument: str, text: str
) -> None:
    with pytest.raises(InvalidArgument, match=r".") as refused:
        Usage(**fields)
    assert refused.value.argument == argument
    assert text in str(refused.value)
    assert isinstance(refused.value, ValueError)


# --------------------------------------------------------------------------------------------
# OpenAI
# --------------------------------------------------------------------------------------------


def test_openai_chat_completion_reasoning_step() -> None:
    completion = ChatCompletion.model_validate(chat_completion_json(OPENAI_REASONING))
    assert isinstance(completion.usage, CompletionUsage)
    assert Usage.from_openai(completion) == OPENAI_REASONING_USAGE
    assert Usage.from_openai(completion.usage) == OPENAI_REASONING_USAGE
    # plain dicts of the same JSON shape
    assert Usage.from_openai(completion.model_dump()) == OPENAI_REASONING_USAGE
    assert Usage.from_openai(OPENAI_REASONING) == OPENAI_REASONING_USAGE


def test_openai_chat_completion_cache_write_and_missing_details() -> None:
    usage = CompletionUsage.model_validate(
        {
            "prompt_tokens": 3_000,
            "completion_tokens": 50,
            "total_tokens": 3_050,
            "prompt_tokens_details": {"cached_tokens": 1_000, "cache_write_tokens": 1_500},
        }
    )
    assert Usage.from_openai(usage) == Usage(
        input_tokens=3_000,
        cached_input_tokens=1_000,
        cache_write_tokens=1_500,
        output_tokens=50,
        total_tokens=3_050,
    )
    plain = CompletionUsage(prompt_tokens=12, completion_tokens=3, total_tokens=15)
    assert Usage.from_openai(plain) == Usage(input_tokens=12, output_tokens=3, total_tokens=15)


def test_openai_streamed_final_chunk_carries_the_usage_and_the_others_are_refused() -> None:
    last = ChatCompletionChunk.model_validate(chunk_json(OPENAI_REASONING, last=True))
    assert last.choices == []
    assert Usage.from_openai(last) == OPENAI_REASONING_USAGE
    middle = ChatCompletionChunk.model_validate(chunk_json(None, last=False))
    with pytest.raises(InvalidArgument, match="include_usage") as refused:
        Usage.from_openai(middle)
    assert refused.value.argument == "obj"
    assert "ChatCompletionChunk carries no usage" in str(refused.value)
    with pytest.raises(InvalidArgument, match="carries no usage"):
        Usage.from_openai(chunk_json(None, last=False))  # the same as a dict
    with pytest.raises(InvalidArgument, match="carries no usage"):
        Usage.from_openai(ChatCompletion.model_validate(chat_completion_json(None)))


RESPONSES_REASONING = {
    "input_tokens": 2_000,
    "input_tokens_details": {"cached_tokens": 1_536, "cache_write_tokens": 256},
    "output_tokens": 1_100,
    "output_tokens_details": {"reasoning_tokens": 1_024},
    "total_tokens": 3_100,
}
RESPONSES_REASONING_USAGE = Usage(
    input_tokens=2_000,
    cached_input_tokens=1_536,
    cache_write_tokens=256,
    output_tokens=1_100,
    reasoning_tokens=1_024,
    total_tokens=3_100,
)


def test_openai_responses_usage_response_and_completed_event() -> None:
    usage = ResponseUsage.model_validate(RESPONSES_REASONING)
    assert Usage.from_openai(usage) == RESPONSES_REASONING_USAGE
    response = Response.model_validate(response_json(RESPONSES_REASONING))
    assert Usage.from_openai(response) == RESPONSES_REASONING_USAGE
    completed = ResponseCompletedEvent.model_validate(
        {
            "type": "response.completed",
            "sequence_number": 42,
            "response": response_json(RESPONSES_REASONING),
        }
    )
    assert Usage.from_openai(completed) == RESPONSES_REASONING_USAGE
    assert Usage.from_openai(completed.model_dump()) == RESPONSES_REASONING_USAGE
    created = ResponseCreatedEvent.model_validate(
        {
            "type": "response.created",
            "sequence_number": 0,
            "response": response_json(None, "in_progress"),
        }
    )
    with pytest.raises(InvalidArgument, match=r"'response\.created'.*response\.completed"):
        Usage.from_openai(created)


def test_openai_refuses_what_is_not_an_openai_usage() -> None:
    with pytest.raises(InvalidArgument, match=r"use Usage\.from_anthropic") as refused:
        Usage.from_openai(ANTHROPIC_CACHE)  # read as OpenAI's, the cache would be left out
    assert refused.value.argument == "input_tokens"
    with pytest.raises(InvalidArgument, match="not a OpenAI usage"):
        Usage.from_openai({"id": "x"})
    with pytest.raises(InvalidArgument, match="got None"):
        Usage.from_openai(None)
    with pytest.raises(InvalidArgument, match="completion_tokens is missing") as missing:
        Usage.from_openai({"prompt_tokens": 5})
    assert missing.value.argument == "output_tokens"
    with pytest.raises(InvalidArgument, match="must be an integer") as typed:
        Usage.from_openai({**OPENAI_REASONING, "prompt_tokens_details": {"cached_tokens": "9"}})
    assert typed.value.argument == "cached_input_tokens"
    with pytest.raises(InvalidArgument, match="within 0") as negative:
        Usage.from_openai({"prompt_tokens": -1, "completion_tokens": 0})
    assert negative.value.argument == "input_tokens"
    # the SDK's own numbers may break the inclusions: refused naming the field
    with pytest.raises(InvalidArgument) as broken:
        Usage.from_openai(
            {
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "total_tokens": 15,
                "completion_tokens_details": {"reasoning_tokens": 6},
            }
        )
    assert broken.value.argument == "reasoning_tokens"


# --------------------------------------------------------------------------------------------
# Anthropic
# --------------------------------------------------------------------------------------------


def test_anthropic_cache_step_counts_the_cache_reads_and_writes_as_input() -> None:
    message = anthropic_types.Message.model_validate(anthropic_message_json(ANTHROPIC_CACHE))
    assert message.usage.input_tokens == 750
    assert Usage.from_anthropic(message) == ANTHROPIC_CACHE_USAGE
    assert Usage.from_anthropic(message.usage) == ANTHROPIC_CACHE_USAGE
    assert Usage.from_anthropic(message.model_dump()) == ANTHROPIC_CACHE_USAGE
    assert Usage.from_anthropic(ANTHROPIC_CACHE) == ANTHROPIC_CACHE_USAGE
    assert ANTHROPIC_CACHE_USAGE.to_dict() == {
        "input_tokens": 7_750,
        "cached_input_tokens": 5_000,
        "cache_write_tokens": 2_000,
        "output_tokens": 300,
        "reasoning_tokens": 0,
    }


def test_anthropic_without_cache_fields_and_with_thinking_tokens() -> None:
    plain = anthropic_types.Usage.model_validate({"input_tokens": 40, "output_tokens": 9})
    assert plain.cache_read_input_tokens is None
    assert Usage.from_anthropic(plain) == Usage(input_tokens=40, output_tokens=9)
    thinking = anthropic_types.Message.model_validate(
        anthropic_message_json(
            {
                "input_tokens": 100,
                "cache_read_input_tokens": 0,
                "cache_creation_input_tokens": 0,
                "output_tokens": 2_000,
                "output_tokens_details": {"thinking_tokens": 1_500},
            }
        )
    )
    assert Usage.from_anthropic(thinking) == Usage(
        input_tokens=100, output_tokens=2_000, reasoning_tokens=1_500
    )


def test_anthropic_stream_final_message_delta() -> None:
    cumulative = {
        "input_tokens": 750,
        "cache_read_input_tokens": 5_000,
        "cache_creation_input_tokens": 2_000,
        "output_tokens": 300,
    }
    event = anthropic_types.RawMessageDeltaEvent.model_validate(message_delta_json(cumulative))
    assert isinstance(event.usage, anthropic_types.MessageDeltaUsage)
    assert Usage.from_anthropic(event) == ANTHROPIC_CACHE_USAGE
    assert Usage.from_anthropic(event.usage) == ANTHROPIC_CACHE_USAGE
    deprecated = anthropic_types.MessageDeltaEvent.model_validate(message_delta_json(cumulative))
    assert Usage.from_anthropic(deprecated) == ANTHROPIC_CACHE_USAGE


def test_anthropic_delta_without_input_counts_needs_the_message_start() -> None:
    # MessageDeltaUsage's input counts are Optional: the SDK keeps message_start's then.
    delta = anthropic_types.RawMessageDeltaEvent.model_validate(
        message_delta_json({"output_tokens": 300})
    )
    assert delta.usage.input_tokens is None
    with pytest.raises(InvalidArgument, match="message_start") as refused:
        Usage.from_anthropic(delta)
    assert refused.value.argument == "input_tokens"
    start = anthropic_types.RawMessageStartEvent.model_validate(
        {
            "type": "message_start",
            "message": anthropic_message_json({**ANTHROPIC_CACHE, "output_tokens": 1}),
        }
    )
    assert Usage.from_anthropic(delta, start=start) == ANTHROPIC_CACHE_USAGE
    assert Usage.from_anthropic(delta, start=start.message) == ANTHROPIC_CACHE_USAGE
    assert Usage.from_anthropic(delta.model_dump(), start=start.model_dump()) == (
        ANTHROPIC_CACHE_USAGE
    )
    # the delta's own counts win over message_start's (they are cumulative)
    later = anthropic_types.RawMessageDeltaEvent.model_validate(
        message_delta_json({"output_tokens": 300, "cache_read_input_tokens": 6_000})
    )
    assert Usage.from_anthropic(later, start=start) == dataclasses.replace(
        ANTHROPIC_CACHE_USAGE, input_tokens=8_750, cached_input_tokens=6_000
    )


def test_anthropic_refuses_bad_counts_and_foreign_shapes() -> None:
    with pytest.raises(InvalidArgument, match="has no output_tokens"):
        Usage.from_anthropic(OPENAI_REASONING)
    with pytest.raises(InvalidArgument, match="must be an integer") as typed:
        Usage.from_anthropic({**ANTHROPIC_CACHE, "cache_read_input_tokens": 1.5})
    assert typed.value.argument == "cached_input_tokens"
    with pytest.raises(InvalidArgument, match="within 0") as negative:
        Usage.from_anthropic({**ANTHROPIC_CACHE, "input_tokens": -750})
    assert negative.value.argument == "input_tokens"
    with pytest.raises(InvalidArgument) as too_many:
        Usage.from_anthropic({**ANTHROPIC_CACHE, "cache_read_input_tokens": INT_MAX})
    assert too_many.value.argument == "input_tokens"  # 750 + INT_MAX + 2,000 passes INT_MAX
    with pytest.raises(InvalidArgument) as thinking:
        Usage.from_anthropic(
            {"input_tokens": 1, "output_tokens": 5, "output_tokens_details": {"thinking_tokens": 6}}
        )
    assert thinking.value.argument == "reasoning_tokens"


def test_anthropic_beta_iterations_outside_the_top_level_counts_are_refused() -> None:
    entry = {"cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
    covered = anthropic_beta.BetaUsage.model_validate(
        {
            "input_tokens": 10,
            "output_tokens": 5,
            "iterations": [{"type": "message", "input_tokens": 10, "output_tokens": 5, **entry}],
        }
    )
    assert Usage.from_anthropic(covered) == Usage(input_tokens=10, output_tokens=5)
    compacted = anthropic_beta.BetaUsage.model_validate(
        {
            "input_tokens": 10,
            "output_tokens": 5,
            "iterations": [
                {"type": "compaction", "input_tokens": 900, "output_tokens": 80, **entry},
                {"type": "message", "input_tokens": 10, "output_tokens": 5, **entry},
            ],
        }
    )
    with pytest.raises(InvalidArgument, match="'compaction' iteration"):
        Usage.from_anthropic(compacted)
    assert compacted.iterations is not None
    assert Usage.from_anthropic(compacted.iterations[0]) == Usage(
        input_tokens=900, output_tokens=80
    )


# --------------------------------------------------------------------------------------------
# LiteLLM
# --------------------------------------------------------------------------------------------


def litellm_from_anthropic(raw: dict[str, Any]) -> litellm.ModelResponse:
    """What LiteLLM answers for a Claude call whose Anthropic usage is ``raw``: its own
    normalisation (the code its Anthropic provider runs on every answer)."""
    usage = AnthropicConfig().calculate_usage(raw, reasoning_content=None)
    return litellm.ModelResponse(id="chatcmpl-1", model="claude-sonnet-4-5", usage=usage)


def test_litellm_anthropic_cache_step_counts_each_token_once() -> None:
    response = litellm_from_anthropic(ANTHROPIC_CACHE)
    usage = response.usage
    # What litellm 1.110.2 does: prompt_tokens already includes the cache reads and writes,
    # and keeps them in prompt_tokens_details and at the top level as well.
    assert usage.prompt_tokens == 7_750
    assert usage.prompt_tokens_details.cached_tokens == 5_000
    assert usage.prompt_tokens_details.cache_write_tokens == 2_000
    assert usage.cache_read_input_tokens == 5_000
    assert usage.cache_creation_input_tokens == 2_000
    expected = dataclasses.replace(ANTHROPIC_CACHE_USAGE, total_tokens=8_050)
    assert Usage.from_litellm(response) == expected
    assert Usage.from_litellm(usage) == expected
    assert Usage.from_litellm(response.model_dump()) == expected


def test_litellm_openai_reasoning_step_and_stream_chunks() -> None:
    response = litellm.ModelResponse(**chat_completion_json(OPENAI_REASONING))
    assert Usage.from_litellm(response) == OPENAI_REASONING_USAGE
    assert Usage.from_openai(response) == OPENAI_REASONING_USAGE  # litellm is OpenAI-shaped
    last = ModelResponseStream(**chunk_json(OPENAI_REASONING, last=True))
    assert Usage.from_litellm(last) == OPENAI_REASONING_USAGE
    middle = ModelResponseStream(**chunk_json(None, last=False))
    with pytest.raises(InvalidArgument, match="include_usage"):
        Usage.from_litellm(middle)
    with pytest.raises(InvalidArgument, match="has no prompt_tokens"):
        Usage.from_litellm(ANTHROPIC_CACHE)


def test_litellm_usage_without_a_total_and_top_level_cache_fields() -> None:
    bare = litellm.Usage(prompt_tokens=120, completion_tokens=30)
    assert bare.total_tokens == 0  # litellm keeps a missing total as 0
    assert Usage.from_litellm(bare) == Usage(input_tokens=120, output_tokens=30)
    # litellm.Usage(cache_read_input_tokens=...) files them under prompt_tokens_details too
    cached = litellm.Usage(
        prompt_tokens=7_750,
        completion_tokens=300,
        total_tokens=8_050,
        cache_read_input_tokens=5_000,
        cache_creation_input_tokens=2_000,
    )
    assert Usage.from_litellm(cached) == dataclasses.replace(
        ANTHROPIC_CACHE_USAGE, total_tokens=8_050
    )
    # a dict with only the top-level fields
    assert (
        Usage.from_litellm(
            {
                "prompt_tokens": 7_750,
                "completion_tokens": 300,
                "cache_read_input_tokens": 5_000,
                "cache_creation_input_tokens": 2_000,
            }
        )
        == ANTHROPIC_CACHE_USAGE
    )


# --------------------------------------------------------------------------------------------
# Properties: every valid SDK usage maps to a valid Usage, the same by every route
# --------------------------------------------------------------------------------------------

COUNT = st.integers(min_value=0, max_value=200_000_000)


@st.composite
def anthropic_usages(draw: st.DrawFn) -> dict[str, Any]:
    output = draw(COUNT)
    raw: dict[str, Any] = {"input_tokens": draw(COUNT), "output_tokens": output}
    for key in ("cache_read_input_tokens", "cache_creation_input_tokens"):
        raw[key] = draw(st.none() | COUNT)
    if draw(st.booleans()):
        raw["output_tokens_details"] = {
            "thinking_tokens": draw(st.integers(min_value=0, max_value=output))
        }
    return raw


@settings(max_examples=200)
@given(raw=anthropic_usages())
def test_anthropic_and_litellm_agree_and_count_every_input_token(raw: dict[str, Any]) -> None:
    message = anthropic_types.Message.model_validate(anthropic_message_json(raw))
    usage = Usage.from_anthropic(message)
    read = raw["cache_read_input_tokens"] or 0
    written = raw["cache_creation_input_tokens"] or 0
    assert usage.input_tokens == raw["input_tokens"] + read + written
    assert (usage.cached_input_tokens, usage.cache_write_tokens) == (read, written)
    assert usage.output_tokens == raw["output_tokens"]
    thinking = raw.get("output_tokens_details", {}).get("thinking_tokens", 0)
    assert usage.reasoning_tokens == thinking
    # LiteLLM's normalisation of the same answer gives the same classes: no double count
    through_litellm = Usage.from_litellm(litellm_from_anthropic(message.usage.model_dump()))
    assert through_litellm == dataclasses.replace(
        usage, total_tokens=(usage.input_tokens + usage.output_tokens) or None
    )


@st.composite
def openai_usages(draw: st.DrawFn) -> dict[str, Any]:
    prompt, completion = draw(COUNT), draw(COUNT)
    cached = draw(st.integers(min_value=0, max_value=prompt))
    raw: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion + draw(st.integers(min_value=0, max_value=1_000)),
    }
    if draw(st.booleans()):
        raw["prompt_tokens_details"] = {
            "cached_tokens": cached,
            "cache_write_tokens": draw(st.none() | st.integers(0, prompt - cached)),
        }
    if draw(st.booleans()):
        raw["completion_tokens_details"] = {
            "reasoning_tokens": draw(st.none() | st.integers(0, completion))
        }
    return raw


@settings(max_examples=200)
@given(raw=openai_usages())
def test_openai_objects_dicts_and_litellm_agree(raw: dict[str, Any]) -> None:
    completion = ChatCompletion.model_validate(chat_completion_json(raw))
    usage = Usage.from_openai(completion)
    assert usage.input_tokens == raw["prompt_tokens"]
    assert usage.output_tokens == raw["completion_tokens"]
    assert usage.total_tokens == raw["total_tokens"]
    assert usage.cached_input_tokens <= usage.input_tokens
    assert usage.reasoning_tokens <= usage.output_tokens
    assert Usage.from_openai(raw) == usage
    assert Usage.from_openai(completion.model_dump()) == usage
    assert Usage.from_litellm(
        litellm.ModelResponse(**chat_completion_json(raw))
    ) == dataclasses.replace(usage, total_tokens=usage.total_tokens or None)
