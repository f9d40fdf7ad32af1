"""Argument checks: the SQL's own rules, applied before a call so that bad input never reaches
the server.

Every check returns the value as the SQL function takes it, or raises
:class:`~tokentrack_client.InvalidArgument` naming the Python parameter. The client's methods
and :class:`~tokentrack_client.ReportTracker` both check through this module.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import TypeAlias

from tokentrack_client.contract import (
    BIGINT_MAX,
    BUDGET_UNITS,
    BUDGET_WINDOWS,
    ERROR_MESSAGE_MAX,
    INT_MAX,
    NAME_MAX,
    REPORT_MODES,
    REPORT_OUTCOMES,
    SUBJECTS_MAX,
    THRESHOLD_MAX,
    THRESHOLDS_MAX,
)
from tokentrack_client.errors import InvalidArgument

__all__ = [
    "IdLike",
    "check_budget_kind",
    "check_choice",
    "check_count",
    "check_error_message",
    "check_estimate",
    "check_flag",
    "check_id",
    "check_mode",
    "check_optional_datetime",
    "check_outcome",
    "check_seconds",
    "check_subjects",
    "check_text",
    "check_thresholds",
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


def check_seconds(name: str, value: object, *, maximum: float) -> float:
    """A number of seconds (an int or float, not a bool) above 0 and at most ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        what = "None" if value is None else type(value).__name__
        raise InvalidArgument(name, f"{name} must be a number of seconds, not {what}")
    if not 0 < value <= maximum:
        raise InvalidArgument(
            name, f"{name} must be above 0 and at most {maximum:g} s (got {value!r})"
        )
    return float(value)


def check_optional_datetime(name: str, value: object) -> datetime | None:
    """A :class:`~datetime.datetime`, or None."""
    if value is not None and not isinstance(value, datetime):
        raise InvalidArgument(name, f"{name} must be a datetime or None")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (a string of the SQL's list: a unit, a window)."""
    if isinstance(value, str) and value in choices:
        return value
    listed = ", ".join(choices[:-1]) + f" or {choices[-1]}"
    raise InvalidArgument(name, f"{name} must be {listed}, not {value!r}")


def check_mode(value: object) -> str | None:
    """A report mode (one of :data:`~tokentrack_client.contract.REPORT_MODES`), or None."""
    return None if value is None else check_choice("mode", value, REPORT_MODES)


def check_subjects(value: object) -> tuple[str, ...]:
    """``reserve``'s subjects: an iterable of at most
    :data:`~tokentrack_client.contract.SUBJECTS_MAX` labels, none blank (spaces), each of at
    most :data:`~tokentrack_client.contract.NAME_MAX` characters (a single string is refused:
    it is not a list of subjects)."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise InvalidArgument(
            "subjects",
            f"subjects must be a list or tuple of labels, not {type(value).__name__}",
        )
    subjects = tuple(value)
    if len(subjects) > SUBJECTS_MAX:
        raise InvalidArgument(
            "subjects", f"subjects must hold at most {SUBJECTS_MAX} subjects (got {len(subjects)})"
        )
    for subject in subjects:
        if not isinstance(subject, str):
            raise InvalidArgument(
                "subjects", f"each subject must be a string, not {type(subject).__name__}"
            )
        if not subject.strip(" "):  # the server's btrim() strips spaces only
            raise InvalidArgument("subjects", "subjects must not hold an empty subject")
        if len(subject) > NAME_MAX:
            raise InvalidArgument(
                "subjects",
                f"a subject must be at most {NAME_MAX} characters (got {len(subject)})",
            )
        if "\x00" in subject:
            raise InvalidArgument("subjects", "a subject must not contain NUL characters")
    return subjects


def check_estimate(tokens: int, cost_micros: object, model: object) -> dict[str, int | str]:
    """``reserve``'s ``p_estimate`` (and ``extend_reservation``'s ``p_more``): ``tokens``
    (checked by the caller), and ``cost_micros`` (a whole number >= 0) or ``model`` (a model
    name that prices the tokens), not both."""
    estimate: dict[str, int | str] = {"tokens": tokens}
    if cost_micros is not None:
        estimate["cost_micros"] = check_count(
            "cost_micros", cost_micros, minimum=0, maximum=BIGINT_MAX
        )
    name = check_text("model", model, required=False)
    if name is not None:
        if cost_micros is not None:
            raise InvalidArgument(
                "model", "give cost_micros or model (which prices the tokens), not both"
            )
        estimate["model"] = name
    return estimate


def check_thresholds(value: object) -> tuple[int, ...] | None:
    """A budget's soft thresholds: None (the default, or unchanged), or 1 to
    :data:`~tokentrack_client.contract.THRESHOLDS_MAX` whole percentages from 1 to
    :data:`~tokentrack_client.contract.THRESHOLD_MAX`."""
    if value is None:
        return None
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise InvalidArgument(
            "thresholds", f"thresholds must be a list of percentages, not {type(value).__name__}"
        )
    thresholds = tuple(value)
    if not 1 <= len(thresholds) <= THRESHOLDS_MAX:
        raise InvalidArgument(
            "thresholds",
            f"thresholds must hold 1 to {THRESHOLDS_MAX} percentages (got {len(thresholds)})",
        )
    for threshold in thresholds:
        if isinstance(threshold, bool) or not isinstance(threshold, int):
            raise InvalidArgument(
                "thresholds",
                f"each threshold must be a whole percentage, not {type(threshold).__name__}",
            )
        if not 1 <= threshold <= THRESHOLD_MAX:
            raise InvalidArgument(
                "thresholds",
                f"each threshold must be from 1 to {THRESHOLD_MAX} percent (got {threshold})",
            )
    return thresholds


def check_budget_kind(unit: object, window: object) -> tuple[str, str]:
    """A budget's ``unit`` and ``window`` (:data:`~tokentrack_client.contract.BUDGET_UNITS`,
    :data:`~tokentrack_client.contract.BUDGET_WINDOWS`)."""
    return check_choice("unit", unit, BUDGET_UNITS), check_choice("window", window, BUDGET_WINDOWS)
