"""tokentrack: PostgreSQL-native exact LLM token accounting.

The SQL under ``sql/`` is the product; this package is the thin asyncpg client,
the migrator (:mod:`tokentrack_client.migrate`) and the ``tokentrack`` CLI.
"""

__version__ = "0.1.0"

from tokentrack_client.client import TokenTracker
from tokentrack_client.errors import (
    AccountNotFound,
    CallTimeout,
    ConnectionLost,
    DatabaseError,
    InsufficientTokens,
    InvalidArgument,
    NoActivePeriod,
    NotInstalled,
    PermissionDenied,
    Refusal,
    ReportAccountMismatch,
    ReportFinalized,
    ReservationNotFound,
    StepConflict,
    TokenTrackError,
    TransientError,
    UnexpectedAnswer,
)
from tokentrack_client.results import (
    Discrepancy,
    PeriodOpened,
    Reconciliation,
    Reservation,
    Settlement,
    StepRecord,
    SweepResult,
    UsageIncrement,
)
from tokentrack_client.retry import DEFAULT_RETRY, NO_RETRY, RetryPolicy
from tokentrack_client.tracking import ReportCancelled, ReportEnded, ReportTracker
from tokentrack_client.usage import Usage

__all__ = [
    "DEFAULT_RETRY",
    "NO_RETRY",
    "AccountNotFound",
    "CallTimeout",
    "ConnectionLost",
    "DatabaseError",
    "Discrepancy",
    "InsufficientTokens",
    "InvalidArgument",
    "NoActivePeriod",
    "NotInstalled",
    "PeriodOpened",
    "PermissionDenied",
    "Reconciliation",
    "Refusal",
    "ReportAccountMismatch",
    "ReportCancelled",
    "ReportEnded",
    "ReportFinalized",
    "ReportTracker",
    "Reservation",
    "ReservationNotFound",
    "RetryPolicy",
    "Settlement",
    "StepConflict",
    "StepRecord",
    "SweepResult",
    "TokenTrackError",
    "TokenTracker",
    "TransientError",
    "UnexpectedAnswer",
    "Usage",
    "UsageIncrement",
    "__version__",
]
