"""Reading the functions' jsonb answers: the one place that parses them.

:func:`read_answer` turns the text of a function's answer into a JSON object, raising the
typed :class:`~tokentrack_client.Refusal` for ``"success": false``; the ``get_*`` readers take
one field out of it with its type checked. The client's result types
(:mod:`tokentrack_client.results`) are built with these readers, and the operations commands
read the answers of the functions they call through :func:`read_answer` and those result
types. A missing or mistyped key is an :class:`~tokentrack_client.UnexpectedAnswer`, never a
``KeyError`` or a silently wrong number.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from tokentrack_client.errors import UnexpectedAnswer, refusal_from_answer

__all__ = [
    "get_bool",
    "get_datetime",
    "get_decimal",
    "get_int",
    "get_int_list",
    "get_list",
    "get_optional_int",
    "get_optional_str",
    "get_optional_uuid",
    "get_str",
    "get_uuid",
    "read_answer",
    "read_object",
]


def read_object(function: str, raw: object, *, decimals: bool = False) -> Mapping[str, Any]:
    """The JSON object that ``function`` answered, as the text of its jsonb value; with
    ``decimals``, its fractional numbers are :class:`~decimal.Decimal` (exact, as the
    database's ``numeric``), else ``float``."""
    if not isinstance(raw, str):
        raise UnexpectedAnswer(f"{function}: expected the jsonb answer as text, got {raw!r}")
    try:
        answer = json.loads(raw, parse_float=Decimal if decimals else None)
    except ValueError:
        raise UnexpectedAnswer(f"{function}: the answer is not JSON: {raw[:200]!r}") from None
    if not isinstance(answer, dict):
        raise UnexpectedAnswer(f"{function}: the answer is not a JSON object: {raw[:200]!r}")
    return answer


def read_answer(function: str, raw: object, *, decimals: bool = False) -> Mapping[str, Any]:
    """:func:`read_object`, then the typed refusal for a ``"success": false`` answer."""
    answer = read_object(function, raw, decimals=decimals)
    if answer.get("success") is False:
        raise refusal_from_answer(answer)
    return answer


_MISSING = object()


def _get(answer: Mapping[str, Any], key: str, default: object = _MISSING) -> object:
    if key in answer:
        return answer[key]
    if default is _MISSING:
        raise UnexpectedAnswer(f"the answer has no {key!r}: {dict(answer)!r}")
    return default


def get_int(answer: Mapping[str, Any], key: str, default: object = _MISSING) -> int:
    """An integer (a JSON boolean is not one)."""
    value = _get(answer, key, default)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise UnexpectedAnswer(f"{key!r} is not an integer: {value!r}")


def get_decimal(answer: Mapping[str, Any], key: str) -> Decimal:
    """A number, exactly: an integer, or a :class:`~decimal.Decimal` from an answer read with
    ``decimals=True`` (a ``float`` is refused: it may already be rounded)."""
    value = _get(answer, key)
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    if isinstance(value, Decimal) and value.is_finite():
        return value
    raise UnexpectedAnswer(f"{key!r} is not an exact number: {value!r}")


def get_optional_int(answer: Mapping[str, Any], key: str) -> int | None:
    """An integer, or None when the key is missing, null or not an integer."""
    value = answer.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def get_bool(answer: Mapping[str, Any], key: str, default: object = _MISSING) -> bool:
    """A boolean."""
    value = _get(answer, key, default)
    if isinstance(value, bool):
        return value
    raise UnexpectedAnswer(f"{key!r} is not a boolean: {value!r}")


def get_str(answer: Mapping[str, Any], key: str) -> str:
    """A string."""
    value = _get(answer, key)
    if isinstance(value, str):
        return value
    raise UnexpectedAnswer(f"{key!r} is not a string: {value!r}")


def get_optional_str(answer: Mapping[str, Any], key: str) -> str | None:
    """A string, or None when the key is missing, null or not a string."""
    value = answer.get(key)
    return value if isinstance(value, str) else None


def get_uuid(answer: Mapping[str, Any], key: str) -> uuid.UUID:
    """A UUID, from its string form."""
    value = _get(answer, key)
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise UnexpectedAnswer(f"{key!r} is not a uuid: {value!r}") from None


def get_optional_uuid(answer: Mapping[str, Any], key: str) -> uuid.UUID | None:
    """A UUID, or None when the key is missing or null."""
    return None if answer.get(key) is None else get_uuid(answer, key)


def get_datetime(answer: Mapping[str, Any], key: str) -> datetime:
    """A timestamp, from its ISO 8601 form."""
    value = _get(answer, key)
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        raise UnexpectedAnswer(f"{key!r} is not a timestamp: {value!r}") from None


def get_list(answer: Mapping[str, Any], key: str) -> Sequence[Mapping[str, Any]]:
    """A list of JSON objects; an empty list when the key is missing."""
    found = answer.get(key, [])
    if not isinstance(found, list):
        raise UnexpectedAnswer(f"{key!r} is not a list: {found!r}")
    for item in found:
        if not isinstance(item, Mapping):
            raise UnexpectedAnswer(f"expected a JSON object in {key!r}, got {item!r}")
    return found


def get_int_list(answer: Mapping[str, Any], key: str) -> tuple[int, ...]:
    """A list of integers (a JSON boolean is not one)."""
    found = _get(answer, key)
    if isinstance(found, list) and all(
        isinstance(item, int) and not isinstance(item, bool) for item in found
    ):
        return tuple(found)
    raise UnexpectedAnswer(f"{key!r} is not a list of integers: {found!r}")
