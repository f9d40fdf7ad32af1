"""``tokentrack monitor`` and ``tokentrack.health()``: quiet on healthy databases, alerts on
each seeded bad state.

health() is checked key by key against direct queries, for its argument check, its grant (a
role without it is refused; a monitoring role granted it sees every account) and for writing
nothing. The statements it runs stay indexed on large tables (auto_explain of its nested
statements, no sequential scan of the big tables), which is what keeps it fast; no timing is
asserted.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ops_history import call, tokentrack

ALERTS = (
    "stale_reservations",
    "reservations_older_than_2h",
    "reports_without_steps",
    "usage_accuracy",
    "failure_rate",
    "completion_rate",
    "unpriced_models",
    "budgets_exhausted",
    "budgets_over_limit",
)
WARNINGS = {
    "reservations_older_than_2h",
    "unpriced_models",
    "budgets_exhausted",
    "budgets_over_limit",
}


async def _monitor(dsn: str, *extra: str) -> tuple[int, dict[str, Any]]:
    result = await tokentrack("monitor", "--json", *extra, "--database-url", dsn)
    assert result.code in (0, 1), result
    return result.code, json.loads(result.out)


def _firing(data: dict[str, Any]) -> set[str]:
    return {a["name"] for a in data["alerts"] if a["firing"]}


async def _reserve(conn: asyncpg.Connection, account: uuid.UUID) -> uuid.UUID:
    report = uuid.uuid4()
    answer = await call(conn, "try_reserve_tokens", account, report, 100)
    assert answer["success"] is True, answer
    return report


async def _account(conn: asyncpg.Connection, limit: int = 10_000_000) -> uuid.UUID:
    account = uuid.uuid4()
    assert (await call(conn, "open_usage_period", account, limit, None))["success"] is True
    return account


async def test_monitor_is_quiet_on_a_fresh_database(db_dsn: str) -> None:
    code, data = await _monitor(db_dsn)
    assert code == 0
    assert _firing(data) == set()
    assert data["ok"] is True
    assert data["failure_rate"] is None
    assert data["reconcile"] == {"ok": True, "periods_checked": 0, "discrepancies": []}
    assert data["budgets"] == {"count": 0, "exhausted": 0, "over_limit": 0, "nearest": []}


async def test_monitor_is_quiet_on_a_healthy_history(history_dsn: str) -> None:
    code, data = await _monitor(history_dsn)
    assert code == 0, [a for a in data["alerts"] if a["firing"]]
    assert _firing(data) == set()
    conn = await asyncpg.connect(history_dsn)
    try:
        window = {
            r["status"]: r["n"]
            for r in await conn.fetch(
                "SELECT status, count(*) AS n FROM tokentrack.reports"
                " WHERE created_at >= now() - interval '24 hours' GROUP BY status"
            )
        }
        active = await conn.fetchval(
            "SELECT count(*) FROM tokentrack.report_reservations WHERE status = 'active'"
        )
        expired_in_window = await conn.fetchval(
            "SELECT count(*) FROM tokentrack.report_reservations rr"
            " JOIN tokentrack.reports r ON r.id = rr.report_id"
            " WHERE rr.status = 'expired' AND r.created_at >= now() - interval '24 hours'"
        )
    finally:
        await conn.close()
    assert {k: v for k, v in data["reports_window"].items() if v} == window
    assert window["complete"] > 200
    assert window["failed"] > 0
    assert window["cancelled"] > 0
    assert data["failure_rate"] == pytest.approx(
        window["failed"] / (window["complete"] + window["failed"] + window["cancelled"])
    )
    assert 0 < data["failure_rate"] < 0.05
    assert data["completion_rate"] > 0.9
    assert data["active_reservations"]["count"] == active > 0  # reports still running
    assert data["active_reservations"]["older_than_2h"] == 0
    assert data["reservations_by_status"]["expired"]["count"] == expired_in_window > 0
    assert data["reconcile"]["ok"] is True
    assert data["reconcile"]["periods_checked"] == 12
    assert sum(sum(h[s] for s in window) for h in data["reports_by_hour"]) == sum(window.values())
    assert len(data["reports_by_hour"]) in (24, 25)

    human = await tokentrack("monitor", "--database-url", history_dsn)
    assert human.code == 0
    assert "monitor: no alert firing" in human.out
    assert "Usage accuracy (reconcile): ok, 12 periods checked, 0 discrepancies" in human.out


async def test_prometheus_output_parses_and_matches_json(history_dsn: str) -> None:
    result = await tokentrack("monitor", "--prometheus", "--database-url", history_dsn)
    assert result.code == 0
    _, data = await _monitor(history_dsn)
    families = {f.name: f for f in text_string_to_metric_families(result.out)}
    assert all(f.type == "gauge" for f in families.values())

    def value(metric: str, /, **labels: str) -> float:
        for sample in families[metric].samples:
            if sample.labels == labels:
                return float(sample.value)
        raise AssertionError(f"{metric}{labels} not in output")

    assert value("tokentrack_reservations_active") == data["active_reservations"]["count"]
    assert value("tokentrack_reports", status="complete") == data["reports_window"]["complete"]
    assert value("tokentrack_report_failure_ratio") == pytest.approx(data["failure_rate"])
    assert value("tokentrack_reconcile_ok") == 1
    assert value("tokentrack_reconcile_periods_checked") == 12
    for name in ALERTS:
        level = "warning" if name in WARNINGS else "alert"
        assert value("tokentrack_alert", name=name, level=level) == 0

    fresh = await tokentrack(
        "monitor", "--prometheus", "--database-url", history_dsn, "--hours", "1"
    )
    assert fresh.code == 0
    parsed = {f.name: f for f in text_string_to_metric_families(fresh.out)}
    assert parsed["tokentrack_monitor_window_seconds"].samples[0].value == 3600


async def test_stale_reservations_warn_then_alert_above_the_threshold(history_dsn: str) -> None:
    conn = await asyncpg.connect(history_dsn)
    try:
        account = await _account(conn)
        reports = [await _reserve(conn, account) for _ in range(11)]

        async def age(report_ids: list[uuid.UUID], hours: int) -> None:
            await conn.execute(
                "UPDATE tokentrack.report_reservations"
                " SET created_at = now() - make_interval(hours => $2),"
                "     expires_at = now() - make_interval(hours => $2) + interval '2 hours'"
                " WHERE report_id = ANY($1::uuid[])",
                report_ids,
                hours,
            )

        await age(reports[:1], 4)  # one old active reservation: a warning, no alert
        code, data = await _monitor(history_dsn)
        assert code == 0
        assert _firing(data) == {"reservations_older_than_2h"}
        assert data["active_reservations"]["older_than_3h"] == 1
        code, data = await _monitor(history_dsn, "--stale-alert-count", "0")
        assert code == 1
        assert _firing(data) == {"reservations_older_than_2h", "stale_reservations"}

        await age(reports, 4)  # eleven: above the checklist's 10
        code, data = await _monitor(history_dsn)
        assert code == 1
        assert _firing(data) == {"reservations_older_than_2h", "stale_reservations"}
        assert data["active_reservations"]["past_expiry"] == 11
        human = await tokentrack("monitor", "--database-url", history_dsn)
        assert human.code == 1
        assert "stale_reservations          alert    FIRING" in human.out
        assert "monitor: 1 alert(s) firing" in human.out

        swept = await tokentrack("cleanup", "--database-url", history_dsn)
        assert swept.code == 0
        code, data = await _monitor(history_dsn)
        assert code == 0
        assert _firing(data) == set()
    finally:
        await conn.close()


async def test_a_raw_update_breaks_usage_accuracy(history_dsn: str) -> None:
    conn = await asyncpg.connect(history_dsn)
    try:
        period = await conn.fetchrow(
            "UPDATE tokentrack.usage_periods SET tokens_used = tokens_used + 1000"
            " WHERE id = (SELECT id FROM tokentrack.usage_periods WHERE status = 'active' LIMIT 1)"
            " RETURNING id, tokens_used"
        )
    finally:
        await conn.close()
    code, data = await _monitor(history_dsn)
    assert code == 1
    assert _firing(data) == {"usage_accuracy"}
    [found] = data["reconcile"]["discrepancies"]
    assert found["period_id"] == str(period["id"])
    assert found["actual"] - found["expected"] == 1000
    human = await tokentrack("monitor", "--database-url", history_dsn)
    assert f"period {period['id']} (tokens_used): expected {found['expected']}" in human.out
    prom = await tokentrack("monitor", "--prometheus", "--database-url", history_dsn)
    assert prom.code == 1
    assert 'tokentrack_alert{name="usage_accuracy",level="alert"} 1' in prom.out
    assert "tokentrack_reconcile_discrepancies 1" in prom.out


async def test_a_burst_of_failed_reports_fires_the_rate_alerts(history_dsn: str) -> None:
    conn = await asyncpg.connect(history_dsn)
    try:
        account = await _account(conn)
        for _ in range(40):
            report = await _reserve(conn, account)
            await call(conn, "persist_step_usage", report, account, "draft", 10, 5, None, None)
            done = await call(conn, "finish_report", report, account, "failed", "rate limited")
            assert done["success"] is True
    finally:
        await conn.close()
    code, data = await _monitor(history_dsn)
    assert code == 1
    assert _firing(data) == {"failure_rate", "completion_rate"}
    assert data["failure_rate"] > 0.05
    assert data["completion_rate"] < 0.9
    # Over the last hour only the burst counts.
    code, last_hour = await _monitor(history_dsn, "--hours", "1")
    assert last_hour["reports_window"]["failed"] >= 40
    assert last_hour["failure_rate"] > 0.5  # the burst dominates the last hour
    # Raised thresholds silence it.
    code, relaxed = await _monitor(
        history_dsn, "--max-failure-rate", "0.5", "--min-completion-rate", "0.5"
    )
    assert code == 0
    assert _firing(relaxed) == set()


async def test_few_reports_do_not_alert_on_rates_until_min_reports(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        account = await _account(conn)
        for status in ("complete", "failed", "failed"):
            report = await _reserve(conn, account)
            await call(conn, "persist_step_usage", report, account, "s", 1, 1, None, None)
            await call(conn, "finish_report", report, account, status, None)
    finally:
        await conn.close()
    code, data = await _monitor(db_dsn)
    assert code == 0
    assert data["failure_rate"] == pytest.approx(2 / 3)
    assert "fewer than --min-reports 20" in next(
        a["message"] for a in data["alerts"] if a["name"] == "failure_rate"
    )
    code, data = await _monitor(db_dsn, "--min-reports", "3")
    assert code == 1
    assert _firing(data) == {"failure_rate", "completion_rate"}


async def test_a_completed_report_without_steps_alerts(history_dsn: str) -> None:
    conn = await asyncpg.connect(history_dsn)
    try:
        account = await _account(conn)
        report = await _reserve(conn, account)
        done = await call(conn, "finish_report", report, account, "complete", None)
        assert done["success"] is True
        assert done["billed_tokens"] == 0
    finally:
        await conn.close()
    code, data = await _monitor(history_dsn)
    assert code == 1
    assert _firing(data) == {"reports_without_steps"}
    assert data["reports_without_steps"] == {"count": 1, "examples": [str(report)]}


# --------------------------------------------------------------------------------------------
# Unpriced steps: a warning once prices are in use, information before
# --------------------------------------------------------------------------------------------

PRICE = '{"input": 1000000, "output": 2000000}'  # 1 micro per input token, 2 per output token
USAGE = '{"input_tokens": 10, "output_tokens": 5}'


async def _record_step(
    conn: asyncpg.Connection, account: uuid.UUID, model: str | None
) -> dict[str, Any]:
    report = await _reserve(conn, account)
    answer = json.loads(
        await conn.fetchval(
            "SELECT tokentrack.record_step($1, $2, 'AN0', $3::jsonb, $4)",
            report,
            account,
            USAGE,
            model,
        )
    )
    assert answer["success"] is True, answer
    return dict(answer)


def _alert(data: dict[str, Any], name: str) -> dict[str, Any]:
    found = next(a for a in data["alerts"] if a["name"] == name)
    assert isinstance(found, dict)
    return found


async def _prometheus(dsn: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    result = await tokentrack("monitor", "--prometheus", "--database-url", dsn)
    assert result.code in (0, 1), result
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): float(sample.value)
        for family in text_string_to_metric_families(result.out)
        for sample in family.samples
    }


async def test_unpriced_steps_of_a_model_warn_once_prices_are_in_use(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)  # the owner (superuser) may set prices
    try:
        price = json.loads(
            await conn.fetchval("SELECT tokentrack.set_model_price('m', $1::jsonb)", PRICE)
        )
        assert price["success"] is True, price
        account = await _account(conn)
        assert (await _record_step(conn, account, "m"))["cost_micros"] == 10 * 1 + 5 * 2
        assert (await _record_step(conn, account, "other-model"))["cost_micros"] is None
        assert (await _record_step(conn, account, None))["cost_micros"] is None
    finally:
        await conn.close()

    code, data = await _monitor(db_dsn)
    assert code == 0  # a warning, not an alert
    assert _firing(data) == {"unpriced_models"}
    assert data["ok"] is True
    assert data["model_prices"] == 1
    assert data["steps"] == {
        "count": 3,
        "tokens": 45,
        "cost_micros": 20,
        "unpriced": {
            "count": 2,
            "tokens": 30,
            "models": [
                {"model": None, "steps": 1, "tokens": 15},
                {"model": "other-model", "steps": 1, "tokens": 15},
            ],
        },
    }
    warning = _alert(data, "unpriced_models")
    assert warning["level"] == "warning"
    assert "other-model (1 steps, 15 tokens)" in warning["message"]
    assert "tokentrack prices import FILE" in warning["message"]
    assert "set_model_price" in warning["message"]
    assert "m (" not in warning["message"]  # the priced model is not named
    assert "None" not in warning["message"]  # nor the steps without a model

    human = await tokentrack("monitor", "--database-url", db_dsn)
    assert human.code == 0
    assert "unpriced_models             warning  FIRING  steps of 1 model(s)" in human.out
    assert "(no model)   1      15" in human.out
    assert "model_prices: 1 price(s)" in human.out
    assert "monitor: no alert firing" in human.out

    metrics = await _prometheus(db_dsn)
    assert metrics[("tokentrack_steps_window", ())] == 3
    assert metrics[("tokentrack_step_tokens_window", ())] == 45
    assert metrics[("tokentrack_cost_micros_window", ())] == 20
    assert metrics[("tokentrack_unpriced_steps_window", ())] == 2
    assert metrics[("tokentrack_unpriced_tokens_window", ())] == 30
    assert metrics[("tokentrack_unpriced_model_tokens_window", (("model", "other-model"),))] == 15
    assert metrics[("tokentrack_unpriced_model_tokens_window", (("model", ""),))] == 15
    assert metrics[("tokentrack_model_prices", ())] == 1
    unpriced_alert = ("tokentrack_alert", (("level", "warning"), ("name", "unpriced_models")))
    assert metrics[unpriced_alert] == 1

    # A price for the other model prices the steps to come; the step recorded stays unpriced.
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute("SELECT tokentrack.set_model_price('other-*', $1::jsonb)", PRICE)
        account = await _account(conn)
        assert (await _record_step(conn, account, "other-model"))["cost_micros"] == 20
    finally:
        await conn.close()
    code, data = await _monitor(db_dsn)
    assert _firing(data) == {"unpriced_models"}
    assert data["steps"]["cost_micros"] == 40
    assert data["steps"]["unpriced"]["count"] == 2


async def test_steps_without_a_model_do_not_warn(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute("SELECT tokentrack.set_model_price('m', $1::jsonb)", PRICE)
        account = await _account(conn)
        await _record_step(conn, account, "m")
        await _record_step(conn, account, None)
    finally:
        await conn.close()
    code, data = await _monitor(db_dsn)
    assert code == 0
    assert _firing(data) == set()
    assert data["steps"]["unpriced"]["count"] == 1
    message = _alert(data, "unpriced_models")["message"]
    assert message == "every step of a model in 24h is priced (1 steps without a model)"


async def test_unpriced_steps_are_information_when_no_price_is_set(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        account = await _account(conn)
        await _record_step(conn, account, "m")
        await _record_step(conn, account, "other-model")
    finally:
        await conn.close()
    code, data = await _monitor(db_dsn)
    assert code == 0
    assert _firing(data) == set()
    assert data["model_prices"] == 0
    assert data["steps"]["count"] == data["steps"]["unpriced"]["count"] == 2
    assert data["steps"]["cost_micros"] == 0
    alert = _alert(data, "unpriced_models")
    assert alert["firing"] is False
    assert alert["message"] == (
        "no price set (costs are not in use): 2 of 2 steps in 24h unpriced, as expected"
    )
    human = await tokentrack("monitor", "--database-url", db_dsn)
    assert "model_prices: no price set (costs are not in use" in human.out
    metrics = await _prometheus(db_dsn)
    assert metrics[("tokentrack_unpriced_steps_window", ())] == 2
    assert metrics[("tokentrack_model_prices", ())] == 0
    assert metrics[("tokentrack_alert", (("level", "warning"), ("name", "unpriced_models")))] == 0


async def test_monitor_reads_a_health_without_step_figures(db_dsn: str) -> None:
    """After version 20261203000000 is rolled back, health() is the one before it (no "steps",
    no "model_prices"): the monitor still runs, says the figures are not measured, and the
    unpriced_models warning cannot fire."""
    earlier = Path(__file__).parents[2] / "sql" / "history" / "20261202000000" / "health.sql"
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute(earlier.read_text())
        assert "steps" not in json.loads(await conn.fetchval("SELECT tokentrack.health()"))
    finally:
        await conn.close()
    code, data = await _monitor(db_dsn)
    assert code == 0
    assert (data["steps"], data["model_prices"]) == (None, None)
    assert _alert(data, "unpriced_models") == {
        "name": "unpriced_models",
        "level": "warning",
        "firing": False,
        "message": "not measured: tokentrack.health() is older than version 20261203000000",
    }
    human = await tokentrack("monitor", "--database-url", db_dsn)
    assert human.code == 0
    assert "Steps and cost: not measured" in human.out
    metrics = await _prometheus(db_dsn)
    assert ("tokentrack_steps_window", ()) not in metrics
    assert ("tokentrack_reservations_active", ()) in metrics


# --------------------------------------------------------------------------------------------
# Budgets: usage against limit of the nearest windows, warnings when exhausted or over
# --------------------------------------------------------------------------------------------

BUDGET_LABELS = ("account", "budget", "subject", "unit", "window")


async def _set_budget(
    conn: asyncpg.Connection, account: uuid.UUID, subject: str | None, unit: str, limit: int
) -> str:
    """A budget over a ``total`` window (it never turns, so the figures stay put)."""
    answer = await call(conn, "set_budget", account, subject, unit, "total", limit)
    assert answer["success"] is True, answer
    return str(answer["budget_id"])


async def _reserve_for(
    conn: asyncpg.Connection, account: uuid.UUID, tokens: int, subjects: list[str]
) -> tuple[uuid.UUID, dict[str, Any]]:
    report = uuid.uuid4()
    estimate = json.dumps({"tokens": tokens})
    return report, await call(conn, "reserve", account, report, estimate, subjects)


def _series(
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str
) -> dict[str, float]:
    """One per-budget gauge as {budget_id: value}, checking that it has exactly the labels."""
    found = {}
    for (metric, labels), value in metrics.items():
        if metric == name:
            assert tuple(sorted(BUDGET_LABELS)) == tuple(k for k, _ in labels), labels
            found[dict(labels)["budget"]] = value
    return found


async def test_budgets_usage_against_limit_and_the_exhausted_warnings(db_dsn: str) -> None:
    """Four budgets of one account: a team's 100 tokens billed 150 (over its limit), a key's 50
    tokens held whole by an active reservation (exhausted: it refuses the next one), a frozen
    key's 0 (exhausted, no percent), a user's cost budget untouched. Both warnings fire, the
    exit status stays 0 (warnings), and text, JSON and Prometheus agree; once the key's
    reservation ends, that window is no longer exhausted."""
    conn = await asyncpg.connect(db_dsn)
    try:
        account = await _account(conn)
        team = await _set_budget(conn, account, "team:research", "tokens", 100)
        key = await _set_budget(conn, account, "key:k1", "tokens", 50)
        frozen = await _set_budget(conn, account, "key:frozen", "tokens", 0)
        user = await _set_budget(conn, account, "user:7", "cost_micros", 1000)

        report, granted = await _reserve_for(conn, account, 60, ["team:research"])
        assert granted["success"] is True, granted
        step = await call(conn, "persist_step_usage", report, account, "draft", 100, 50, None, None)
        assert step["over_reservation"] is True, step
        assert (await call(conn, "finish_report", report, account, "complete", None))["success"]

        holder, held = await _reserve_for(conn, account, 50, ["key:k1"])
        assert held["success"] is True, held
        _, refused = await _reserve_for(conn, account, 1, ["key:k1"])
        assert (refused["success"], refused["error"], refused["budget_id"]) == (
            False,
            "insufficient_budget",
            key,
        )
    finally:
        await conn.close()

    code, data = await _monitor(db_dsn)
    assert code == 0  # warnings, not alerts
    assert data["ok"] is True
    assert _firing(data) == {"budgets_exhausted", "budgets_over_limit"}
    budgets = data["budgets"]
    assert (budgets["count"], budgets["exhausted"], budgets["over_limit"]) == (4, 3, 1)
    nearest = {b["budget_id"]: b for b in budgets["nearest"]}
    # health()'s order: the 0 limit (no ratio) first, then by (used + held) / limit.
    assert [b["budget_id"] for b in budgets["nearest"]] == [frozen, team, key, user]
    assert {k: nearest[team][k] for k in ("subject", "unit", "window", "used", "held")} == {
        "subject": "team:research",
        "unit": "tokens",
        "window": "total",
        "used": 150,
        "held": 0,
    }
    assert (nearest[team]["limit"], nearest[team]["percent"]) == (100, 150.0)
    assert (nearest[team]["exhausted"], nearest[team]["over_limit"]) == (True, True)
    assert (nearest[key]["used"], nearest[key]["held"], nearest[key]["percent"]) == (0, 50, 100.0)
    assert (nearest[key]["exhausted"], nearest[key]["over_limit"]) == (True, False)
    assert (nearest[frozen]["limit"], nearest[frozen]["percent"]) == (0, None)
    assert nearest[frozen]["exhausted"] is True
    assert (nearest[user]["unit"], nearest[user]["percent"], nearest[user]["exhausted"]) == (
        "cost_micros",
        0.0,
        False,
    )
    assert all(b["account_id"] == str(account) for b in budgets["nearest"])
    exhausted = _alert(data, "budgets_exhausted")
    assert exhausted["level"] == "warning"
    assert exhausted["message"].startswith(
        "3 budget window(s) exhausted (used + held >= limit), refusing every reservation that "
        "needs them: key:frozen tokens total of account"
    )
    assert "team:research tokens total" in exhausted["message"]
    assert "key:k1 tokens total" in exhausted["message"]
    assert f"of account {account} (0 used + 50 held of 50)" in exhausted["message"]
    assert "user:7" not in exhausted["message"]
    over = _alert(data, "budgets_over_limit")
    assert over["message"] == (
        "1 budget window(s) billed past their limit (reports used more than they reserved, or "
        f"the limit was lowered): team:research tokens total of account {account} "
        "(150 used + 0 held of 100)"
    )

    human = await tokentrack("monitor", "--database-url", db_dsn)
    assert human.code == 0
    assert (
        "Budgets: 4, 3 window(s) exhausted (refusing every reservation that needs them), "
        "1 over their limit" in human.out
    )
    lines = {
        line.split()[1]: line.split() for line in human.out.splitlines() if str(account) in line
    }
    assert lines["team:research"][-6:] == ["150", "0", "100", "150.0%", "OVER", "LIMIT"]
    assert lines["key:k1"][-5:] == ["0", "50", "50", "100.0%", "EXHAUSTED"]
    assert lines["key:frozen"][-5:] == ["0", "0", "0", "n/a", "EXHAUSTED"]
    assert lines["user:7"][-5:] == ["0", "0", "1000", "0.0%", "ok"]
    assert "budgets_exhausted           warning  FIRING" in human.out
    assert "monitor: no alert firing" in human.out

    metrics = await _prometheus(db_dsn)
    assert metrics[("tokentrack_budgets", ())] == 4
    assert metrics[("tokentrack_budgets_exhausted", ())] == 3
    assert metrics[("tokentrack_budgets_over_limit", ())] == 1
    assert _series(metrics, "tokentrack_budget_used") == {frozen: 0, team: 150, key: 0, user: 0}
    assert _series(metrics, "tokentrack_budget_held") == {frozen: 0, team: 0, key: 50, user: 0}
    assert _series(metrics, "tokentrack_budget_limit") == {
        frozen: 0,
        team: 100,
        key: 50,
        user: 1000,
    }
    assert _series(metrics, "tokentrack_budget_exhausted") == {
        frozen: 1,
        team: 1,
        key: 1,
        user: 0,
    }
    labels = (
        ("account", str(account)),
        ("budget", user),
        ("subject", "user:7"),
        ("unit", "cost_micros"),
        ("window", "total"),
    )
    assert ("tokentrack_budget_limit", labels) in metrics
    start = metrics[("tokentrack_budget_window_start_timestamp_seconds", labels)]
    assert start == pytest.approx(datetime.fromisoformat(nearest[user]["window_start"]).timestamp())
    warning = ("tokentrack_alert", (("level", "warning"), ("name", "budgets_exhausted")))
    assert metrics[warning] == 1

    # The key's reservation ends without usage: its window holds nothing and refuses no more.
    conn = await asyncpg.connect(db_dsn)
    try:
        assert (await call(conn, "finish_report", holder, account, "cancelled", None))["success"]
    finally:
        await conn.close()
    code, data = await _monitor(db_dsn)
    assert (data["budgets"]["exhausted"], data["budgets"]["over_limit"]) == (2, 1)
    assert next(b for b in data["budgets"]["nearest"] if b["budget_id"] == key)["held"] == 0


async def test_the_budget_series_stay_bounded_by_the_nearest_list(db_dsn: str) -> None:
    """Twelve budgets: health() lists the 10 nearest their limits, and the per-budget series
    are those 10 only, while the counts cover all twelve; the whole account's budget has
    subject=""."""
    conn = await asyncpg.connect(db_dsn)
    try:
        account = await _account(conn)
        whole = await _set_budget(conn, account, None, "tokens", 1_000_000)
        for n in range(11):
            await _set_budget(conn, account, f"user:{n}", "tokens", 100 + n)
        _, granted = await _reserve_for(conn, account, 90, [f"user:{n}" for n in range(11)])
        assert granted["success"] is True, granted
    finally:
        await conn.close()
    code, data = await _monitor(db_dsn)
    assert code == 0
    assert (data["budgets"]["count"], data["budgets"]["exhausted"]) == (12, 0)
    assert _firing(data) == set()
    assert _alert(data, "budgets_exhausted")["message"] == "no budget window exhausted (12 budgets)"
    nearest = data["budgets"]["nearest"]
    # 90 held of 100 ... 110: the smaller limits are nearer; the whole account's is last.
    assert [b["subject"] for b in nearest] == [f"user:{n}" for n in range(10)]
    assert nearest[0]["percent"] == 90.0
    metrics = await _prometheus(db_dsn)
    assert len(_series(metrics, "tokentrack_budget_held")) == 10
    assert whole not in _series(metrics, "tokentrack_budget_held")
    assert metrics[("tokentrack_budgets", ())] == 12

    conn = await asyncpg.connect(db_dsn)
    try:  # the whole account's budget nearest (0 limit): subject "" in the labels
        await call(conn, "set_budget", account, None, "tokens", "total", 0)
    finally:
        await conn.close()
    metrics = await _prometheus(db_dsn)
    subjects = {
        dict(labels)["budget"]: dict(labels)["subject"]
        for (name, labels) in metrics
        if name == "tokentrack_budget_limit"
    }
    assert subjects[whole] == ""
    assert metrics[("tokentrack_budgets_exhausted", ())] == 1


async def test_monitor_reads_a_health_without_budget_figures(db_dsn: str) -> None:
    """After version 20261210000000 is rolled back, health() is the cost version's (no
    "budgets"): the monitor still runs, says so, and the budget warnings cannot fire."""
    earlier = Path(__file__).parents[2] / "sql" / "history" / "20261203000000" / "health.sql"
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute(earlier.read_text())
        assert "budgets" not in json.loads(await conn.fetchval("SELECT tokentrack.health()"))
    finally:
        await conn.close()
    code, data = await _monitor(db_dsn)
    assert code == 0
    assert data["budgets"] is None
    assert data["steps"] is not None
    message = "not measured: tokentrack.health() is older than version 20261210000000"
    for name in ("budgets_exhausted", "budgets_over_limit"):
        assert _alert(data, name) == {
            "name": name,
            "level": "warning",
            "firing": False,
            "message": message,
        }
    human = await tokentrack("monitor", "--database-url", db_dsn)
    assert human.code == 0
    assert "Budgets: not measured" in human.out
    metrics = await _prometheus(db_dsn)
    assert ("tokentrack_budgets", ()) not in metrics
    assert ("tokentrack_steps_window", ()) in metrics


async def test_monitor_errors(empty_db_dsn: str) -> None:
    missing = await tokentrack("monitor", "--database-url", empty_db_dsn)
    assert missing.code == 2
    assert missing.err == (
        "tokentrack: error: tokentrack.report_reservations not found in this database: install "
        "tokentrack first (make install-sql DATABASE_URL=... or tokentrack migrate install)\n"
    )
    both = await tokentrack("monitor", "--json", "--prometheus", "--database-url", empty_db_dsn)
    assert both.code == 2
    assert "not allowed with argument" in both.err
    bad = await tokentrack("monitor", "--max-failure-rate", "5", "--database-url", empty_db_dsn)
    assert bad.code == 2


# --------------------------------------------------------------------------------------------
# tokentrack.health(): the figures, the argument, the grant, read-only
# --------------------------------------------------------------------------------------------

HEALTH_KEYS = {
    "taken_at",
    "window_hours",
    "active_reservations",
    "reservations_by_status",
    "reports_without_steps",
    "reports_by_hour",
    "reports_window",
    "failure_rate",
    "completion_rate",
    "steps",
    "model_prices",
    "budgets",
    "notifications",  # version 20261212000000
    "refusals",  # version 20261213000000
}
STATUSES = ("pending", "processing", "complete", "failed", "cancelled")


async def _health(conn: asyncpg.Connection, *args: Any) -> dict[str, Any]:
    placeholders = ", ".join(f"${i}" for i in range(1, len(args) + 1))
    answer = json.loads(await conn.fetchval(f"SELECT tokentrack.health({placeholders})", *args))
    assert isinstance(answer, dict)
    return answer


def _ts(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


async def test_health_returns_each_figure_of_the_monitor(history_dsn: str) -> None:
    conn = await asyncpg.connect(history_dsn)
    try:
        # A report of the window completed without a step, and an old active reservation.
        account = await _account(conn)
        stepless = await _reserve(conn, account)
        assert (await call(conn, "finish_report", stepless, account, "complete", None))["success"]
        stale = await _reserve(conn, account)
        await conn.execute(
            "UPDATE tokentrack.report_reservations SET created_at = now() - interval '150 minutes',"
            " expires_at = now() - interval '30 minutes' WHERE report_id = $1",
            stale,
        )
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            health = await _health(conn, 24)
            now = await conn.fetchval("SELECT now()")
            active = await conn.fetchrow(
                "SELECT count(*) AS count,"
                " count(*) FILTER (WHERE created_at < now() - interval '2 hours') AS older_2h,"
                " count(*) FILTER (WHERE created_at < now() - interval '3 hours') AS older_3h,"
                " count(*) FILTER (WHERE expires_at <= now()) AS past_expiry,"
                " min(created_at) AS oldest, max(created_at) AS newest"
                " FROM tokentrack.report_reservations WHERE status = 'active'"
            )
            in_window = await conn.fetch(
                "SELECT rr.status, count(*) AS count, min(rr.created_at) AS oldest,"
                " max(rr.created_at) AS newest"
                " FROM tokentrack.report_reservations rr"
                " JOIN tokentrack.reports r ON r.id = rr.report_id"
                " WHERE r.created_at >= now() - interval '24 hours' GROUP BY rr.status"
            )
            window = {
                r["status"]: r["n"]
                for r in await conn.fetch(
                    "SELECT status, count(*) AS n FROM tokentrack.reports"
                    " WHERE created_at >= now() - interval '24 hours' GROUP BY status"
                )
            }
            hours = await conn.fetch(
                "SELECT date_trunc('hour', created_at) AS hour, count(*) AS n"
                " FROM tokentrack.reports WHERE created_at >= now() - interval '24 hours'"
                " GROUP BY 1 ORDER BY 1"
            )
            steps = await conn.fetch(
                "SELECT s.model, count(*) AS n, sum(s.total_tokens) AS tokens,"
                " sum(s.cost_micros) AS cost,"
                " count(*) FILTER (WHERE s.cost_micros IS NULL) AS unpriced,"
                " sum(s.total_tokens) FILTER (WHERE s.cost_micros IS NULL) AS unpriced_tokens"
                " FROM tokentrack.report_step_usage s"
                " JOIN tokentrack.reports r ON r.id = s.report_id"
                " WHERE r.created_at >= now() - interval '24 hours' GROUP BY s.model"
            )
            without = await conn.fetch(
                "SELECT r.id FROM tokentrack.reports r"
                " WHERE r.created_at >= now() - interval '24 hours' AND r.status = 'complete'"
                " AND EXISTS (SELECT FROM tokentrack.report_reservations rr"
                "             WHERE rr.report_id = r.id)"
                " AND NOT EXISTS (SELECT FROM tokentrack.report_step_usage s"
                "                 WHERE s.report_id = r.id)"
            )
    finally:
        await conn.close()

    assert set(health) == HEALTH_KEYS
    assert _ts(health["taken_at"]) == now
    assert health["window_hours"] == 24
    a = health["active_reservations"]
    assert (a["count"], a["older_than_2h"], a["older_than_3h"], a["past_expiry"]) == (
        active["count"],
        active["older_2h"],
        active["older_3h"],
        active["past_expiry"],
    )
    assert (a["older_than_2h"], a["older_than_3h"]) == (1, 0)
    assert a["past_expiry"] >= 1
    assert (_ts(a["oldest"]), _ts(a["newest"])) == (active["oldest"], active["newest"])
    assert a["oldest_age_seconds"] == pytest.approx((now - active["oldest"]).total_seconds())
    by_status = health["reservations_by_status"]
    assert set(by_status) == {"active", "completed", "expired"}
    assert by_status["active"] == {
        "count": active["count"],
        "oldest": a["oldest"],
        "newest": a["newest"],
    }
    for r in in_window:
        if r["status"] != "active":
            got = by_status[r["status"]]
            assert (got["count"], _ts(got["oldest"]), _ts(got["newest"])) == (
                r["count"],
                r["oldest"],
                r["newest"],
            )
    assert by_status["expired"]["count"] > 0
    assert health["reports_without_steps"] == {
        "count": len(without),
        "examples": [str(stepless)],
    }
    assert health["reports_window"] == {s: window.get(s, 0) for s in STATUSES}
    assert [(_ts(h["hour"]), sum(h[s] for s in STATUSES)) for h in health["reports_by_hour"]] == [
        (r["hour"], r["n"]) for r in hours
    ]
    finished = sum(window.get(s, 0) for s in ("complete", "failed", "cancelled"))
    # The history records steps of model-a, model-b and without a model, and sets no price.
    assert health["model_prices"] == 0
    assert health["steps"] == {
        "count": sum(r["n"] for r in steps),
        "tokens": sum(r["tokens"] for r in steps),
        "cost_micros": 0,
        "unpriced": {
            "count": sum(r["n"] for r in steps),
            "tokens": sum(r["tokens"] for r in steps),
            "models": [
                {"model": r["model"], "steps": r["unpriced"], "tokens": r["unpriced_tokens"]}
                for r in sorted(steps, key=lambda r: (-r["unpriced_tokens"], r["model"] or ""))
            ],
        },
    }
    assert {m["model"] for m in health["steps"]["unpriced"]["models"]} == {
        "model-a",
        "model-b",
        None,
    }
    assert health["failure_rate"] == window["failed"] / finished
    assert health["completion_rate"] == window["complete"] / finished

    # monitor --json reports the same figures.
    code, data = await _monitor(history_dsn)
    assert code == 1  # the stepless report
    assert data["reports_window"] == health["reports_window"]
    assert data["reports_without_steps"] == health["reports_without_steps"]
    assert data["failure_rate"] == health["failure_rate"]
    assert data["active_reservations"]["older_than_2h"] == 1
    assert data["steps"] == health["steps"]
    assert data["model_prices"] == 0


async def test_health_of_an_empty_database_and_its_window(conn: asyncpg.Connection) -> None:
    health = await _health(conn)
    assert health["window_hours"] == 24  # the default
    assert health["active_reservations"] == {
        "count": 0,
        "older_than_2h": 0,
        "older_than_3h": 0,
        "past_expiry": 0,
        "oldest": None,
        "newest": None,
        "oldest_age_seconds": 0,
    }
    assert health["reports_by_hour"] == []
    assert health["reports_window"] == dict.fromkeys(STATUSES, 0)
    assert (health["failure_rate"], health["completion_rate"]) == (None, None)
    assert health["reports_without_steps"] == {"count": 0, "examples": []}
    account = await _account(conn)
    report = await _reserve(conn, account)
    await conn.execute(
        "UPDATE tokentrack.reports SET created_at = now() - interval '5 hours' WHERE id = $1",
        report,
    )
    assert sum((await _health(conn, 6))["reports_window"].values()) == 1
    assert sum((await _health(conn, 4))["reports_window"].values()) == 0


@pytest.mark.parametrize(
    ("hours", "sqlstate", "message"),
    [
        (None, "22004", "p_hours must not be NULL"),
        (0, "22023", "p_hours must be at least 1 (got 0)"),
        (-5, "22023", "p_hours must be at least 1 (got -5)"),
    ],
)
async def test_health_refuses_a_bad_window(
    conn: asyncpg.Connection, hours: int | None, sqlstate: str, message: str
) -> None:
    with pytest.raises(asyncpg.PostgresError) as caught:
        await conn.fetchval("SELECT tokentrack.health($1)", hours)
    assert caught.value.sqlstate == sqlstate
    assert caught.value.sqlstate.startswith("22")
    assert str(caught.value) == message
    assert caught.value.column_name == "p_hours"


async def test_health_is_for_the_service_role_and_a_granted_monitoring_role(
    conn: asyncpg.Connection,
) -> None:
    account = await _account(conn)
    await _reserve(conn, account)
    acl = await conn.fetch(
        "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END AS role"
        " FROM pg_proc p, aclexplode(p.proacl) a"
        " WHERE p.oid = 'tokentrack.health(integer)'::regprocedure AND a.grantee <> p.proowner"
    )
    assert [r["role"] for r in acl] == ["tokentrack_service"]
    watcher = f"tt_watch_{uuid.uuid4().hex[:8]}"
    await conn.execute(f"CREATE ROLE {watcher} NOLOGIN")
    try:
        await conn.execute(f"GRANT USAGE ON SCHEMA tokentrack TO {watcher}")
        # Application roles and any other role without the grant are refused.
        for role in ("tokentrack_reader", watcher):
            async with conn.transaction():
                await conn.execute(f"SET LOCAL ROLE {role}")
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.fetchval("SELECT tokentrack.health()")
        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE tokentrack_service")
            assert (await _health(conn))["active_reservations"]["count"] == 1
        # docs/SECURITY.md: what a monitoring role is granted.
        await conn.execute(f"GRANT EXECUTE ON FUNCTION tokentrack.health(integer) TO {watcher}")
        async with conn.transaction():
            await conn.execute(f"SET LOCAL ROLE {watcher}")
            assert (await _health(conn))["active_reservations"]["count"] == 1  # every account
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetchval("SELECT count(*) FROM tokentrack.report_reservations")
    finally:
        await conn.execute(f"DROP OWNED BY {watcher}; DROP ROLE {watcher}")


async def test_health_writes_nothing(history_dsn: str) -> None:
    conn = await asyncpg.connect(history_dsn)
    try:
        volatility = await conn.fetchval(
            "SELECT provolatile::text FROM pg_proc"
            " WHERE oid = 'tokentrack.health(integer)'::regprocedure"
        )
        assert volatility == "s"  # STABLE: PostgreSQL refuses any write inside it
        async with conn.transaction(readonly=True):  # a read-only transaction allows it
            await _health(conn, 48)
            # No transaction id was assigned: nothing was written, not even a lock row.
            assert await conn.fetchval("SELECT pg_current_xact_id_if_assigned()") is None
    finally:
        await conn.close()


# --------------------------------------------------------------------------------------------
# Large tables: every monitoring query is served by indexes
# --------------------------------------------------------------------------------------------

BIG_TABLES = {"reports", "report_reservations", "report_step_usage"}
REPORTS = 30_000


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(n for child in plan.get("Plans", []) for n in _nodes(child))]


async def _unindexed_scans(conn: asyncpg.Connection, plan: dict[str, Any]) -> list[str]:
    """Scans of a big table that read all of it: a Seq Scan, or an index scan whose condition
    does not bound the index's leading column (a whole-index scan), unless the index is a
    partial one (its predicate is the bound: the active reservations)."""
    found = []
    for node in _nodes(plan):
        if node.get("Node Type") == "Seq Scan" and node.get("Relation Name") in BIG_TABLES:
            found.append(f"Seq Scan on {node['Relation Name']}")
        if "Index Name" not in node:
            continue
        leading, partial = await conn.fetchrow(
            "SELECT a.attname, x.indpred IS NOT NULL FROM pg_index x"
            " JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]"
            " WHERE x.indexrelid = ('tokentrack.' || $1)::regclass",
            node["Index Name"],
        )
        condition = node.get("Index Cond", "")
        if not partial and f"({leading} " not in condition:
            found.append(
                f"whole-index scan of {node['Index Name']} ({condition or 'no condition'})"
            )
    return found


async def test_health_reads_large_tables_by_index(db_dsn: str, conn: asyncpg.Connection) -> None:
    """30,000 reports over 30 days (reservations and steps alike), 30 active reservations.

    The plans are those health() really runs (auto_explain with nested statements): reports
    per hour and the window's reservations through reports_created_at_idx, each report's
    reservation and steps through their unique indexes, the active ones through the partial
    index.
    """
    # A synthetic bulk load for the planner: foreign-key triggers off while it loads.
    await conn.execute("SET session_replication_role = replica")
    await conn.execute(
        """
        INSERT INTO tokentrack.accounts (id)
        SELECT gen_random_uuid() FROM generate_series(1, 200);
        INSERT INTO tokentrack.usage_periods (account_id, tokens_limit)
        SELECT id, 1000000000 FROM tokentrack.accounts;
        INSERT INTO tokentrack.reports (id, account_id, status, created_at)
        SELECT gen_random_uuid(), acc.ids[1 + g % 200],
               CASE WHEN g % 50 = 0 THEN 'failed' ELSE 'complete' END,
               now() - (g * interval '86 seconds')
        FROM generate_series(1, 30000) AS g,
             (SELECT array_agg(id) AS ids FROM tokentrack.accounts) AS acc;
        INSERT INTO tokentrack.report_reservations
            (report_id, account_id, period_id, status, reserved_tokens, billed_tokens,
             created_at, expires_at, finalized_at)
        SELECT r.id, r.account_id, p.id, 'completed', 1000, 500,
               r.created_at, r.created_at + interval '2 hours', r.created_at + interval '5 minutes'
        FROM tokentrack.reports r
        JOIN tokentrack.usage_periods p ON p.account_id = r.account_id;
        UPDATE tokentrack.report_reservations SET status = 'active', billed_tokens = NULL,
               finalized_at = NULL, created_at = now(), expires_at = now() + interval '2 hours'
        WHERE id IN (SELECT id FROM tokentrack.report_reservations LIMIT 30);
        INSERT INTO tokentrack.report_step_usage
            (report_id, account_id, step_name, input_tokens, output_tokens, total_tokens)
        SELECT id, account_id, 'draft', 300, 200, 500 FROM tokentrack.reports;
        """
    )
    await conn.execute("RESET session_replication_role")
    await conn.execute(
        "ANALYZE tokentrack.reports, tokentrack.report_reservations, tokentrack.report_step_usage"
    )
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.reports") == REPORTS
    plans: list[dict[str, Any]] = []

    def listener(_: Any, message: Any) -> None:
        text = str(message.message)
        if "plan:" in text:
            plans.append(json.loads(text.split("plan:", 1)[1]))

    await conn.execute("LOAD 'auto_explain'")
    await conn.execute(
        "SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on;"
        " SET auto_explain.log_format = json; SET client_min_messages = log"
    )
    conn.add_log_listener(listener)
    try:
        await conn.fetchval("SELECT tokentrack.health(24)")
    finally:
        conn.remove_log_listener(listener)
        await conn.execute("RESET client_min_messages")
    nested = [p for p in plans if "tokentrack.report" in p.get("Query Text", "")]
    assert nested, "auto_explain sent no plan of the statements inside health()"
    for document in nested:
        plan = document["Plan"]
        assert await _unindexed_scans(conn, plan) == [], json.dumps(plan, indent=1)
    code, data = await _monitor(db_dsn)
    assert code == 0
    # Reports every 86 seconds: 1,004 in the last 24 hours, every 50th failed.
    assert data["reports_window"]["complete"] + data["reports_window"]["failed"] == 1004
    assert data["reports_window"]["failed"] == 20
    assert data["active_reservations"]["count"] == 30


async def test_a_health_answer_it_cannot_read_is_one_line_and_exit_2(db_dsn: str) -> None:
    """A health() of another tokentrack version (here: one that answers an empty object) must
    not look like a fired alert (exit 1) nor print a traceback: one line, exit 2."""
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute(
            "CREATE OR REPLACE FUNCTION tokentrack.health(p_hours integer DEFAULT 24)"
            " RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$"
        )
    finally:
        await conn.close()
    result = await tokentrack("monitor", "--database-url", db_dsn)
    assert result.code == 2, result.out + result.err
    assert result.err.startswith("tokentrack: error: cannot read tokentrack.health()"), result.err
    assert len(result.err.splitlines()) == 1, result.err
    assert "Traceback" not in result.out + result.err


# --------------------------------------------------------------------------------------------
# Usage accuracy: the incremental reconcile by default, --full for the audit
# --------------------------------------------------------------------------------------------


async def test_monitor_checks_what_changed_since_the_point_and_never_moves_it(
    history_dsn: str,
) -> None:
    conn = await asyncpg.connect(history_dsn)
    try:
        entries = await conn.fetchval("SELECT count(*) FROM tokentrack.usage_ledger")
        code, data = await _monitor(history_dsn)
        assert code == 0
        # The point never moved: every ledger row is after it.
        assert data["reconcile_mode"] == {
            "mode": "incremental",
            "through_entry": 0,
            "advanced_at": None,
            "entries_checked": entries,
        }
        # The writer (the exporter's slow task, or a scheduled call) moves it: two runs.
        for _ in range(2):
            assert (await call(conn, "advance_reconcile_point"))["ok"] is True
        last = await conn.fetchval("SELECT max(id) FROM tokentrack.usage_ledger")
        active = await conn.fetchval(
            "SELECT count(*) FROM tokentrack.usage_periods WHERE status = 'active'"
        )
        code, data = await _monitor(history_dsn)
        assert code == 0
        assert data["reconcile"]["ok"] is True
        assert data["reconcile"]["periods_checked"] == active < 12
        mode = data["reconcile_mode"]
        assert (mode["through_entry"], mode["entries_checked"]) == (last, 0)
        assert mode["advanced_at"] is not None
        human = await tokentrack("monitor", "--database-url", history_dsn)
        assert f"incremental: 0 ledger rows after the verified point (entry {last}" in human.out
        # The monitor only reads the point.
        assert await conn.fetchval("SELECT through_entry FROM tokentrack.reconcile_point") == last

        # A discrepancy after the point is caught, as the full audit reports it.
        await conn.execute(
            "UPDATE tokentrack.usage_periods SET tokens_used = tokens_used + 1000"
            " WHERE id = (SELECT id FROM tokentrack.usage_periods WHERE status = 'active'"
            " ORDER BY id LIMIT 1)"
        )
        code, data = await _monitor(history_dsn)
        assert code == 1
        assert _firing(data) == {"usage_accuracy"}
        code_full, full = await _monitor(history_dsn, "--full")
        assert code_full == 1
        assert full["reconcile_mode"] == {"mode": "full"}
        assert full["reconcile"]["periods_checked"] == 12
        assert data["reconcile"]["discrepancies"] == full["reconcile"]["discrepancies"]
        alert = next(a for a in data["alerts"] if a["name"] == "usage_accuracy")
        assert alert["message"].startswith("reconcile_recent(): 1 discrepancies")
    finally:
        await conn.close()


async def test_a_hand_edit_of_a_period_nothing_touched_since_the_point_needs_the_full_audit(
    history_dsn: str,
) -> None:
    """The documented limit of the incremental check (docs/API.md): a completed period that
    no ledger row after the point reaches is not read again; `monitor --full` finds it."""
    conn = await asyncpg.connect(history_dsn)
    try:
        for _ in range(2):
            assert (await call(conn, "advance_reconcile_point"))["ok"] is True
        edited = await conn.fetchval(
            "UPDATE tokentrack.usage_periods SET tokens_used = tokens_used + 1"
            " WHERE id = (SELECT id FROM tokentrack.usage_periods WHERE status = 'completed'"
            " ORDER BY id LIMIT 1) RETURNING id"
        )
        assert edited is not None
    finally:
        await conn.close()
    code, data = await _monitor(history_dsn)
    assert (code, data["reconcile"]["ok"]) == (0, True)
    code, data = await _monitor(history_dsn, "--full")
    assert code == 1
    [found] = data["reconcile"]["discrepancies"]
    assert (found["period_id"], found["check"]) == (str(edited), "tokens_used")
