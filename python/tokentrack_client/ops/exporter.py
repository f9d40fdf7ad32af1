"""``tokentrack exporter``: a long-running Prometheus ``/metrics`` endpoint.

Needs the optional extra ``exporter`` (``pip install 'tokentrack[exporter]'``: prometheus_client).

How it reads the database:

* **scrape** (at most once per ``--min-interval`` seconds, 10 by default, whatever the number
  of scrapers): one read-only REPEATABLE READ transaction with ``statement_timeout`` =
  ``--query-timeout`` (5 s) runs ``tokentrack.health(--hours)``, ``tokentrack.metrics(--hours,
  --top-accounts, --top-subjects)`` and ``tokentrack.billing_totals(...)`` in one statement, so
  every figure of a scrape comes from one snapshot. A scrape within the interval is served
  from the last read. health()'s answer is read by the monitor's reader,
  :func:`tokentrack_client.ops.monitor.read_answers`.
* **slow task** (every ``--reconcile-interval`` seconds, 600 by default; 0 disables it), on
  its own connection so that it never delays a scrape, with ``statement_timeout`` =
  ``--reconcile-timeout`` (60 s): first the billing counters' starting point (the whole
  usage ledger summed once), then ``tokentrack.advance_reconcile_point()``: the incremental
  reconcile (reconcile_recent(): what changed since the verified point, checked as
  reconcile() checks it), which moves the point forward when it is ok, so each run costs what
  changed since the run before, not the history. The exporter is the point's writer (the
  monitor only reads it); on a read-only database (a standby, a read-only role) it checks
  with reconcile_recent() without advancing. ``--reconcile-full`` runs ``tokentrack.reconcile()``,
  the audit of every period, instead (and with an SQL older than version 20261214000000).
  The exporter serves the last verdict with its time
  (``tokentrack_reconcile_last_run_timestamp_seconds``); a run that fails or times out keeps
  the previous verdict and sets ``tokentrack_reconcile_up 0``.

Billing counters (``tokentrack_billed_tokens_total`` ...) are monotonic: the ledger is
append-only, and after the first sum each scrape reads only the billing entries after the
last settled one (see sql/functions/billing_totals.sql); they are absent until the slow task
has summed the ledger once. While the database cannot be reached (or a read fails) the
endpoint keeps answering with ``tokentrack_up 0`` and the exporter's own figures only.
SIGTERM or SIGINT stops it cleanly: the HTTP server stops accepting, the connections close,
exit status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import asyncpg

from tokentrack_client import connection
from tokentrack_client.connection import DATABASE_ERRORS, CommandError, describe_target
from tokentrack_client.ops import monitor

METRICS_VERSION: Final = "20261213000000"
"""The version that adds metrics(), billing_totals() and health()'s refusal counters."""

SCRAPE_SQL: Final = (
    "SELECT now() AS taken_at, tokentrack.health($1)::text AS health,"
    " tokentrack.metrics($1, $2, $3)::text AS metrics,"
    " CASE WHEN $6 THEN tokentrack.billing_totals($4, $5)::text END AS billing"
)
RECONCILE_SQL: Final = "SELECT tokentrack.reconcile(NULL)::text"
ADVANCE_SQL: Final = "SELECT tokentrack.advance_reconcile_point()::text"
RECENT_SQL: Final = "SELECT tokentrack.reconcile_recent(NULL)::text"
CHOOSE_SQL: Final = (
    "SELECT CASE"
    " WHEN f.advance IS NOT NULL AND has_function_privilege(f.advance, 'EXECUTE')"
    "  AND NOT pg_is_in_recovery() THEN 'advance'"
    " WHEN f.recent IS NOT NULL AND has_function_privilege(f.recent, 'EXECUTE') THEN 'recent'"
    " ELSE 'full' END"
    " FROM (SELECT to_regprocedure('tokentrack.advance_reconcile_point()') AS advance,"
    " to_regprocedure('tokentrack.reconcile_recent(uuid)') AS recent) AS f"
)
"""Which check the slow task runs: advance the point when it may (the function exists, this
login may execute it, the server is a primary), else check against the point without
advancing it (a monitoring role granted reconcile_recent only), else the full reconcile()."""
BILLING_START_SQL: Final = "SELECT tokentrack.billing_totals(0, 0)::text"

NO_RECONCILE: Final = {"ok": True, "periods_checked": 0, "discrepancies": []}
"""What monitor.read_answers is given for reconcile (the exporter serves its own verdict)."""

BILLING_KEYS: Final = (
    "reports_billed",
    "reservations_expired",
    "late_steps",
    "tokens",
    "late_tokens",
    "cost_micros",
)


class ExporterError(CommandError):
    """The exporter cannot start (prometheus_client missing, the address is in use)."""


@dataclass(frozen=True)
class Settings:
    """The exporter's options (the CLI's flags)."""

    dsn: str
    host: str = "127.0.0.1"
    port: int = 9187
    min_interval: float = 10.0
    query_timeout: float = 5.0
    hours: int = 1
    top_accounts: int = 10
    top_subjects: int = 5
    reconcile_interval: float = 600.0
    reconcile_timeout: float = 60.0
    reconcile_full: bool = False


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; PORT 0 picks a free port); ValueError otherwise."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"expected HOST:PORT with a numeric port, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be between 0 and 65535, got {port}")
    return host, port


# --------------------------------------------------------------------------------------------
# What one read gives
# --------------------------------------------------------------------------------------------


@dataclass
class BillingCounters:
    """Monotonic billing counters from the usage ledger (sql/functions/billing_totals.sql).

    ``settled`` sums every billing entry up to ``settled_through``; each read adds the
    entries after it (``tentative``) and settles an earlier read's last entry once every
    transaction that was running at that read has ended (its snapshot's xmax is at or below
    the new snapshot's xmin), as an entry with a lower id may commit after one with a higher."""

    settled_through: int
    settled: dict[str, int]
    tentative: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BILLING_KEYS, 0))
    candidate: tuple[int, int] | None = None
    """(last entry, snapshot xmax) of a read, to settle through once xmin has passed xmax."""

    @classmethod
    def start(cls, answer: dict[str, Any]) -> BillingCounters:
        """From ``billing_totals(0, 0)``: everything so far is tentative until settled."""
        counters = cls(settled_through=0, settled=dict.fromkeys(BILLING_KEYS, 0))
        counters.update(answer, (0, 0))
        return counters

    def arguments(self) -> tuple[int, int]:
        """``(p_after_entry, p_settle_through)`` of the next read."""
        return self.settled_through, self.candidate[0] if self.candidate else 0

    def update(self, answer: dict[str, Any], arguments: tuple[int, int]) -> None:
        """Take one billing_totals() answer read with :meth:`arguments` (the arguments of that
        read: an answer read with other ones is ignored, never half-applied)."""
        if arguments != self.arguments():
            return
        everything = {k: int(answer["all"][k]) for k in BILLING_KEYS}
        xmin, xmax = int(answer["snapshot_xmin"]), int(answer["snapshot_xmax"])
        if self.candidate is not None and xmin >= self.candidate[1]:
            settled = {k: int(answer["settled"][k]) for k in BILLING_KEYS}
            for k in BILLING_KEYS:
                self.settled[k] += settled[k]
            self.settled_through = self.candidate[0]
            self.tentative = {k: everything[k] - settled[k] for k in BILLING_KEYS}
            self.candidate = None
        else:
            self.tentative = everything
        last = int(answer["last_entry"])
        if self.candidate is None and last > self.settled_through:
            self.candidate = (last, xmax)

    def totals(self) -> dict[str, int]:
        """The counters' values now: settled + tentative."""
        return {k: self.settled[k] + self.tentative[k] for k in BILLING_KEYS}


@dataclass(frozen=True)
class Figures:
    """One successful read (health, metrics, and the billing totals when started)."""

    taken_at: datetime
    figures: monitor.MonitorResult
    health: dict[str, Any]
    metrics: dict[str, Any]
    billing: dict[str, int] | None


@dataclass(frozen=True)
class ReconcileVerdict:
    """The slow task's last reconcile() run."""

    ok: bool
    periods_checked: int
    discrepancies: int
    finished_at: float
    duration: float
    incremental: bool = False
    """advance_reconcile_point() (or reconcile_recent() on a read-only database) rather than
    reconcile()."""
    through_entry: int | None = None
    """The verified point after the run (incremental only)."""
    entries_checked: int | None = None
    """Ledger rows after the point that the run checked (incremental only)."""


@dataclass
class State:
    """What the collector serves: the last read, or why there is none."""

    up: bool = False
    figures: Figures | None = None
    read_at: float = 0.0
    read_duration: float = 0.0
    error: str | None = None
    errors: dict[str, int] = field(default_factory=lambda: {"scrape": 0, "reconcile": 0})
    reads: int = 0
    reconcile: ReconcileVerdict | None = None
    reconcile_up: bool = False


# --------------------------------------------------------------------------------------------
# The exporter: the database side (asyncio) and the collector (the HTTP server's threads)
# --------------------------------------------------------------------------------------------


class Exporter:
    """Reads the figures on its asyncio loop; :meth:`current` serves them to the collector."""

    def __init__(self, settings: Settings, log: Callable[[str], None]) -> None:
        self.settings = settings
        self.log = log
        self.state = State()
        self.billing: BillingCounters | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: asyncpg.Connection | None = None
        self._slow_conn: asyncpg.Connection | None = None
        self._refresh_lock = threading.Lock()
        self._last_error: str | None = None

    # -- the collector's side (HTTP server threads) -----------------------------------------
    def current(self) -> State:
        """The state to serve: read again first when the last read is older than
        ``--min-interval`` (one read at a time; concurrent scrapes wait for it and share it)."""
        with self._refresh_lock:
            if time.monotonic() - self.state.read_at >= self.settings.min_interval:
                loop = self._loop
                if loop is not None and not loop.is_closed():
                    wait = self.settings.query_timeout + connection.connect_timeout() + 2.0
                    try:
                        future = asyncio.run_coroutine_threadsafe(self.refresh(), loop)
                    except RuntimeError:  # the loop is stopping: serve what there is
                        return self.state
                    try:
                        future.result(timeout=wait)
                    except Exception as exc:  # a scrape never fails on it
                        future.cancel()
                        self._failed("scrape", f"no answer within {wait:g} s ({exc!r})")
            return self.state

    # -- the database side (the asyncio loop) -----------------------------------------------
    def bind(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """The loop :meth:`current` runs reads on (None: stopping, serve what there is)."""
        self._loop = loop

    async def refresh(self) -> None:
        """One read of every figure (the scrape's), into :attr:`state`."""
        started = time.monotonic()
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await connection.connect(self.settings.dsn, "tokentrack exporter")
            figures = await self._read(self._conn)
        except (*DATABASE_ERRORS, CommandError, KeyError, TypeError, ValueError) as exc:
            await self._drop("_conn")
            self._failed("scrape", _line(exc))
            self.state.read_at = time.monotonic()
            return
        self.state.up = True
        self.state.figures = figures
        self.state.error = None
        self.state.reads += 1
        self.state.read_duration = time.monotonic() - started
        self.state.read_at = time.monotonic()
        if self._last_error is not None:
            self.log("tokentrack exporter: database reachable again")
            self._last_error = None

    async def _read(self, conn: asyncpg.Connection) -> Figures:
        s = self.settings
        # The counters and their arguments as they are now: the slow task may start them
        # while this read waits, and an answer belongs to the arguments it was read with.
        billing = self.billing
        arguments = billing.arguments() if billing is not None else (0, 0)
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await conn.execute(f"SET LOCAL statement_timeout = {int(s.query_timeout * 1000)}")
            row = await conn.fetchrow(
                SCRAPE_SQL,
                s.hours,
                s.top_accounts,
                s.top_subjects,
                *arguments,
                billing is not None,
            )
        assert row is not None  # one row, always
        health = json.loads(row["health"])
        metrics = json.loads(row["metrics"])
        totals = None
        if billing is not None and row["billing"] is not None:
            billing.update(json.loads(row["billing"]), arguments)
            totals = billing.totals()
        result = monitor.read_answers(
            row["taken_at"], health, NO_RECONCILE, monitor.Thresholds(hours=s.hours)
        )
        return Figures(row["taken_at"], result, health, metrics, totals)

    async def slow_task(self, stop: asyncio.Event) -> None:
        """The billing counters' start, then reconcile() every ``--reconcile-interval``."""
        s = self.settings
        while not stop.is_set():
            try:
                if self._slow_conn is None or self._slow_conn.is_closed():
                    self._slow_conn = await connection.connect(s.dsn, "tokentrack exporter (slow)")
                conn = self._slow_conn
                if self.billing is None:
                    async with conn.transaction(isolation="repeatable_read", readonly=True):
                        await conn.execute(
                            f"SET LOCAL statement_timeout = {int(s.reconcile_timeout * 1000)}"
                        )
                        raw = await conn.fetchval(BILLING_START_SQL)
                    self.billing = BillingCounters.start(json.loads(raw))
                if s.reconcile_interval > 0:
                    started = time.monotonic()
                    answer, incremental = await self._reconcile(conn)
                    self.state.reconcile = ReconcileVerdict(
                        ok=bool(answer["ok"]),
                        periods_checked=int(answer["periods_checked"]),
                        discrepancies=len(answer["discrepancies"]),
                        finished_at=time.time(),
                        duration=time.monotonic() - started,
                        incremental=incremental,
                        through_entry=int(answer["through_entry"]) if incremental else None,
                        entries_checked=int(answer["entries_checked"]) if incremental else None,
                    )
                    self.state.reconcile_up = True
            except (*DATABASE_ERRORS, CommandError, KeyError, TypeError, ValueError) as exc:
                await self._drop("_slow_conn")
                self.state.reconcile_up = False
                self._failed("reconcile", _line(exc))
                # Not started yet: try again at the next scrape interval rather than in 10 min.
                wait = s.min_interval if self.billing is None else s.reconcile_interval
            else:
                wait = s.reconcile_interval
            if wait <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)

    async def _reconcile(self, conn: asyncpg.Connection) -> tuple[dict[str, Any], bool]:
        """One reconcile run: (its answer, whether it was the incremental check).

        advance_reconcile_point() in a read-write transaction of its own (it writes only the
        point's tables, and waits for no billing lock); reconcile_recent() without advancing
        when this login may not advance it or the database is read-only (:data:`CHOOSE_SQL`);
        reconcile() with ``--reconcile-full`` or an SQL without the incremental check."""
        s = self.settings
        timeout = f"SET LOCAL statement_timeout = {int(s.reconcile_timeout * 1000)}"
        choice = "full" if s.reconcile_full else await conn.fetchval(CHOOSE_SQL)
        if choice == "advance":
            try:
                async with conn.transaction():
                    await conn.execute(timeout)
                    return json.loads(await conn.fetchval(ADVANCE_SQL)), True
            except asyncpg.ReadOnlySQLTransactionError:  # default_transaction_read_only
                choice = "recent"
        if choice == "recent":
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                await conn.execute(timeout)
                return json.loads(await conn.fetchval(RECENT_SQL)), True
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await conn.execute(timeout)
            return json.loads(await conn.fetchval(RECONCILE_SQL)), False

    async def close(self) -> None:
        await self._drop("_conn")
        await self._drop("_slow_conn")

    async def _drop(self, name: str) -> None:
        conn: asyncpg.Connection | None = getattr(self, name)
        setattr(self, name, None)
        if conn is not None:
            await connection.close(conn)

    def _failed(self, stage: str, message: str) -> None:
        self.state.errors[stage] += 1
        if stage == "scrape":
            self.state.up = False
            self.state.figures = None
            self.state.error = message
        if message != self._last_error:  # one line per new problem, not one per scrape
            self.log(
                f"tokentrack exporter: {stage}: {describe_target(self.settings.dsn)}: {message}"
            )
            self._last_error = message


def _line(exc: BaseException) -> str:
    if isinstance(exc, CommandError):
        return exc.line
    if isinstance(exc, DATABASE_ERRORS):
        return connection.failure_line(exc)
    return (
        f"unexpected answer ({type(exc).__name__}: {exc}); is the installed SQL version "
        f"{METRICS_VERSION} or later?"
    )


# --------------------------------------------------------------------------------------------
# The metrics (prometheus_client custom collector)
# --------------------------------------------------------------------------------------------

BUDGET_LABELS: Final = ("account", "subject", "unit", "window")
REFUSAL_LABELS: Final = ("operation", "code", "budget_unit", "budget_window", "budget_scope")


def families(state: State, settings: Settings) -> Iterator[Any]:
    """The metric families of one scrape (prometheus_client ``Metric`` objects)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def gauge(name: str, doc: str, value: float | None = None, labels: Iterable[str] = ()) -> Any:
        labels = tuple(labels)
        if labels:
            return GaugeMetricFamily(name, doc, labels=labels)
        return GaugeMetricFamily(name, doc, value=value)

    yield gauge(
        "tokentrack_up",
        "1 when the last read of the database succeeded, else 0.",
        1 if state.up else 0,
    )
    errors = CounterMetricFamily(
        "tokentrack_exporter_errors",
        "Failed reads, by stage (scrape or reconcile).",
        labels=("stage",),
    )
    for stage, n in state.errors.items():
        errors.add_metric([stage], n)
    yield errors
    yield CounterMetricFamily(
        "tokentrack_exporter_reads", "Successful scrape reads of the database.", value=state.reads
    )
    yield gauge(
        "tokentrack_exporter_min_interval_seconds",
        "--min-interval: scrapes within it are served from the last read.",
        settings.min_interval,
    )
    verdict = state.reconcile
    if settings.reconcile_interval > 0:
        yield gauge(
            "tokentrack_reconcile_up",
            "1 when the last reconcile() run succeeded (within --reconcile-timeout), else 0.",
            1 if state.reconcile_up else 0,
        )
    if verdict is not None:
        yield gauge(
            "tokentrack_reconcile_ok",
            "1 when the last reconcile() was ok, else 0.",
            1 if verdict.ok else 0,
        )
        yield gauge(
            "tokentrack_reconcile_discrepancies",
            "Discrepancies found by the last reconcile().",
            verdict.discrepancies,
        )
        yield gauge(
            "tokentrack_reconcile_periods_checked",
            "Usage periods checked by the last reconcile().",
            verdict.periods_checked,
        )
        yield gauge(
            "tokentrack_reconcile_last_run_timestamp_seconds",
            "When the last successful reconcile() finished (Unix time).",
            verdict.finished_at,
        )
        yield gauge(
            "tokentrack_reconcile_duration_seconds",
            "How long the last reconcile() took.",
            verdict.duration,
        )
        yield gauge(
            "tokentrack_reconcile_incremental",
            "1 when the last run was the incremental check (advance_reconcile_point()), 0 for "
            "the full reconcile().",
            1 if verdict.incremental else 0,
        )
        if verdict.incremental:
            yield gauge(
                "tokentrack_reconcile_point_entry",
                "The verified point after the last incremental run: the ledger is checked "
                "through this entry id.",
                verdict.through_entry,
            )
            yield gauge(
                "tokentrack_reconcile_entries_checked",
                "Ledger rows after the verified point that the last incremental run checked.",
                verdict.entries_checked,
            )
    read = state.figures
    if not state.up or read is None:
        return
    yield gauge(
        "tokentrack_scrape_duration_seconds",
        "How long the last read of the database took.",
        state.read_duration,
    )
    yield gauge(
        "tokentrack_scrape_timestamp_seconds",
        "When the figures served were read (Unix time; at most --min-interval old).",
        read.taken_at.timestamp(),
    )
    yield from _health_families(read, gauge)
    yield from _refusal_families(read.health, CounterMetricFamily)
    yield from _notification_families(read.health, gauge)
    yield from _budget_families(read.metrics, gauge)
    yield from _duration_families(read.metrics, gauge)
    if read.billing is not None:
        billing = read.billing
        for key, name, doc in (
            (
                "tokens",
                "tokentrack_billed_tokens",
                "Tokens billed (reports billed, reservations expired, late steps).",
            ),
            (
                "cost_micros",
                "tokentrack_billed_cost_micros",
                "Cost billed, in micros of the installation's currency (priced steps).",
            ),
            (
                "reports_billed",
                "tokentrack_reports_billed",
                "Reports billed by finalize or finish_report.",
            ),
            (
                "reservations_expired",
                "tokentrack_reservations_expired",
                "Reservations expired and billed by the sweep.",
            ),
            (
                "late_steps",
                "tokentrack_late_steps",
                "Steps recorded after their report was billed (billed at once).",
            ),
            ("late_tokens", "tokentrack_late_step_tokens", "Tokens of the late steps."),
        ):
            yield CounterMetricFamily(name, doc, value=billing[key])


def _health_families(read: Figures, gauge: Callable[..., Any]) -> Iterator[Any]:
    r = read.figures
    a = r.active
    yield gauge("tokentrack_reservations_active", "Active reservations.", a["count"])
    stale = gauge(
        "tokentrack_reservations_active_stale",
        "Active reservations older than the given age.",
        labels=("older_than",),
    )
    stale.add_metric(["2h"], a["older_than_2h"])
    stale.add_metric(["3h"], a["older_than_3h"])
    yield stale
    yield gauge(
        "tokentrack_reservations_active_past_expiry",
        "Active reservations past expires_at: the sweep's backlog (it has not run since).",
        a["past_expiry"],
    )
    yield gauge(
        "tokentrack_reservation_oldest_active_age_seconds",
        "Age of the oldest active reservation (0 when none).",
        a["oldest_age_seconds"],
    )
    by_status = gauge(
        "tokentrack_reservations",
        "Reservations by status: every active one, the completed and expired ones of the "
        "window's reports.",
        labels=("status",),
    )
    for status, row in r.reservations.items():
        by_status.add_metric([status], row["count"])
    yield by_status
    reports = gauge(
        "tokentrack_reports",
        "Reports created in the window (--hours), by status.",
        labels=("status",),
    )
    for status, n in r.reports_window.items():
        reports.add_metric([status], n)
    yield reports
    yield gauge(
        "tokentrack_reports_finished",
        "Reports of the window with an outcome (complete, failed or cancelled).",
        sum(r.reports_window[s] for s in monitor.OUTCOMES),
    )
    yield gauge(
        "tokentrack_reports_complete_without_steps",
        "Completed reports of the window with a reservation but no recorded step.",
        r.reports_without_steps,
    )
    yield gauge(
        "tokentrack_report_failure_ratio",
        "Failed / reports with an outcome in the window (NaN when none).",
        _nan(r.failure_rate),
    )
    yield gauge(
        "tokentrack_report_completion_ratio",
        "Complete / reports with an outcome in the window (NaN when none).",
        _nan(r.completion_rate),
    )
    yield gauge(
        "tokentrack_window_seconds",
        "The window of the windowed figures (--hours).",
        r.thresholds.hours * 3600,
    )
    if r.steps is not None:
        yield gauge(
            "tokentrack_steps_window", "Steps recorded for the window's reports.", r.steps["count"]
        )
        yield gauge(
            "tokentrack_step_tokens_window",
            "Total tokens of the steps of the window's reports.",
            r.steps["tokens"],
        )
        yield gauge(
            "tokentrack_cost_micros_window",
            "Cost of the priced steps of the window's reports (micros).",
            r.steps["cost_micros"],
        )
        yield gauge(
            "tokentrack_unpriced_steps_window",
            "Steps of the window's reports without a cost.",
            r.steps["unpriced"]["count"],
        )
    if r.model_prices is not None:
        yield gauge(
            "tokentrack_model_prices",
            "Prices in tokentrack.model_prices (0: costs are not in use).",
            r.model_prices,
        )
    if r.budgets is not None:
        b = r.budgets
        yield gauge("tokentrack_budgets", "Budgets (every account).", b["count"])
        yield gauge(
            "tokentrack_budgets_exhausted",
            "Budget windows with used + held >= limit (refusing every reservation that needs "
            "them).",
            b["exhausted"],
        )
        yield gauge(
            "tokentrack_budgets_over_limit",
            "Budget windows billed past their limit.",
            b["over_limit"],
        )


def _refusal_families(health: dict[str, Any], counter: Any) -> Iterator[Any]:
    refusals = health.get("refusals")
    if refusals is None:
        return
    family = counter(
        "tokentrack_refusals",
        "Refusals since the install, by operation and code; insufficient_budget by the "
        "refusing budget's "
        "unit, window and scope (account or subject). 68 series, fixed.",
        labels=REFUSAL_LABELS,
    )
    for c in refusals["counters"]:
        family.add_metric(
            [c["operation"], c["code"], c["unit"] or "", c["window"] or "", c["scope"] or ""],
            int(c["count"]),
        )
    yield family


def _notification_families(health: dict[str, Any], gauge: Callable[..., Any]) -> Iterator[Any]:
    """From health()'s "notifications" (version 20261212000000); absent without it."""
    notifications = health.get("notifications")
    if notifications is None:
        return
    yield gauge(
        "tokentrack_notifications_pending",
        "Notifications not acknowledged and not claimed.",
        float(notifications["pending"]),
    )
    yield gauge(
        "tokentrack_notifications_claimed",
        "Notifications claimed under a lease, not acknowledged.",
        float(notifications["claimed"]),
    )
    age = notifications.get("oldest_pending_age_seconds")
    yield gauge(
        "tokentrack_notifications_oldest_pending_age_seconds",
        "Age of the oldest pending notification (0 when none).",
        float(age or 0),
    )


def _budget_families(metrics: dict[str, Any], gauge: Callable[..., Any]) -> Iterator[Any]:
    doc = (
        "in the budget's current window, in its unit: the --top-accounts accounts nearest their "
        'limits by name (subject="" for account-wide budgets, their subjects beyond --top-subjects '
        'summed under subject="other"), every other account summed under account="other".'
    )
    specs = (
        ("tokentrack_budget_used", "Used (billed)", "used"),
        ("tokentrack_budget_held", "Held by active reservations", "held"),
        ("tokentrack_budget_limit", "Limit", "limit"),
        ("tokentrack_budget_windows", "Budget windows summed in the series", "budgets"),
        (
            "tokentrack_budget_windows_exhausted",
            "Exhausted windows (used + held >= limit) among them",
            "exhausted",
        ),
    )
    for name, what, key in specs:
        family = gauge(name, f"{what} {doc}", labels=BUDGET_LABELS)
        for g in metrics["budgets"]:
            family.add_metric([g["account"], g["subject"], g["unit"], g["window"]], float(g[key]))
        yield family
    yield gauge(
        "tokentrack_budget_accounts",
        "Accounts with at least one budget.",
        float(metrics["budget_accounts"]),
    )


def _duration_families(metrics: dict[str, Any], gauge: Callable[..., Any]) -> Iterator[Any]:
    d = metrics["report_durations"]
    yield gauge(
        "tokentrack_report_duration_seconds_avg",
        "Average time from reservation to billing of the window's completed reservations "
        "(NaN when none).",
        _nan(d["avg_seconds"]),
    )
    yield gauge(
        "tokentrack_report_duration_seconds_max",
        "Longest time from reservation to billing of the window's completed reservations "
        "(NaN when none).",
        _nan(d["max_seconds"]),
    )
    yield gauge(
        "tokentrack_reports_completed_timed",
        "Completed reservations of the window the durations are over.",
        float(d["count"]),
    )


def _nan(value: Any) -> float:
    return math.nan if value is None else float(value)


class Collector:
    """The prometheus_client custom collector: each ``collect()`` is one scrape."""

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterator[Any]:
        yield from families(self.exporter.current(), self.exporter.settings)


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(settings: Settings, log: Callable[[str], None] = _stderr) -> int:
    """Serve ``/metrics`` until SIGTERM or SIGINT; return the exit status (0)."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError as exc:
        raise ExporterError(
            "tokentrack exporter needs prometheus_client: pip install 'tokentrack[exporter]'"
        ) from exc
    exporter = Exporter(settings, log)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(exporter))
    try:
        server, thread = start_http_server(settings.port, addr=settings.host, registry=registry)
    except OSError as exc:
        raise ExporterError(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
        ) from exc
    host, port = str(server.server_address[0]), int(server.server_address[1])
    where = f"[{host}]" if ":" in host else host
    log(
        f"tokentrack exporter: serving http://{where}:{port}/metrics for "
        f"{describe_target(settings.dsn)} (reads at most every {settings.min_interval:g} s)"
    )
    try:
        return asyncio.run(_serve(exporter, log))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


async def _serve(exporter: Exporter, log: Callable[[str], None]) -> int:
    loop = asyncio.get_running_loop()
    exporter.bind(loop)
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    slow = asyncio.create_task(exporter.slow_task(stop))
    try:
        await stop.wait()
    finally:
        exporter.bind(None)
        slow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await slow
        await exporter.close()
    log(f"tokentrack exporter: stopped ({', '.join(received) or 'done'})")
    return 0
