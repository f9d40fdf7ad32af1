"""``tokentrack verify --functional``: the staging tests, run in a sandbox through the client.

* The four report types (standard, dd, discovery, hybrid), each completed, cancelled (by
  :meth:`TokenTracker.cancel_report` while it runs: its next step is still billed, late) and
  failed (an exception in the ``track_report`` block), run through
  :meth:`TokenTracker.track_report` for a sandbox account created for the run. All of it
  happens inside ONE transaction on one connection that is rolled back at the end: the
  sandbox account, its reports, steps and the usage ledger rows billing them (which nothing
  could delete afterwards: the ledger is append-only) never become visible to anyone, and no
  real account's row is written. Each row checks the report's status and that the tokens
  recorded equal the tokens billed; then ``reconcile()`` of the sandbox account must be ok.
* Two reports racing, on two connections, for a budget that holds one: exactly one must be
  granted. A race needs committed rows, so this part commits a second sandbox account, its
  period and the winner's report and reservation (nothing is billed: no ledger row), then
  deletes exactly those rows by id. Its ids are printed, so that a run killed in between
  leaves rows that can be found.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import asyncpg

from tokentrack_client.client import TokenTracker
from tokentrack_client.connection import pg_error
from tokentrack_client.contract import REPORT_OUTCOMES
from tokentrack_client.errors import InsufficientTokens, TokenTrackError
from tokentrack_client.ops._common import connected, render_table
from tokentrack_client.retry import NO_RETRY
from tokentrack_client.tracking import ReportCancelled

MODES: Final = ("standard", "dd", "discovery", "hybrid")
# The steps of each report type: (name, input tokens, output tokens).
PIPELINES: Final[dict[str, tuple[tuple[str, int, int], ...]]] = {
    "standard": (("outline", 1_200, 300), ("write", 2_400, 1_800)),
    "dd": (("collect", 3_000, 400), ("analyse", 4_500, 1_200), ("summarise", 1_500, 700)),
    "discovery": (("search", 900, 150), ("rank", 1_100, 250)),
    "hybrid": (
        ("plan", 800, 200),
        ("search", 1_000, 150),
        ("draft", 2_600, 1_900),
        ("check", 700, 90),
    ),
}
SANDBOX_LIMIT: Final = 10_000_000
RACE_ESTIMATE: Final = 5_000


class _StagingFailure(Exception):
    """Raised inside a report block to exercise the failed path."""


class _RollBack(Exception):
    """Ends the sandbox transaction (always rolled back)."""


@dataclass
class Row:
    """One line of the functional table."""

    report_type: str
    outcome: str
    status: str
    tokens_recorded: int | None
    billed: int | None
    ok: bool
    detail: str = ""


@dataclass
class FunctionalReport:
    """The result of ``verify --functional``."""

    sandbox_account: str
    race_account: str
    rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every row passed."""
        return bool(self.rows) and all(r.ok for r in self.rows)

    def as_json(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {
            "ok": self.ok,
            "sandbox_account": self.sandbox_account,
            "race_account": self.race_account,
            "rows": [asdict(r) for r in self.rows],
        }

    def render(self) -> str:
        """The table "report type, outcome, status, tokens recorded, billed" with pass/fail."""
        out = [
            f"functional: sandbox account {self.sandbox_account} (rolled back), race account "
            f"{self.race_account} (deleted)",
            render_table(
                (
                    "REPORT TYPE",
                    "OUTCOME",
                    "STATUS",
                    "TOKENS RECORDED",
                    "BILLED",
                    "RESULT",
                    "DETAIL",
                ),
                [
                    (
                        r.report_type,
                        r.outcome,
                        r.status,
                        r.tokens_recorded,
                        r.billed,
                        "PASS" if r.ok else "FAIL",
                        r.detail,
                    )
                    for r in self.rows
                ],
            ),
            "verify --functional: " + ("all staging tests passed" if self.ok else "FAILED"),
        ]
        return "\n".join(out)


# --------------------------------------------------------------------------------------------
# The report lifecycles, in the rolled-back transaction
# --------------------------------------------------------------------------------------------


async def _report(
    conn: asyncpg.Connection, tracker: TokenTracker, account: uuid.UUID, mode: str, outcome: str
) -> Row:
    report = uuid.uuid4()
    steps = PIPELINES[mode]
    estimate = sum(i + o for _, i, o in steps) * 2
    # The generator creates its report (with its type) before reserving, as applications do.
    await conn.execute(
        "INSERT INTO tokentrack.reports (id, account_id, mode, status)"
        " VALUES ($1, $2, $3, 'pending')",
        report,
        account,
        mode,
    )
    run = tracker.track_report(account, report, estimate)
    try:
        async with run:
            for index, (name, tokens_in, tokens_out) in enumerate(steps):
                await run.step(name, input_tokens=tokens_in, output_tokens=tokens_out)
                if index == 0 and outcome == "cancelled":
                    await tracker.cancel_report(report, account)  # the cancel button
                if index == 0 and outcome == "failed":
                    raise _StagingFailure("staging test: simulated generator failure")
    except ReportCancelled:  # the step after the cancel: recorded (billed late), then raised
        if outcome != "cancelled":
            raise
    except _StagingFailure:
        if outcome != "failed":
            raise
    recorded = run.tokens_recorded
    row = await conn.fetchrow(
        """
        SELECT r.status, r.error_message, (r.token_usage ->> 'totalTokens')::bigint AS usage,
               rr.status AS reservation,
               (SELECT COALESCE(sum(s.total_tokens), 0) FROM tokentrack.report_step_usage s
                 WHERE s.report_id = r.id) AS recorded,
               (SELECT COALESCE(sum(s.total_tokens), 0) FROM tokentrack.report_step_usage s
                 WHERE s.report_id = r.id AND s.billed_at IS NOT NULL) AS billed
        FROM tokentrack.reports r
        JOIN tokentrack.report_reservations rr ON rr.report_id = r.id
        WHERE r.id = $1
        """,
        report,
    )
    if row is None:
        return Row(mode, outcome, "missing", recorded, None, False, "report or reservation missing")
    problems = []
    if row["status"] != outcome:
        problems.append(f"status {row['status']}, expected {outcome}")
    if row["reservation"] != "completed":
        problems.append(f"reservation {row['reservation']}, expected completed")
    if row["recorded"] != recorded:
        problems.append(f"{row['recorded']} tokens in the database, the client recorded {recorded}")
    if row["billed"] != row["recorded"]:
        problems.append(f"billed {row['billed']} of {row['recorded']} recorded tokens")
    if row["usage"] != row["billed"]:
        problems.append(f"token_usage.totalTokens {row['usage']}, billed {row['billed']}")
    if outcome == "failed" and not row["error_message"]:
        problems.append("no error_message on the failed report")
    return Row(
        mode,
        outcome,
        str(row["status"]),
        int(row["recorded"]),
        int(row["billed"]),
        not problems,
        "; ".join(problems),
    )


async def _lifecycles(conn: asyncpg.Connection, account: uuid.UUID) -> list[Row]:
    rows: list[Row] = []
    try:
        async with conn.transaction():
            tracker = TokenTracker(conn, retry=NO_RETRY)
            await tracker.open_usage_period(account, SANDBOX_LIMIT)
            for mode in MODES:
                for outcome in REPORT_OUTCOMES:
                    rows.append(await _report(conn, tracker, account, mode, outcome))
            reconciled = await tracker.reconcile(account)
            used = await conn.fetchval(
                "SELECT tokens_used FROM tokentrack.usage_periods WHERE account_id = $1", account
            )
            billed = sum(r.billed or 0 for r in rows)
            problems = []
            if not reconciled.ok:
                problems.append(f"{len(reconciled.discrepancies)} discrepancies")
            if used != billed:
                problems.append(f"tokens_used {used}, billed {billed}")
            rows.append(
                Row(
                    "sandbox",
                    "reconcile",
                    "ok" if reconciled.ok else "NOT OK",
                    None,
                    used,
                    not problems,
                    "; ".join(problems),
                )
            )
            raise _RollBack
    except _RollBack:
        pass
    except (TokenTrackError, asyncpg.PostgresError) as exc:
        detail = pg_error(exc) if isinstance(exc, asyncpg.PostgresError) else str(exc)
        rows.append(Row("sandbox", "error", "-", None, None, False, " ".join(detail.split())))
    leaked = await conn.fetchval(
        "SELECT EXISTS (SELECT FROM tokentrack.accounts WHERE id = $1)", account
    )
    rows.append(
        Row(
            "sandbox",
            "rolled back",
            "gone" if not leaked else "LEFT",
            None,
            None,
            not leaked,
            "" if not leaked else "the sandbox account is still there",
        )
    )
    return rows


# --------------------------------------------------------------------------------------------
# The race, on two connections
# --------------------------------------------------------------------------------------------


async def _race(dsn: str, conn: asyncpg.Connection, account: uuid.UUID) -> list[Row]:
    rows: list[Row] = []
    tracker = TokenTracker(conn, retry=NO_RETRY)
    reports = [uuid.uuid4(), uuid.uuid4()]
    try:
        await tracker.open_usage_period(account, RACE_ESTIMATE)  # holds exactly one
        async with connected(dsn, "tokentrack verify --functional") as other:
            rival = TokenTracker(other, retry=NO_RETRY)
            answers: Sequence[object] = await asyncio.gather(
                tracker.try_reserve(account, reports[0], RACE_ESTIMATE),
                rival.try_reserve(account, reports[1], RACE_ESTIMATE),
                return_exceptions=True,
            )
        granted = [a for a in answers if not isinstance(a, BaseException)]
        refused = [a for a in answers if isinstance(a, InsufficientTokens)]
        others = [a for a in answers if isinstance(a, BaseException) and a not in refused]
        ok = len(granted) == 1 and len(refused) == 1 and not others
        for index, answer in enumerate(answers):
            if isinstance(answer, InsufficientTokens):
                rows.append(
                    Row(
                        "race",
                        "refused",
                        "insufficient_tokens",
                        None,
                        0,
                        ok,
                        f"report {reports[index]}",
                    )
                )
            elif isinstance(answer, BaseException):
                rows.append(Row("race", "error", "-", None, None, False, str(answer)))
            else:
                rows.append(
                    Row(
                        "race",
                        "granted",
                        "active",
                        None,
                        0,
                        ok,
                        f"report {reports[index]}, {RACE_ESTIMATE} tokens reserved",
                    )
                )
    except (TokenTrackError, asyncpg.PostgresError) as exc:
        rows.append(Row("race", "error", "-", None, None, False, " ".join(str(exc).split())))
    finally:
        rows.append(await _remove_race_account(conn, account, reports))
    return rows


async def _remove_race_account(
    conn: asyncpg.Connection, account: uuid.UUID, reports: list[uuid.UUID]
) -> Row:
    """Delete the race's rows (account, period, reports, reservations): nothing was billed."""
    try:
        async with conn.transaction():
            billed = await conn.fetchval(
                "SELECT EXISTS (SELECT FROM tokentrack.usage_ledger WHERE account_id = $1)"
                " OR EXISTS (SELECT FROM tokentrack.report_step_usage WHERE account_id = $1)",
                account,
            )
            if billed:
                return Row(
                    "race",
                    "removed",
                    "KEPT",
                    None,
                    None,
                    False,
                    f"account {account} has billing rows; it cannot be removed",
                )
            await conn.execute(
                "DELETE FROM tokentrack.report_reservations WHERE account_id = $1", account
            )
            await conn.execute(
                "DELETE FROM tokentrack.reports WHERE account_id = $1 AND id = ANY($2::uuid[])",
                account,
                reports,
            )
            await conn.execute(
                "DELETE FROM tokentrack.usage_periods WHERE account_id = $1", account
            )
            await conn.execute("DELETE FROM tokentrack.accounts WHERE id = $1", account)
    except asyncpg.PostgresError as exc:
        return Row(
            "race",
            "removed",
            "KEPT",
            None,
            None,
            False,
            f"could not delete account {account}: {pg_error(exc)}",
        )
    return Row("race", "removed", "gone", None, None, True, "")


async def run(dsn: str) -> FunctionalReport:
    """Run the staging tests against ``dsn`` (see the module docstring)."""
    sandbox, race_account = uuid.uuid4(), uuid.uuid4()
    report = FunctionalReport(str(sandbox), str(race_account))
    async with connected(dsn, "tokentrack verify --functional") as conn:
        report.rows += await _lifecycles(conn, sandbox)
        report.rows += await _race(dsn, conn, race_account)
    return report
