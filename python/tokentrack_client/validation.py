"""Argument checks: the SQL's own rules, applied before a call so that bad input never reaches
the server.

Every check returns the value as the SQL function takes it, or raises
:class:`~tokentrack_client.InvalidArgument` naming the Python parameter. The client's methods
and :class:`~tokentrack_client.ReportTracker` both check through this module.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TypeAlias

from tokentrack_client.contract import ERROR_MESSAGE_MAX, INT_MAX, NAME_MAX, REPORT_OUTCOMES
from tokentrack_client.errors import InvalidArgument

__all__ = [
    "IdLike",
    "check_count",
    "check_error_message",
    "check_flag",
    "check_id",
    "check_optional_datetime",
    "check_outcome",
    "check_text",
    "check_total_tokens",
]

IdLike: TypeAlias = "uuid.UUID | str"
"""An account or report id: a :class:`uuid.UUID` or its string form."""


def check_id(name: str, value: object) -> uuid.UUID:
    """A UUID, or its string form."""
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            raise InvalidArgument(name, f"{name} is not a UUID: {value[:100]!r}") from None
    if value is None:
        raise InvalidArgument(name, f"{name} must not be None")
    raise InvalidArgument(name, f"{name} must be a UUID, not {type(value).__name__}")


def check_count(name: str, value: object, *, minimum: int, maximum: int = INT_MAX) -> int:
    """An integer (not a bool) within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        what = "None" if value is None else type(value).__name__
        raise InvalidArgument(name, f"{name} must be an integer, not {what}")
    if value < minimum:
        rule = "positive" if minimum == 1 else f"at least {minimum}"
        raise InvalidArgument(name, f"{name} must be {rule} (got {value})")
    if value > maximum:
        raise InvalidArgument(name, f"{name} must be at most {maximum} (got {value})")
    return value


def check_total_tokens(total_tokens: object, input_tokens: int, output_tokens: int) -> int | None:
    """A step's total: None means input + output (which must fit an integer then); a given
    total must not be below input + output."""
    both = input_tokens + output_tokens
    if total_tokens is None:
        if both > INT_MAX:
            raise InvalidArgument(
                "total_tokens",
                f"total_tokens (None, so input_tokens + output_tokens = {both}) exceeds {INT_MAX}",
            )
        return None
    total = check_count("total_tokens", total_tokens, minimum=0)
    if total < both:
        raise InvalidArgument(
            "total_tokens",
            f"total_tokens ({total}) must not be below input_tokens + output_tokens ({both})",
        )
    return total


def check_text(name: str, value: object, *, required: bool, limit: int = NAME_MAX) -> str | None:
    """A string of at most ``limit`` characters without NUL; non-blank when ``required``."""
    if value is None:
        if required:
            raise InvalidArgument(name, f"{name} must not be None")
        return None
    if not isinstance(value, str):
        raise InvalidArgument(name, f"{name} must be a string, not {type(value).__name__}")
    if required and not value.strip(" "):  # the server's btrim() strips spaces only
        raise InvalidArgument(name, f"{name} must not be empty")
    if len(value) > limit:
        raise InvalidArgument(name, f"{name} must be at most {limit} characters (got {len(value)})")
    if "\x00" in value:
        raise InvalidArgument(name, f"{name} must not contain NUL characters")
    return value


def check_error_message(value: object) -> str | None:
    """A failed report's message: None, or at most :data:`ERROR_MESSAGE_MAX` characters."""
    return check_text("error_message", value, required=False, limit=ERROR_MESSAGE_MAX)


def check_outcome(value: object) -> str:
    """A report outcome: one of :data:`~tokentrack_client.contract.REPORT_OUTCOMES`."""
    if isinstance(value, str) and value in REPORT_OUTCOMES:
        return value
    raise InvalidArgument("status", f"status must be complete, failed or cancelled, not {value!r}")


def check_flag(name: str, value: object) -> bool:
    """A bool (not merely truthy)."""
    if not isinstance(value, bool):
        raise InvalidArgument(name, f"{name} must be a bool, not {type(value).__name__}")
    return value


def check_optional_datetime(name: str, value: object) -> datetime | None:
    """A :class:`~datetime.datetime`, or None."""
    if value is not None and not isinstance(value, datetime):
        raise InvalidArgument(name, f"{name} must be a datetime or None")
    return value
