"""``tokentrack monitor``: the post-deploy monitoring figures and their alert thresholds.

The figures are SQL: ``tokentrack.health(p_hours)`` (sql/functions/health.sql) returns them
all in one read-only call, so an exporter or a dashboard reads the same numbers; this module
reads it together with ``tokentrack.reconcile()`` in one snapshot, compares the figures with
the thresholds and prints them (text, ``--json``, ``--prometheus``).

What it measures (``--hours`` is the window, 24 by default):

* active reservations, and how many are older than 2 hours (warning) and 3 hours (alert
  when more than ``--stale-alert-count``, 10 by default): an active reservation older than its
  2-hour lifetime means the expiry sweep is not running;
* completed reports of the window that have a reservation but no recorded step (alert when
  any): the generator is not recording its steps;
* usage accuracy (alert when not ok): by default ``tokentrack.reconcile_recent()``, the
  incremental check of what changed since the verified point (sql/functions/reconcile_recent.sql:
  the active periods, the ledger rows after the point, their steps and budget windows), whose
  cost follows the changes, not the history; ``--full`` runs ``tokentrack.reconcile()``, the
  audit of every period, instead. The monitor only reads the point (its snapshot is read-only):
  ``tokentrack exporter`` (or a scheduled ``SELECT tokentrack.advance_reconcile_point()``)
  advances it. Before version :data:`RECENT_VERSION` the monitor runs ``reconcile()``;
* reservations by status with the oldest and newest (every active one; the completed and
  expired ones of the reports of the window);
* reports per hour by status, with the failure rate (alert above 5%) and completion rate
  (alert below 90%) of the window's reports that have an outcome, once at least
  ``--min-reports`` (20) have one;
* the steps of the window's reports: how many, their tokens and cost, and the unpriced ones
  (count, tokens, the models with the most unpriced tokens). A warning when prices are set
  (``model_prices`` is not empty) and steps of a model have no price: their cost is missing
  from every report and cost budget. With no price at all, costs are not in use and unpriced
  steps are expected: the figures are shown, nothing fires;
* budgets (since version 20261210000000): how many, how many windows are exhausted (used +
  held >= limit: the window refuses every reservation that needs it) and over their limit
  (used > limit: billed past it, as billing may), and usage against limit (used, held,
  limit, percent) of the budget windows nearest their limits (health() lists the 10
  nearest). A warning when any window is exhausted, and one when any is over its limit:
  those budgets refuse reservations now. How many reservations were refused is counted
  since version 20261213000000 (health()'s "refusals", served by ``tokentrack exporter``).

health() reads every figure by index (the partial index of active reservations, the unique
(report_id) and (report_id, step_name) indexes, and ``reports_created_at_idx``), so its cost
follows the window's traffic and the number of active reservations, not the size of the
tables; so does reconcile_recent() (the changes since the point and one probe per active
period). ``reconcile()`` (``--full``) is the exception, and the reason it stays outside
health(): it audits every period, as it must.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg

from tokentrack_client.ops._common import (
    OpsError,
    connected,
    fetchrow,
    iso,
    render_table,
    require_installed,
)

REPORT_STATUSES: Final = ("pending", "processing", "complete", "failed", "cancelled")
RESERVATION_STATUSES: Final = ("active", "completed", "expired")
OUTCOMES: Final = ("complete", "failed", "cancelled")

HEALTH_VERSION: Final = "20261201000000"
"""The version that adds tokentrack.health()."""

COST_VERSION: Final = "20261203000000"
"""The version whose health() adds the "steps" and "model_prices" figures (token classes and
cost); with an older health() (that version rolled back) they are ``None`` and not alerted."""

RECENT_VERSION: Final = "20261214000000"
"""The version that adds tokentrack.reconcile_recent(), the incremental check the monitor runs
by default; with an older SQL the monitor runs reconcile()."""

BUDGETS_VERSION: Final = "20261210000000"
"""The version whose health() adds the "budgets" figures; with an older health() they are
``None`` and the budget warnings cannot fire."""

FAILURE_RATE_MAX: Final = 0.05
COMPLETION_RATE_MIN: Final = 0.90


@dataclass(frozen=True)
class Thresholds:
    """Alert thresholds (the original checklist's values by default)."""

    hours: int = 24
    full: bool = False
    """``--full``: usage accuracy by reconcile() (the audit of everything) rather than the
    incremental reconcile_recent()."""
    stale_alert_count: int = 10
    failure_rate_max: float = FAILURE_RATE_MAX
    completion_rate_min: float = COMPLETION_RATE_MIN
    min_reports: int = 20


@dataclass(frozen=True)
class Alert:
    """One alert rule and whether it fires; ``level`` is ``alert`` or ``warning``."""

    name: str
    level: str
    firing: bool
    message: str


@dataclass
class MonitorResult:
    """Everything one monitor run measured."""

    taken_at: datetime
    thresholds: Thresholds
    active: dict[str, Any]
    reservations: dict[str, dict[str, Any]]
    reports_without_steps: int
    reports_without_steps_examples: list[str]
    reconcile: dict[str, Any]
    reports_by_hour: list[dict[str, Any]]
    reports_window: dict[str, int]
    failure_rate: float | None
    completion_rate: float | None
    steps: dict[str, Any] | None = None
    """health()'s "steps": ``count``, ``tokens``, ``cost_micros`` and ``unpriced``
    (``{count, tokens, models: [{model, steps, tokens}]}``); None before version
    :data:`COST_VERSION`."""
    model_prices: int | None = None
    """How many rows ``tokentrack.model_prices`` holds (0: costs not in use); None before
    version :data:`COST_VERSION`."""
    budgets: dict[str, Any] | None = None
    """health()'s "budgets": ``count``, ``exhausted``, ``over_limit`` and ``nearest`` (the
    budget windows nearest their limits, each with ``used``, ``held``, ``limit`` and the
    monitor's ``percent``, ``exhausted`` and ``over_limit``); None before version
    :data:`BUDGETS_VERSION`."""
    reconcile_mode: dict[str, Any] = field(default_factory=lambda: {"mode": "full"})
    """How usage accuracy was checked: ``mode`` ``incremental`` (reconcile_recent(), with
    ``through_entry``, ``advanced_at`` and ``entries_checked``: the verified point and the
    ledger rows after it) or ``full`` (reconcile())."""
    alerts: list[Alert] = field(default_factory=list)

    @property
    def firing(self) -> list[Alert]:
        """The alerts (not warnings) that fire: each makes the exit status 1."""
        return [a for a in self.alerts if a.firing and a.level == "alert"]

    # ---------------------------------------------------------------------------------------
    def as_json(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {
            "taken_at": iso(self.taken_at),
            "thresholds": asdict(self.thresholds),
            "active_reservations": self.active,
            "reservations_by_status": self.reservations,
            "reports_without_steps": {
                "count": self.reports_without_steps,
                "examples": self.reports_without_steps_examples,
            },
            "reconcile": self.reconcile,
            "reconcile_mode": self.reconcile_mode,
            "reports_by_hour": self.reports_by_hour,
            "reports_window": self.reports_window,
            "failure_rate": self.failure_rate,
            "completion_rate": self.completion_rate,
            "steps": self.steps,
            "model_prices": self.model_prices,
            "budgets": self.budgets,
            "alerts": [asdict(a) for a in self.alerts],
            "ok": not self.firing,
        }

    def render_json(self) -> str:
        """``--json``."""
        return json.dumps(self.as_json(), indent=2, sort_keys=False, default=str)

    def render(self) -> str:
        """The human report."""
        t = self.thresholds
        a = self.active
        out = [f"tokentrack monitor at {iso(self.taken_at)} (window: last {t.hours} hours)", ""]
        out.append("Active reservations")
        out.append(
            render_table(
                ("ACTIVE", "OLDER THAN 2H", "OLDER THAN 3H", "PAST EXPIRY", "OLDEST", "NEWEST"),
                [
                    (
                        a["count"],
                        a["older_than_2h"],
                        a["older_than_3h"],
                        a["past_expiry"],
                        a["oldest"],
                        a["newest"],
                    )
                ],
            )
        )
        out += ["", "Reservations by status (every active one; others of the window's reports)"]
        out.append(
            render_table(
                ("STATUS", "COUNT", "OLDEST", "NEWEST"),
                [(s, r["count"], r["oldest"], r["newest"]) for s, r in self.reservations.items()],
            )
        )
        out += ["", f"Completed reports without step usage: {self.reports_without_steps}"]
        for example in self.reports_without_steps_examples:
            out.append(f"  report {example}")
        rec = self.reconcile
        out += [
            "",
            f"Usage accuracy (reconcile): {'ok' if rec['ok'] else 'NOT OK'}, "
            f"{rec['periods_checked']} periods checked, {len(rec['discrepancies'])} discrepancies",
            _render_mode(self.reconcile_mode),
        ]
        for d in rec["discrepancies"][:10]:
            out.append(
                f"  period {d.get('period_id')} ({d.get('check')}): expected {d.get('expected')},"
                f" actual {d.get('actual')}"
            )
        out += ["", "Reports per hour by status"]
        rows = [
            (h["hour"], *(h[s] for s in REPORT_STATUSES), sum(h[s] for s in REPORT_STATUSES))
            for h in self.reports_by_hour
        ]
        totals = self.reports_window
        rows.append(("total", *(totals[s] for s in REPORT_STATUSES), sum(totals.values())))
        out.append(render_table(("HOUR", *(s.upper() for s in REPORT_STATUSES), "TOTAL"), rows))
        out.append(
            f"failure rate {_pct(self.failure_rate)} (alert above {_pct(t.failure_rate_max)}), "
            f"completion rate {_pct(self.completion_rate)} "
            f"(alert below {_pct(t.completion_rate_min)})"
        )
        out += ["", *self._render_steps()]
        out += ["", *self._render_budgets()]
        out += ["", "Alerts"]
        out.append(
            render_table(
                ("ALERT", "LEVEL", "STATE", "DETAIL"),
                [
                    (al.name, al.level, "FIRING" if al.firing else "ok", al.message)
                    for al in self.alerts
                ],
            )
        )
        out.append(
            "monitor: "
            + (f"{len(self.firing)} alert(s) firing" if self.firing else "no alert firing")
        )
        return "\n".join(out)

    def _render_steps(self) -> list[str]:
        """The steps of the window's reports, their cost and the unpriced ones."""
        steps = self.steps
        if steps is None:
            return [
                "Steps and cost: not measured (tokentrack.health() is older than version "
                f"{COST_VERSION})"
            ]
        unpriced = steps["unpriced"]
        out = [
            "Steps of the window's reports",
            render_table(
                ("STEPS", "TOKENS", "COST MICROS", "UNPRICED STEPS", "UNPRICED TOKENS"),
                [
                    (
                        steps["count"],
                        steps["tokens"],
                        steps["cost_micros"],
                        unpriced["count"],
                        unpriced["tokens"],
                    )
                ],
            ),
        ]
        if unpriced["models"]:
            out += ["Unpriced steps by model (most tokens first)"]
            out.append(
                render_table(
                    ("MODEL", "STEPS", "TOKENS"),
                    [
                        (_model_name(m["model"]), m["steps"], m["tokens"])
                        for m in unpriced["models"]
                    ],
                )
            )
        out.append(
            f"model_prices: {self.model_prices} price(s)"
            if self.model_prices
            else "model_prices: no price set (costs are not in use; every step is unpriced)"
        )
        return out

    def _render_budgets(self) -> list[str]:
        """Usage against limit of the budget windows nearest their limits."""
        budgets = self.budgets
        if budgets is None:
            return [
                "Budgets: not measured (tokentrack.health() is older than version "
                f"{BUDGETS_VERSION})"
            ]
        out = [
            f"Budgets: {budgets['count']}, {budgets['exhausted']} window(s) exhausted "
            f"(refusing every reservation that needs them), {budgets['over_limit']} over "
            "their limit"
        ]
        nearest = budgets["nearest"]
        if not nearest:
            return out
        out.append(
            f"Budget windows nearest their limits (used + held against limit; the {len(nearest)}"
            " nearest)"
        )
        out.append(
            render_table(
                (
                    "ACCOUNT",
                    "SUBJECT",
                    "UNIT",
                    "WINDOW",
                    "WINDOW START",
                    "USED",
                    "HELD",
                    "LIMIT",
                    "PERCENT",
                    "STATE",
                ),
                [
                    (
                        b["account_id"],
                        _subject_name(b["subject"]),
                        b["unit"],
                        b["window"],
                        b["window_start"],
                        b["used"],
                        b["held"],
                        b["limit"],
                        "n/a" if b["percent"] is None else f"{b['percent']:.1f}%",
                        _budget_state(b),
                    )
                    for b in nearest
                ],
            )
        )
        return out

    def render_prometheus(self) -> str:
        """``--prometheus``: the Prometheus text exposition format (version 0.0.4)."""
        metrics: list[tuple[str, str, list[tuple[dict[str, str], float]]]] = []

        def gauge(name: str, help_text: str, *samples: tuple[dict[str, str], float]) -> None:
            metrics.append((name, help_text, list(samples)))

        a = self.active
        gauge("tokentrack_reservations_active", "Active reservations.", ({}, a["count"]))
        gauge(
            "tokentrack_reservations_active_stale",
            "Active reservations older than the given age.",
            ({"older_than": "2h"}, a["older_than_2h"]),
            ({"older_than": "3h"}, a["older_than_3h"]),
        )
        gauge(
            "tokentrack_reservations_active_past_expiry",
            "Active reservations past expires_at (the sweep has not run since).",
            ({}, a["past_expiry"]),
        )
        gauge(
            "tokentrack_reservation_oldest_active_age_seconds",
            "Age of the oldest active reservation (0 when none).",
            ({}, a["oldest_age_seconds"]),
        )
        gauge(
            "tokentrack_reservations",
            "Reservations by status: every active one, the others of the window's reports.",
            *(({"status": s}, float(r["count"])) for s, r in self.reservations.items()),
        )
        gauge(
            "tokentrack_reports",
            "Reports created in the window, by status.",
            *(({"status": s}, float(n)) for s, n in self.reports_window.items()),
        )
        gauge(
            "tokentrack_reports_complete_without_steps",
            "Completed reports of the window with a reservation but no recorded step.",
            ({}, self.reports_without_steps),
        )
        gauge(
            "tokentrack_report_failure_ratio",
            "Failed / reports with an outcome, in the window (NaN when none).",
            ({}, _nan(self.failure_rate)),
        )
        gauge(
            "tokentrack_report_completion_ratio",
            "Complete / reports with an outcome, in the window (NaN when none).",
            ({}, _nan(self.completion_rate)),
        )
        rec = self.reconcile
        gauge(
            "tokentrack_reconcile_ok", "1 when reconcile() is ok.", ({}, 1.0 if rec["ok"] else 0.0)
        )
        gauge(
            "tokentrack_reconcile_discrepancies",
            "Discrepancies found by reconcile().",
            ({}, float(len(rec["discrepancies"]))),
        )
        gauge(
            "tokentrack_reconcile_periods_checked",
            "Usage periods checked by reconcile().",
            ({}, float(rec["periods_checked"])),
        )
        if self.steps is not None:
            steps = self.steps
            unpriced = steps["unpriced"]
            gauge(
                "tokentrack_steps_window",
                "Steps recorded for the window's reports.",
                ({}, float(steps["count"])),
            )
            gauge(
                "tokentrack_step_tokens_window",
                "Total tokens of the steps of the window's reports.",
                ({}, float(steps["tokens"])),
            )
            gauge(
                "tokentrack_cost_micros_window",
                "Cost of the priced steps of the window's reports, in micros of the "
                "installation's currency.",
                ({}, float(steps["cost_micros"])),
            )
            gauge(
                "tokentrack_unpriced_steps_window",
                "Steps of the window's reports without a cost (no price in effect for the model).",
                ({}, float(unpriced["count"])),
            )
            gauge(
                "tokentrack_unpriced_tokens_window",
                "Total tokens of the unpriced steps of the window's reports.",
                ({}, float(unpriced["tokens"])),
            )
            gauge(
                "tokentrack_unpriced_model_tokens_window",
                "Unpriced tokens of the window by model, the 10 models with the most "
                '(model="" for steps recorded without a model).',
                *(({"model": m["model"] or ""}, float(m["tokens"])) for m in unpriced["models"]),
            )
        if self.model_prices is not None:
            gauge(
                "tokentrack_model_prices",
                "Prices in tokentrack.model_prices (0: costs are not in use).",
                ({}, float(self.model_prices)),
            )
        if self.budgets is not None:
            self._budget_gauges(gauge)
        gauge(
            "tokentrack_alert",
            "1 when the alert (or warning) fires.",
            *(
                ({"name": al.name, "level": al.level}, 1.0 if al.firing else 0.0)
                for al in self.alerts
            ),
        )
        gauge(
            "tokentrack_monitor_window_seconds",
            "The monitoring window.",
            ({}, float(self.thresholds.hours * 3600)),
        )
        lines: list[str] = []
        for name, help_text, samples in metrics:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} gauge")
            for labels, value in samples:
                label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                lines.append(
                    f"{name}{{{label_text}}} {_number(value)}"
                    if label_text
                    else f"{name} {_number(value)}"
                )
        return "\n".join(lines) + "\n"

    def _budget_gauges(self, gauge: Callable[..., None]) -> None:
        """The budget figures; one series per budget window of the nearest list only (at most
        10 from health()), so the label cardinality stays bounded."""
        budgets = self.budgets
        assert budgets is not None
        gauge("tokentrack_budgets", "Budgets (every account).", ({}, float(budgets["count"])))
        gauge(
            "tokentrack_budgets_exhausted",
            "Budget windows with used + held >= limit: each refuses every reservation that "
            "needs it.",
            ({}, float(budgets["exhausted"])),
        )
        gauge(
            "tokentrack_budgets_over_limit",
            "Budget windows with used > limit (billed past it).",
            ({}, float(budgets["over_limit"])),
        )
        nearest = budgets["nearest"]

        def labels(b: dict[str, Any]) -> dict[str, str]:
            return {
                "account": b["account_id"],
                "budget": b["budget_id"],
                "subject": b["subject"] or "",
                "unit": b["unit"],
                "window": b["window"],
            }

        per_window = (
            ("used", "Used in the current window (billed), in the budget's unit.", "used"),
            ("held", "Held by active reservations in the current window.", "held"),
            ("limit", "The budget's limit, in its unit.", "limit"),
        )
        for suffix, help_text, key in per_window:
            gauge(
                f"tokentrack_budget_{suffix}",
                f"{help_text} The budget windows nearest their limits only "
                '(subject="" for the whole account).',
                *((labels(b), float(b[key])) for b in nearest),
            )
        gauge(
            "tokentrack_budget_window_start_timestamp_seconds",
            "Start of the budget's current window (Unix time), the nearest ones only.",
            *((labels(b), datetime.fromisoformat(b["window_start"]).timestamp()) for b in nearest),
        )
        gauge(
            "tokentrack_budget_exhausted",
            "1 when the budget window is exhausted (refusing now), the nearest ones only.",
            *((labels(b), 1.0 if b["exhausted"] else 0.0) for b in nearest),
        )


def _render_mode(mode: dict[str, Any]) -> str:
    if mode["mode"] != "incremental":
        return "  full audit: reconcile() of every period"
    advanced = mode.get("advanced_at")
    return (
        f"  incremental: {mode.get('entries_checked')} ledger rows after the verified point "
        f"(entry {mode.get('through_entry')}, "
        + (f"advanced {advanced})" if advanced else "never advanced: everything is after it)")
        + "; --full audits everything"
    )


def _subject_name(subject: str | None) -> str:
    return "(account)" if subject is None else subject


def _budget_state(budget: dict[str, Any]) -> str:
    if budget["over_limit"]:
        return "OVER LIMIT"
    return "EXHAUSTED" if budget["exhausted"] else "ok"


def _model_name(model: str | None) -> str:
    return "(no model)" if model is None else model


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


# --------------------------------------------------------------------------------------------
# The figures: tokentrack.health() and tokentrack.reconcile(), in one snapshot
# --------------------------------------------------------------------------------------------

HEALTH_SQL: Final = "SELECT tokentrack.health($1)"
"""The monitoring figures of the last ``$1`` hours (sql/functions/health.sql)."""

# One statement: both STABLE functions read its snapshot, so the figures agree with each other.
MEASURE_SQL: Final = (
    "SELECT now() AS taken_at, tokentrack.health($1)::text AS health,"
    " tokentrack.reconcile_recent(NULL)::text AS reconcile"
)
RECENT_SQL: Final = (
    "SELECT coalesce(has_function_privilege(f, 'EXECUTE'), false)"
    " FROM to_regprocedure('tokentrack.reconcile_recent(uuid)') AS f"
)
"""Whether the incremental check can run: installed, and this login may execute it (a
monitoring role granted reconcile() only gets the full audit)."""
FULL_MEASURE_SQL: Final = (
    "SELECT now() AS taken_at, tokentrack.health($1)::text AS health,"
    " tokentrack.reconcile(NULL)::text AS reconcile"
)


def _when(value: Any) -> str | None:
    """A timestamp of health()'s jsonb, in UTC to the second (as asyncpg's datetimes were)."""
    if value is None:
        return None
    return iso(datetime.fromisoformat(str(value)).astimezone(UTC))


async def _require_health(conn: asyncpg.Connection) -> None:
    found = await conn.fetchval("SELECT to_regprocedure('tokentrack.health(integer)') IS NOT NULL")
    if not found:
        raise OpsError(
            "tokentrack.health(integer) not found in this database: install version "
            f"{HEALTH_VERSION} (make install-sql DATABASE_URL=... or tokentrack migrate install)"
        )


async def measure(conn: asyncpg.Connection, thresholds: Thresholds) -> MonitorResult:
    """Read health() and reconcile() (one read-only snapshot) and evaluate the alerts."""
    await require_installed(conn, table="report_reservations")
    await _require_health(conn)
    incremental = not thresholds.full and bool(await conn.fetchval(RECENT_SQL))
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        row = await fetchrow(
            conn, MEASURE_SQL if incremental else FULL_MEASURE_SQL, thresholds.hours
        )
    taken_at: datetime = row["taken_at"]
    try:
        reconcile = json.loads(row["reconcile"])
        result = read_answers(taken_at, json.loads(row["health"]), reconcile, thresholds)
        if incremental:
            result.reconcile_mode = reconcile_mode(reconcile)
            result.alerts = evaluate(result)
        return result
    except (KeyError, TypeError, ValueError) as exc:  # a health() of another tokentrack version
        raise OpsError(
            f"cannot read tokentrack.health(): unexpected answer ({type(exc).__name__}: {exc}); "
            "is the installed SQL from the same tokentrack version as this command?"
        ) from exc


def read_answers(
    taken_at: datetime, health: dict[str, Any], reconcile: dict[str, Any], thresholds: Thresholds
) -> MonitorResult:
    """The monitor's figures from the answers of health() and reconcile() (the one reader of
    health()'s answer: ``tokentrack exporter`` uses it too). KeyError, TypeError or ValueError
    when an answer is not of this tokentrack version's shape."""
    a = health["active_reservations"]
    active = {
        "count": int(a["count"]),
        "older_than_2h": int(a["older_than_2h"]),
        "older_than_3h": int(a["older_than_3h"]),
        "past_expiry": int(a["past_expiry"]),
        "oldest": _when(a["oldest"]),
        "newest": _when(a["newest"]),
        "oldest_age_seconds": round(float(a["oldest_age_seconds"]), 3),
    }
    reservations: dict[str, dict[str, Any]] = {
        status: {
            "count": int(r["count"]),
            "oldest": _when(r["oldest"]),
            "newest": _when(r["newest"]),
        }
        for status in RESERVATION_STATUSES
        for r in (health["reservations_by_status"][status],)
    }
    by_hour = [
        {"hour": _when(h["hour"]), **{s: int(h[s]) for s in REPORT_STATUSES}}
        for h in health["reports_by_hour"]
    ]
    window = {s: int(health["reports_window"][s]) for s in REPORT_STATUSES}
    without = health["reports_without_steps"]
    steps = _steps(health["steps"]) if "steps" in health else None
    model_prices = int(health["model_prices"]) if "model_prices" in health else None
    budgets = _budgets(health["budgets"]) if "budgets" in health else None

    result = MonitorResult(
        taken_at=taken_at,
        thresholds=thresholds,
        active=active,
        reservations=reservations,
        reports_without_steps=int(without["count"]),
        reports_without_steps_examples=[str(e) for e in without["examples"]],
        reconcile={
            "ok": bool(reconcile.get("ok")),
            "periods_checked": int(reconcile.get("periods_checked", 0)),
            "discrepancies": list(reconcile.get("discrepancies", [])),
        },
        reports_by_hour=by_hour,
        reports_window=window,
        failure_rate=_rate(health["failure_rate"]),
        completion_rate=_rate(health["completion_rate"]),
        steps=steps,
        model_prices=model_prices,
        budgets=budgets,
    )
    result.alerts = evaluate(result)
    return result


def reconcile_mode(answer: dict[str, Any]) -> dict[str, Any]:
    """The ``reconcile_mode`` of a reconcile_recent() answer (tokentrack exporter uses it too)."""
    return {
        "mode": "incremental",
        "through_entry": int(answer["through_entry"]),
        "advanced_at": _when(answer["advanced_at"]),
        "entries_checked": int(answer["entries_checked"]),
    }


def _steps(steps: dict[str, Any]) -> dict[str, Any]:
    """health()'s "steps", its numbers as ints (jsonb sums arrive as JSON numbers)."""
    unpriced = steps["unpriced"]
    return {
        "count": int(steps["count"]),
        "tokens": int(steps["tokens"]),
        "cost_micros": int(steps["cost_micros"]),
        "unpriced": {
            "count": int(unpriced["count"]),
            "tokens": int(unpriced["tokens"]),
            "models": [
                {
                    "model": None if m["model"] is None else str(m["model"]),
                    "steps": int(m["steps"]),
                    "tokens": int(m["tokens"]),
                }
                for m in unpriced["models"]
            ],
        },
    }


def _budgets(budgets: dict[str, Any]) -> dict[str, Any]:
    """health()'s "budgets", each nearest window with its percent and state added."""
    nearest = []
    for b in budgets["nearest"]:
        used, held, limit = int(b["used"]), int(b["held"]), int(b["limit"])
        nearest.append(
            {
                "account_id": str(b["account_id"]),
                "budget_id": str(b["budget_id"]),
                "subject": None if b["subject"] is None else str(b["subject"]),
                "unit": str(b["unit"]),
                "window": str(b["window"]),
                "window_start": _when(b["window_start"]),
                "used": used,
                "held": held,
                "limit": limit,
                # (used + held) / limit, the order of health()'s list; None for a limit of 0.
                "percent": round((used + held) * 100 / limit, 1) if limit else None,
                "exhausted": used + held >= limit,
                "over_limit": used > limit,
            }
        )
    return {
        "count": int(budgets["count"]),
        "exhausted": int(budgets["exhausted"]),
        "over_limit": int(budgets["over_limit"]),
        "nearest": nearest,
    }


def _rate(value: Any) -> float | None:
    return None if value is None else float(value)


def evaluate(result: MonitorResult) -> list[Alert]:
    """The alert rules of the checklist, applied to one measurement.

    The thresholds stay here, in Python, as comparisons of health()'s figures: health()
    returns figures, not verdicts, so that each reader (this command, an exporter's alert
    rules) sets its own thresholds.
    """
    t = result.thresholds
    a = result.active
    finished = sum(result.reports_window[s] for s in OUTCOMES)
    enough = finished >= t.min_reports
    sample = f"{finished} reports with an outcome in {t.hours}h"
    if not enough:
        sample += f", fewer than --min-reports {t.min_reports}: rates not alerted"
    checker = (
        "reconcile_recent()" if result.reconcile_mode["mode"] == "incremental" else "reconcile()"
    )
    alerts = [
        Alert(
            "stale_reservations",
            "alert",
            a["older_than_3h"] > t.stale_alert_count,
            f"{a['older_than_3h']} active reservations older than 3h "
            f"(alert above {t.stale_alert_count}); is the expiry sweep scheduled?",
        ),
        Alert(
            "reservations_older_than_2h",
            "warning",
            a["older_than_2h"] > 0,
            f"{a['older_than_2h']} active reservations older than 2h (their lifetime); "
            "run tokentrack cleanup",
        ),
        Alert(
            "reports_without_steps",
            "alert",
            result.reports_without_steps > 0,
            f"{result.reports_without_steps} completed reports in {t.hours}h have no step usage",
        ),
        Alert(
            "usage_accuracy",
            "alert",
            not result.reconcile["ok"],
            f"{checker}: {len(result.reconcile['discrepancies'])} discrepancies in "
            f"{result.reconcile['periods_checked']} periods",
        ),
        Alert(
            "failure_rate",
            "alert",
            enough and result.failure_rate is not None and result.failure_rate > t.failure_rate_max,
            f"{_pct(result.failure_rate)} failed "
            f"(alert above {_pct(t.failure_rate_max)}; {sample})",
        ),
        Alert(
            "completion_rate",
            "alert",
            enough
            and result.completion_rate is not None
            and result.completion_rate < t.completion_rate_min,
            f"{_pct(result.completion_rate)} complete (alert below "
            f"{_pct(t.completion_rate_min)}; {sample})",
        ),
        _unpriced_models(result),
        *_budget_warnings(result),
    ]
    return alerts


def _budget_warnings(result: MonitorResult) -> list[Alert]:
    """Warnings (not alerts: a budget running out is the product working) when budget windows
    are exhausted, and when some are over their limit; the messages name the nearest ones."""
    budgets = result.budgets
    if budgets is None:
        message = f"not measured: tokentrack.health() is older than version {BUDGETS_VERSION}"
        return [
            Alert("budgets_exhausted", "warning", False, message),
            Alert("budgets_over_limit", "warning", False, message),
        ]

    def named(key: str, total: int) -> str:
        listed = [b for b in budgets["nearest"] if b[key]]
        text = ", ".join(
            f"{_subject_name(b['subject'])} {b['unit']} {b['window']} of account "
            f"{b['account_id']} ({b['used']} used + {b['held']} held of {b['limit']})"
            for b in listed[:5]
        )
        more = total - min(len(listed), 5)
        return text + (f" and {more} more" if more > 0 else "")

    exhausted, over = budgets["exhausted"], budgets["over_limit"]
    return [
        Alert(
            "budgets_exhausted",
            "warning",
            exhausted > 0,
            (
                f"{exhausted} budget window(s) exhausted (used + held >= limit), refusing every "
                f"reservation that needs them: {named('exhausted', exhausted)}"
            )
            if exhausted
            else f"no budget window exhausted ({budgets['count']} budgets)",
        ),
        Alert(
            "budgets_over_limit",
            "warning",
            over > 0,
            (
                f"{over} budget window(s) billed past their limit (reports used more than they "
                f"reserved, or the limit was lowered): {named('over_limit', over)}"
            )
            if over
            else "no budget window over its limit",
        ),
    ]


def _unpriced_models(result: MonitorResult) -> Alert:
    """A warning when prices are in use and steps of a named model have none.

    Steps recorded without a model cannot be priced: they are counted, never warned about.
    With no price at all (model_prices empty), costs are not in use: informational only.
    """
    steps = result.steps
    if steps is None or result.model_prices is None:
        return Alert(
            "unpriced_models",
            "warning",
            False,
            f"not measured: tokentrack.health() is older than version {COST_VERSION}",
        )
    unpriced = steps["unpriced"]
    hours = result.thresholds.hours
    if result.model_prices == 0:
        return Alert(
            "unpriced_models",
            "warning",
            False,
            f"no price set (costs are not in use): {unpriced['count']} of {steps['count']} "
            f"steps in {hours}h unpriced, as expected",
        )
    named = [m for m in unpriced["models"] if m["model"] is not None]
    if not named:
        without_model = unpriced["count"]
        return Alert(
            "unpriced_models",
            "warning",
            False,
            f"every step of a model in {hours}h is priced"
            + (f" ({without_model} steps without a model)" if without_model else ""),
        )
    listed = ", ".join(f"{m['model']} ({m['steps']} steps, {m['tokens']} tokens)" for m in named)
    top = " (the models with the most unpriced tokens)" if len(unpriced["models"]) >= 10 else ""
    return Alert(
        "unpriced_models",
        "warning",
        True,
        f"steps of {len(named)} model(s) in {hours}h have no price{top}: {listed}; their cost "
        "is missing from reports and cost budgets. `tokentrack prices import FILE` or "
        "tokentrack.set_model_price() prices the steps to come (recorded costs are never "
        "repriced)",
    )


async def monitor(dsn: str, thresholds: Thresholds) -> MonitorResult:
    """Connect to ``dsn`` and measure."""
    async with connected(dsn, "tokentrack monitor") as conn:
        return await measure(conn, thresholds)


__all__ = [
    "BUDGETS_VERSION",
    "COST_VERSION",
    "HEALTH_SQL",
    "RECENT_VERSION",
    "Alert",
    "MonitorResult",
    "Thresholds",
    "evaluate",
    "measure",
    "monitor",
    "reconcile_mode",
]
