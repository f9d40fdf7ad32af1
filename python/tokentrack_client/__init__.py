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
    InsufficientBudget,
    InsufficientTokens,
    InvalidArgument,
    NoActivePeriod,
    NotificationClaimed,
    NotificationNotFound,
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
from tokentrack_client.notifications import NotificationStream
from tokentrack_client.results import (
    BudgetHold,
    BudgetSet,
    Discrepancy,
    Extension,
    Notification,
    NotificationAck,
    PeriodOpened,
    Reconciliation,
    Reservation,
    Settlement,
    StepRecord,
    SweepResult,
    UsageIncrement,
)
from tokentrack_client.retry import DEFAULT_RETRY, NO_RETRY, RetryPolicy
from tokentrack_client.tracking import (
    OnOverrun,
    ReportCancelled,
    ReportEnded,
    ReportTracker,
    ReservationExceeded,
)
from tokentrack_client.usage import Usage

__all__ = [
    "DEFAULT_RETRY",
    "NO_RETRY",
    "AccountNotFound",
    "BudgetHold",
    "BudgetSet",
    "CallTimeout",
    "ConnectionLost",
    "DatabaseError",
    "Discrepancy",
    "Extension",
    "InsufficientBudget",
    "InsufficientTokens",
    "InvalidArgument",
    "NoActivePeriod",
    "NotInstalled",
    "Notification",
    "NotificationAck",
    "NotificationClaimed",
    "NotificationNotFound",
    "NotificationStream",
    "OnOverrun",
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
    "ReservationExceeded",
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
