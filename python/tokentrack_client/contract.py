"""The names and limits that the SQL contract fixes, defined once for the whole package.

The client's argument checks, the report tracker, the operations commands and the tests read
them from here, so that a limit or a list of statuses cannot drift between two copies. This
module imports nothing of the package: every other module may import it.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BIGINT_MAX",
    "BUDGET_UNITS",
    "BUDGET_WINDOWS",
    "ERROR_MESSAGE_MAX",
    "INT_MAX",
    "LEASE_DEFAULT",
    "LEASE_MAX",
    "NAME_MAX",
    "NOTIFICATIONS_CLAIM_MAX",
    "PERIOD_STATUSES",
    "REPORT_MODES",
    "REPORT_OUTCOMES",
    "REPORT_STATUSES",
    "RESERVATION_STATUSES",
    "SUBJECTS_MAX",
    "THRESHOLDS_MAX",
    "THRESHOLD_MAX",
]

INT_MAX: Final = 2**31 - 1
"""The largest ``integer``: token counts, an estimate, a step's total."""

BIGINT_MAX: Final = 2**63 - 1
"""The largest ``bigint``: a period's ``tokens_limit``."""

NAME_MAX: Final = 200
"""The longest step name or model name, in characters."""

ERROR_MESSAGE_MAX: Final = 10_000
"""The longest ``error_message`` kept on a failed report, in characters."""

REPORT_OUTCOMES: Final = ("complete", "failed", "cancelled")
"""A report's outcome: what ``finish_report`` sets, once."""

REPORT_STATUSES: Final = ("pending", "processing", *REPORT_OUTCOMES)
"""Every ``tokentrack.reports.status``: before the outcome, then the outcomes."""

RESERVATION_STATUSES: Final = ("active", "completed", "expired")
"""Every ``tokentrack.report_reservations.status``: finalized reservations are ``completed``,
swept ones ``expired``."""

PERIOD_STATUSES: Final = ("active", "completed")
"""Every ``tokentrack.usage_periods.status``."""

REPORT_MODES: Final = ("standard", "dd", "discovery", "hybrid")
"""Every ``tokentrack.reports.mode``: what ``reserve``'s ``p_mode`` takes."""

SUBJECTS_MAX: Final = 32
"""The most subjects one ``reserve`` takes; each is a label of at most :data:`NAME_MAX`
characters."""

BUDGET_UNITS: Final = ("tokens", "cost_micros")
"""Every ``tokentrack.budgets.unit``."""

BUDGET_WINDOWS: Final = ("minute", "hour", "day", "week", "month", "total")
"""Every ``tokentrack.budgets.budget_window``, shortest first (``total`` never resets)."""

THRESHOLDS_MAX: Final = 10
"""The most soft thresholds a budget has; each a whole percentage from 1 to
:data:`THRESHOLD_MAX`."""

THRESHOLD_MAX: Final = 1000
"""The highest soft threshold of a budget, in percent."""

NOTIFICATIONS_CLAIM_MAX: Final = 1000
"""The most notifications one ``claim_notifications`` hands out (its ``p_limit``)."""

LEASE_DEFAULT: Final = 60.0
"""The lease of a claimed notification, in seconds, when the claim names none."""

LEASE_MAX: Final = 86_400.0
"""The longest lease ``claim_notifications`` grants, in seconds (1 day)."""
