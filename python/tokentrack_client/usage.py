"""``Usage``: one step's tokens in the canonical classes, and the adapters from provider SDKs.

The canonical form is the OpenTelemetry GenAI convention: ``input_tokens`` counts every prompt
token, including those read from and written to a prompt cache; ``cached_input_tokens``
(part of input) were read from the cache; ``cache_write_tokens`` (part of input, disjoint from
cached) were written to it; ``output_tokens`` counts every generated token, reasoning
included; ``reasoning_tokens`` (part of output) were spent reasoning; ``total_tokens`` is at
least input + output (``None``: exactly input + output). :meth:`Usage.to_dict` is the
``p_usage`` argument of ``tokentrack.record_step``.

The adapters read a provider's usage object, or the response, chunk or event that carries it,
by attribute or dict key (the SDKs are never imported). How each provider's fields map (a
field that is missing or ``null`` counts 0, unless the table says otherwise):

===================  ==========================  ==========================
Usage                OpenAI Chat Completions     OpenAI Responses
                     (``CompletionUsage``)       (``ResponseUsage``)
===================  ==========================  ==========================
input_tokens         prompt_tokens               input_tokens
cached_input_tokens  prompt_tokens_details       input_tokens_details
                     .cached_tokens              .cached_tokens
cache_write_tokens   prompt_tokens_details       input_tokens_details
                     .cache_write_tokens         .cache_write_tokens
output_tokens        completion_tokens           output_tokens
reasoning_tokens     completion_tokens_details   output_tokens_details
                     .reasoning_tokens           .reasoning_tokens
total_tokens         total_tokens                total_tokens
===================  ==========================  ==========================

===================  ==============================  ==============================
Usage                Anthropic Messages (``Usage``,  LiteLLM (``litellm.Usage``)
                     ``MessageDeltaUsage``)
===================  ==============================  ==============================
input_tokens         input_tokens                    prompt_tokens
                     + cache_read_input_tokens
                     + cache_creation_input_tokens
cached_input_tokens  cache_read_input_tokens         prompt_tokens_details
                                                     .cached_tokens, else
                                                     cache_read_input_tokens
cache_write_tokens   cache_creation_input_tokens     prompt_tokens_details
                                                     .cache_write_tokens, else
                                                     .cache_creation_tokens, else
                                                     cache_creation_input_tokens
output_tokens        output_tokens                   completion_tokens
reasoning_tokens     output_tokens_details           completion_tokens_details
                     .thinking_tokens                .reasoning_tokens
total_tokens         ``None`` (input + output)       total_tokens (0 is ``None``)
===================  ==============================  ==============================

What each adapter accepts:

* :meth:`Usage.from_openai`: a ``CompletionUsage`` or ``ResponseUsage``; a ``ChatCompletion``,
  a ``Response``; the last ``ChatCompletionChunk`` of a stream made with
  ``stream_options={"include_usage": True}`` (the others carry no usage and are refused); a
  Responses stream's ``response.completed`` event (its ``.response.usage``). OpenAI's
  ``prompt_tokens`` and ``input_tokens`` already count the cached and cache-written tokens,
  and its ``completion_tokens`` and ``output_tokens`` the reasoning ones.
* :meth:`Usage.from_anthropic`: a ``Message`` or its ``Usage``; a stream's final
  ``message_delta`` event (``RawMessageDeltaEvent``) or its ``MessageDeltaUsage``, whose counts
  are cumulative. Anthropic's ``input_tokens`` **excludes** the cache reads and writes, so the
  adapter adds them: nothing is undercounted. A ``message_delta`` may omit the input counts
  (the SDK keeps the ``message_start`` values then); pass that ``message_start`` event (or its
  message) as ``start=`` and the omitted counts are taken from it; without it a delta that has
  no ``input_tokens`` is refused. Thinking tokens are part of ``output_tokens`` (the SDK says
  so); ``output_tokens_details.thinking_tokens`` is read as the reasoning part when present.
* :meth:`Usage.from_litellm`: a ``ModelResponse`` (or a streamed ``ModelResponseStream`` that
  carries usage) or its ``litellm.Usage``. LiteLLM normalises every provider to OpenAI's shape;
  for Anthropic (litellm 1.110.2, ``AnthropicConfig.calculate_usage``) ``prompt_tokens`` is
  Anthropic's ``input_tokens + cache_creation_input_tokens + cache_read_input_tokens``,
  ``prompt_tokens_details.cached_tokens`` the cache reads, ``prompt_tokens_details
  .cache_write_tokens`` (kept equal to ``.cache_creation_tokens``) the cache writes, and the
  same two counts are also set as ``cache_read_input_tokens`` and
  ``cache_creation_input_tokens`` on the usage object. Reading ``prompt_tokens`` as input and
  the details as its parts therefore counts every token once; adding the top-level Anthropic
  fields to it as well would count the cache twice. ``litellm.Usage`` stores a missing
  ``total_tokens`` as 0, which is read as ``None``. What ``litellm.responses()`` answers
  (``ResponseAPIUsage``) is made from that same usage (``input_tokens`` = ``prompt_tokens``,
  ``input_tokens_details.cached_tokens`` and ``.cache_write_tokens`` from the prompt
  details), so it is read as OpenAI's Responses usage.

Each adapter refuses, with :class:`~tokentrack_client.InvalidArgument`, an object that carries
no usage, a count that is not a non-negative integer, and a usage that breaks the inclusions
(for example cached + cache-written above input); ``argument`` names the :class:`Usage` field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from tokentrack_client.contract import INT_MAX
from tokentrack_client.errors import InvalidArgument
from tokentrack_client.validation import check_count, check_total_tokens

__all__ = ["USAGE_KEYS", "Usage"]

USAGE_KEYS: Final = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
)
"""The keys ``tokentrack.record_step`` accepts in ``p_usage`` (``total_tokens`` optional)."""


@dataclass(frozen=True, kw_only=True)
class Usage:
    """One step's tokens in the canonical classes (keyword arguments only).

    Checked when made: every count is a non-negative integer (not a bool) of at most
    2,147,483,647; ``cached_input_tokens + cache_write_tokens <= input_tokens``;
    ``reasoning_tokens <= output_tokens``; ``total_tokens`` is ``None`` (input + output, which
    must fit an integer then) or at least input + output. A violation raises
    :class:`~tokentrack_client.InvalidArgument` whose ``argument`` names the field.
    """

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in USAGE_KEYS[:-1]:
            check_count(name, getattr(self, name), minimum=0)
        parts = self.cached_input_tokens + self.cache_write_tokens
        if parts > self.input_tokens:
            name = (
                "cached_input_tokens"
                if self.cached_input_tokens > self.input_tokens
                else "cache_write_tokens"
            )
            raise InvalidArgument(
                name,
                f"{name}: cached_input_tokens + cache_write_tokens ({parts}) must not exceed "
                f"input_tokens ({self.input_tokens})",
            )
        if self.reasoning_tokens > self.output_tokens:
            raise InvalidArgument(
                "reasoning_tokens",
                f"reasoning_tokens ({self.reasoning_tokens}) must not exceed output_tokens "
                f"({self.output_tokens})",
            )
        check_total_tokens(self.total_tokens, self.input_tokens, self.output_tokens)

    def to_dict(self) -> dict[str, int]:
        """The ``p_usage`` object of ``tokentrack.record_step``: the five classes, and
        ``total_tokens`` unless it is ``None``."""
        usage = {
            "input_tokens": self.input_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "output_tokens": self.output_tokens,
            "reasoning_tokens": self.reasoning_tokens,
        }
        if self.total_tokens is not None:
            usage["total_tokens"] = self.total_tokens
        return usage

    # ----------------------------------------------------------------------------------------
    # The adapters
    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_openai(cls, obj: object) -> Usage:
        """The usage of an OpenAI Chat Completions or Responses call (see the module's
        table): a ``CompletionUsage`` or ``ResponseUsage``, the ``ChatCompletion``,
        ``Response`` or final ``ChatCompletionChunk`` that carries it, a ``response.completed``
        stream event, or a dict of the same JSON shape."""
        usage = _carried_usage(obj, "OpenAI", _OPENAI_HINT)
        if _has(usage, "prompt_tokens"):  # Chat Completions' CompletionUsage
            return cls(
                input_tokens=_count(usage, "input_tokens", "prompt_tokens", required=True),
                cached_input_tokens=_count(
                    usage, "cached_input_tokens", "prompt_tokens_details.cached_tokens"
                ),
                cache_write_tokens=_count(
                    usage, "cache_write_tokens", "prompt_tokens_details.cache_write_tokens"
                ),
                output_tokens=_count(usage, "output_tokens", "completion_tokens", required=True),
                reasoning_tokens=_count(
                    usage, "reasoning_tokens", "completion_tokens_details.reasoning_tokens"
                ),
                total_tokens=_optional_count(usage, "total_tokens", "total_tokens"),
            )
        if _has(usage, "input_tokens"):  # the Responses API's ResponseUsage
            for anthropic in ("cache_read_input_tokens", "cache_creation_input_tokens"):
                if _get(usage, anthropic) is not None:
                    # Read as OpenAI's, Anthropic's input_tokens would leave the cache out.
                    raise InvalidArgument(
                        "input_tokens",
                        f"this usage has Anthropic's {anthropic}: use Usage.from_anthropic",
                    )
            return cls._from_responses_usage(usage)
        raise _not_usage(usage, "OpenAI", "prompt_tokens or input_tokens", _OPENAI_HINT)

    @classmethod
    def from_anthropic(cls, obj: object, *, start: object = None) -> Usage:
        """The usage of an Anthropic Messages call (see the module's table): a ``Message``
        or its ``Usage``, a stream's final ``message_delta`` event or its
        ``MessageDeltaUsage``, or a dict of the same JSON shape.

        ``start``: the stream's ``message_start`` event (or its ``Message``, or that
        message's ``Usage``); the input counts a ``message_delta`` omits are taken from it.
        """
        usage = _carried_usage(obj, "Anthropic", _ANTHROPIC_HINT)
        if not _has(usage, "output_tokens"):
            raise _not_usage(usage, "Anthropic", "output_tokens", _ANTHROPIC_HINT)
        _refuse_uncovered_iterations(usage)
        first = None if start is None else _carried_usage(start, "Anthropic", _ANTHROPIC_HINT)

        def counted(field: str, path: str) -> int | None:
            value = _optional_count(usage, field, path)
            if value is None and first is not None:
                value = _optional_count(first, field, path)
            return value

        raw_input = counted("input_tokens", "input_tokens")
        if raw_input is None:
            raise InvalidArgument(
                "input_tokens",
                "this Anthropic usage has no input_tokens (a message_delta that omits them): "
                "pass the stream's message_start event as start=, or the final Message "
                "(stream.get_final_message())",
            )
        cache_read = counted("cached_input_tokens", "cache_read_input_tokens") or 0
        cache_write = counted("cache_write_tokens", "cache_creation_input_tokens") or 0
        return cls(
            input_tokens=raw_input + cache_read + cache_write,
            cached_input_tokens=cache_read,
            cache_write_tokens=cache_write,
            output_tokens=_count(usage, "output_tokens", "output_tokens", required=True),
            reasoning_tokens=counted("reasoning_tokens", "output_tokens_details.thinking_tokens")
            or 0,
        )

    @classmethod
    def from_litellm(cls, obj: object) -> Usage:
        """The usage of a LiteLLM call, whatever its provider (see the module's table): a
        ``ModelResponse`` or streamed ``ModelResponseStream`` that carries usage, its
        ``litellm.Usage``, or a dict of the same JSON shape; also what ``litellm.responses()``
        answers (``ResponsesAPIResponse``, its ``ResponseAPIUsage``, the ``response.completed``
        event), read as OpenAI's Responses usage."""
        usage = _carried_usage(obj, "LiteLLM", _LITELLM_HINT)
        if not _has(usage, "prompt_tokens"):
            if _has(usage, "input_tokens") and all(
                _get(usage, name) is None
                for name in ("cache_read_input_tokens", "cache_creation_input_tokens")
            ):
                # litellm.responses(): its ResponseAPIUsage has OpenAI's Responses shape,
                # built from the normalised chat usage (input_tokens = prompt_tokens).
                return cls._from_responses_usage(usage)
            raise _not_usage(usage, "LiteLLM", "prompt_tokens", _LITELLM_HINT)
        cached = _first_count(
            usage,
            "cached_input_tokens",
            ("prompt_tokens_details.cached_tokens", "cache_read_input_tokens"),
        )
        written = _first_count(
            usage,
            "cache_write_tokens",
            (
                "prompt_tokens_details.cache_write_tokens",
                "prompt_tokens_details.cache_creation_tokens",
                "cache_creation_input_tokens",
            ),
        )
        total = _optional_count(usage, "total_tokens", "total_tokens")
        return cls(
            input_tokens=_count(usage, "input_tokens", "prompt_tokens", required=True),
            cached_input_tokens=cached,
            cache_write_tokens=written,
            output_tokens=_count(usage, "output_tokens", "completion_tokens", required=True),
            reasoning_tokens=_count(
                usage, "reasoning_tokens", "completion_tokens_details.reasoning_tokens"
            ),
            total_tokens=total or None,  # litellm.Usage keeps a missing total as 0
        )

    @classmethod
    def _from_responses_usage(cls, usage: object) -> Usage:
        """OpenAI's Responses ``ResponseUsage`` (also LiteLLM's ``ResponseAPIUsage``)."""
        return cls(
            input_tokens=_count(usage, "input_tokens", "input_tokens", required=True),
            cached_input_tokens=_count(
                usage, "cached_input_tokens", "input_tokens_details.cached_tokens"
            ),
            cache_write_tokens=_count(
                usage, "cache_write_tokens", "input_tokens_details.cache_write_tokens"
            ),
            output_tokens=_count(usage, "output_tokens", "output_tokens", required=True),
            reasoning_tokens=_count(
                usage, "reasoning_tokens", "output_tokens_details.reasoning_tokens"
            ),
            total_tokens=_optional_count(usage, "total_tokens", "total_tokens"),
        )


# --------------------------------------------------------------------------------------------
# Reading provider objects by attribute or key
# --------------------------------------------------------------------------------------------

_OPENAI_HINT: Final = (
    "only the last chunk of a stream carries usage, and only with "
    'stream_options={"include_usage": True}; of a Responses stream, use the '
    "response.completed event"
)
_ANTHROPIC_HINT: Final = "of a stream, use the final message_delta event"
_LITELLM_HINT: Final = (
    "of a stream, only the last chunk carries usage, and only with "
    'stream_options={"include_usage": True}'
)


def _has(obj: object, name: str) -> bool:
    if isinstance(obj, Mapping):
        return name in obj
    try:
        return hasattr(obj, name)
    except Exception:  # a property that raises: as good as absent
        return False


def _get(obj: object, name: str) -> object:
    if isinstance(obj, Mapping):
        return obj.get(name)
    try:
        return getattr(obj, name, None)
    except Exception:
        return None


def _get_path(obj: object, path: str) -> object:
    value = obj
    for name in path.split("."):
        value = _get(value, name)
        if value is None:
            return None
    return value


def _describe(obj: object) -> str:
    kind = _get(obj, "type") if not isinstance(obj, str | bytes) else None
    what = type(obj).__name__
    return f"{what} (type {kind!r})" if isinstance(kind, str) else what


def _carried_usage(obj: object, provider: str, hint: str) -> object:
    """The usage object itself, or the one that ``obj`` carries: its ``.usage`` (a response,
    a chunk, an event), else its ``.response.usage`` (a Responses stream event) or
    ``.message.usage`` (an Anthropic ``message_start`` event)."""
    if obj is None:
        raise InvalidArgument("obj", f"no {provider} usage: got None ({hint})")
    for name in ("", "response", "message"):
        carrier = _get(obj, name) if name else obj
        if carrier is not None and _has(carrier, "usage"):
            usage = _get(carrier, "usage")
            if usage is None:
                raise InvalidArgument(
                    "obj", f"this {provider} {_describe(obj)} carries no usage ({hint})"
                )
            return usage
    return obj


def _not_usage(obj: object, provider: str, wanted: str, hint: str) -> InvalidArgument:
    return InvalidArgument(
        "obj",
        f"no {provider} usage, nor anything that carries one: {_describe(obj)} has no "
        f"{wanted} ({hint})",
    )


def _optional_count(obj: object, field: str, path: str) -> int | None:
    """The provider's count at ``path``, ``None`` when missing or null; ``field`` is the
    :class:`Usage` field it maps to (named by the error of a bad count)."""
    value = _get_path(obj, path)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(
            field, f"{field}: the provider's {path} must be an integer, not {value!r}"
        )
    if not 0 <= value <= INT_MAX:
        raise InvalidArgument(
            field, f"{field}: the provider's {path} must be within 0 and {INT_MAX} (got {value})"
        )
    return value


def _count(obj: object, field: str, path: str, *, required: bool = False) -> int:
    value = _optional_count(obj, field, path)
    if value is None:
        if required:
            raise InvalidArgument(field, f"{field}: the provider's {path} is missing or null")
        return 0
    return value


def _first_count(obj: object, field: str, paths: tuple[str, ...]) -> int:
    """The first of ``paths`` that holds a count, else 0."""
    for path in paths:
        value = _optional_count(obj, field, path)
        if value is not None:
            return value
    return 0


def _refuse_uncovered_iterations(usage: object) -> None:
    """Anthropic's beta ``usage.iterations``: a ``compaction`` entry's tokens are not in the
    top-level counts, and an ``advisor_message`` or ``fallback_message`` entry ran another
    model. Neither fits one step of one model, so such a usage is refused rather than
    undercounted or priced as the wrong model: record each entry as a step of its own
    (``Usage.from_anthropic(entry)`` reads one)."""
    iterations = _get(usage, "iterations")
    if not isinstance(iterations, list | tuple):
        return
    for entry in iterations:
        kind = _get(entry, "type")
        if kind != "message":
            raise InvalidArgument(
                "obj",
                f"this Anthropic usage has a {kind!r} iteration, which its top-level counts do "
                "not cover as one step of one model: record each of usage.iterations as a step "
                "of its own (Usage.from_anthropic(entry), with the entry's model)",
            )
