"""``tokentrack audit baseline`` / ``tokentrack audit compare``: the figures around a deploy.

``baseline`` saves, as JSON, the figures of the pre-deploy checklist:

* ``usage_periods``: per status, the number of periods and the sums of ``tokens_used``,
  ``tokens_limit`` and ``reports_count``: **these must not change** across a deploy or a
  rollback (applying or rolling back a version never touches existing usage);
* ``reports_24h``: reports created in the last 24 hours, by status;
* ``tracked_tokens_7d``: reports of the last 7 days that carry ``token_usage.totalTokens``
  and their sum, and the tokens the usage ledger recorded in the last 7 days;
* ``accounts``: accounts, and active accounts (those with an active usage period);
* ``ledger``: the usage ledger's row count and high-water mark, to explain a changed sum.

``compare`` measures again and prints both side by side; it exits 1, naming each changed
figure, when a usage-period figure differs. The other figures move with traffic and are
shown for information.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import asyncpg

from tokentrack_client import __version__
from tokentrack_client.connection import describe_target
from tokentrack_client.ops._common import (
    OpsError,
    connected,
    fetchrow,
    render_table,
    require_installed,
)

FORMAT: Final = "tokentrack-audit/1"
PERIOD_STATUSES: Final = ("active", "completed")
REPORT_STATUSES: Final = ("pending", "processing", "complete", "failed", "cancelled")
PERIOD_FIGURES: Final = ("periods", "tokens_used", "tokens_limit", "reports_count")


# These queries stay in Python, unlike the monitor's figures (tokentrack.health()): baseline
# runs BEFORE a deploy, on a database where the version being deployed, and any SQL function
# that would hold them, may not be installed yet (only version 20251219000000's tables are
# sure to exist). compare must then measure exactly as baseline did, so both read the tables
# with the same statements. They read only tables of version 20251219000000 and the
# installer's schema_migrations.
async def measure(conn: asyncpg.Connection) -> dict[str, Any]:
    """The audit figures of the database behind ``conn``, in one snapshot."""
    await require_installed(conn)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        periods = {status: dict.fromkeys(PERIOD_FIGURES, 0) for status in PERIOD_STATUSES}
        for r in await conn.fetch(
            "SELECT status, count(*) AS periods, COALESCE(sum(tokens_used), 0) AS tokens_used,"
            " COALESCE(sum(tokens_limit), 0) AS tokens_limit,"
            " COALESCE(sum(reports_count), 0) AS reports_count"
            " FROM tokentrack.usage_periods GROUP BY status"
        ):
            periods[r["status"]] = {figure: int(r[figure]) for figure in PERIOD_FIGURES}
        reports = dict.fromkeys(REPORT_STATUSES, 0)
        for r in await conn.fetch(
            "SELECT status, count(*) AS n FROM tokentrack.reports"
            " WHERE created_at >= now() - interval '24 hours' GROUP BY status"
        ):
            reports[r["status"]] = int(r["n"])
        tracked = await fetchrow(
            conn,
            "SELECT count(*) AS reports,"
            " COALESCE(sum((token_usage ->> 'totalTokens')::bigint), 0) AS total_tokens"
            " FROM tokentrack.reports"
            " WHERE created_at >= now() - interval '7 days' AND token_usage ? 'totalTokens'",
        )
        ledger7 = await conn.fetchval(
            "SELECT COALESCE(sum(tokens), 0) FROM tokentrack.usage_ledger"
            " WHERE created_at >= now() - interval '7 days'"
        )
        accounts = await fetchrow(
            conn,
            "SELECT (SELECT count(*) FROM tokentrack.accounts) AS accounts,"
            " (SELECT count(DISTINCT account_id) FROM tokentrack.usage_periods"
            "  WHERE status = 'active') AS active_accounts",
        )
        ledger = await fetchrow(
            conn,
            "SELECT count(*) AS rows, COALESCE(max(id), 0) AS max_id,"
            " COALESCE(sum(tokens), 0) AS tokens, COALESCE(sum(reports), 0) AS reports"
            " FROM tokentrack.usage_ledger",
        )
        versions = [
            r["version"]
            for r in await conn.fetch(
                "SELECT version FROM tokentrack.schema_migrations ORDER BY version"
            )
        ]
        taken_at: datetime = await conn.fetchval("SELECT now()")
    return {
        "format": FORMAT,
        "taken_at": taken_at.astimezone(UTC).isoformat(timespec="seconds"),
        "tokentrack": __version__,
        "versions": versions,
        "usage_periods": periods,
        "reports_24h": reports,
        "tracked_tokens_7d": {
            "reports": int(tracked["reports"]),
            "total_tokens": int(tracked["total_tokens"]),
            "ledger_tokens": int(ledger7),
        },
        "accounts": {
            "accounts": int(accounts["accounts"]),
            "active_accounts": int(accounts["active_accounts"]),
        },
        "ledger": {
            "rows": int(ledger["rows"]),
            "max_id": int(ledger["max_id"]),
            "tokens": int(ledger["tokens"]),
            "reports": int(ledger["reports"]),
        },
    }


async def baseline(dsn: str, out: Path) -> dict[str, Any]:
    """Measure and write the baseline JSON to ``out``; return it."""
    async with connected(dsn, "tokentrack audit") as conn:
        figures = await measure(conn)
    figures["database"] = describe_target(dsn)
    try:
        text = json.dumps(figures, indent=2, sort_keys=True) + "\n"
        await asyncio.to_thread(out.write_text, text, encoding="utf-8")
    except OSError as exc:
        raise OpsError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return figures


def load_baseline(path: Path) -> dict[str, Any]:
    """Read a baseline file written by :func:`baseline`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise OpsError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise OpsError(f"{path} is not a tokentrack audit baseline (invalid JSON: {exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise OpsError(f"{path} is not a tokentrack audit baseline (format {FORMAT} expected)")
    return data


@dataclass(frozen=True)
class Figure:
    """One compared figure."""

    name: str
    before: int
    after: int
    guarded: bool  # must not change

    @property
    def changed(self) -> bool:
        """True when before and after differ."""
        return self.before != self.after

    @property
    def verdict(self) -> str:
        """What the compare table says about this figure."""
        if not self.guarded:
            return "info"
        return "CHANGED" if self.changed else "same"


def _flatten(prefix: str, value: Any) -> Iterator[tuple[str, int]]:
    if isinstance(value, dict):
        for key in value:
            yield from _flatten(f"{prefix}.{key}" if prefix else str(key), value[key])
    elif isinstance(value, int) and not isinstance(value, bool):
        yield prefix, value


def compare_figures(before: dict[str, Any], after: dict[str, Any]) -> list[Figure]:
    """Both measurements figure by figure; usage-period figures are the guarded ones."""
    sections = ("usage_periods", "reports_24h", "tracked_tokens_7d", "accounts", "ledger")
    figures: list[Figure] = []
    for section in sections:
        old = dict(_flatten(section, before.get(section, {})))
        new = dict(_flatten(section, after.get(section, {})))
        for name in list(old) + [n for n in new if n not in old]:
            figures.append(
                Figure(name, old.get(name, 0), new.get(name, 0), section == "usage_periods")
            )
    return figures


@dataclass(frozen=True)
class Comparison:
    """The result of ``audit compare``."""

    before: dict[str, Any]
    after: dict[str, Any]
    figures: list[Figure]

    @property
    def changed(self) -> list[Figure]:
        """Guarded figures that changed."""
        return [f for f in self.figures if f.guarded and f.changed]

    @property
    def ok(self) -> bool:
        """True when no guarded figure changed."""
        return not self.changed

    def explanation(self) -> str | None:
        """Whether ledger rows written since the baseline explain a changed tokens_used sum."""
        if self.ok:
            return None
        old, new = self.before.get("ledger", {}), self.after.get("ledger", {})
        rows = int(new.get("rows", 0)) - int(old.get("rows", 0))
        tokens = int(new.get("tokens", 0)) - int(old.get("tokens", 0))
        used_before = sum(
            int(p.get("tokens_used", 0)) for p in self.before["usage_periods"].values()
        )
        used_after = sum(int(p.get("tokens_used", 0)) for p in self.after["usage_periods"].values())
        if rows > 0 and used_after - used_before == tokens:
            return (
                f"the change of tokens_used ({used_after - used_before:+d}) equals the tokens of "
                f"the {rows} usage ledger rows written since the baseline: live traffic, not the "
                "deploy, moved it; take baseline and compare with writers paused"
            )
        return (
            f"usage ledger: {rows:+d} rows, {tokens:+d} tokens since the baseline; tokens_used "
            f"moved {used_after - used_before:+d}: not explained by recorded usage"
        )

    def render(self) -> str:
        """The side-by-side table and the verdict."""
        rows = [
            (f.name, f.before, f.after, f"{f.after - f.before:+d}" if f.changed else "", f.verdict)
            for f in self.figures
        ]
        out = [
            f"baseline taken {self.before.get('taken_at')} (versions {_versions(self.before)}); "
            f"now {self.after['taken_at']} (versions {_versions(self.after)})",
            render_table(("FIGURE", "BEFORE", "AFTER", "DELTA", "RULE"), rows),
        ]
        if self.ok:
            out.append("audit: usage periods unchanged (counts and sums)")
        else:
            for f in self.changed:
                out.append(
                    f"audit: {f.name} changed: {f.before} -> {f.after} ({f.after - f.before:+d}); "
                    "it must not change"
                )
            explanation = self.explanation()
            if explanation:
                out.append(f"audit: {explanation}")
        return "\n".join(out)


def _versions(figures: dict[str, Any]) -> str:
    return ", ".join(figures.get("versions", [])) or "none"


async def compare(dsn: str, path: Path) -> Comparison:
    """Measure again and compare with the baseline at ``path``."""
    before = load_baseline(path)
    async with connected(dsn, "tokentrack audit") as conn:
        after = await measure(conn)
    return Comparison(before, after, compare_figures(before, after))
