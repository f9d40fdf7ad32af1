"""Summaries of the benchmark's runs and the Markdown report (bench/results/*.md)."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from workloads import BASELINE, BASELINED

TARGET_FUNCTION = 0.8  # each function and the lifecycle (calls/s) vs simple-update
TARGET_HOT = 0.8  # hot account vs spread accounts
TARGET_GROWTH = 1.2  # 1 million rows vs 10 thousand
TARGET_CLIENT = 0.8  # tokentrack_client vs the pgbench-driven lifecycle (issue #16)
TARGET_CLIENT_CPU_MS = 0.25  # the client's driver CPU per call (issue #16)
TARGET_REPLAY = 1.25  # a report's steps vs the same steps as bare increment_usage (issue #16)
TARGET_SWEEP_MS = 100.0  # the longest a sweep batch may hold its locks
TARGET_RECORD_STEP = 0.9  # record_step vs persist_step_usage (calls/s): within 10%
TARGET_BUDGETS = 0.8  # reserve with three budgets vs try_reserve_tokens (calls/s)
TARGET_NOT_SLOWER = 1.0  # try_reserve_tokens now vs main's (calls/s): no slower

LABELS = {
    "simple-update": "simple-update (built-in)",
    "reserve": "reserve + release",
    "reserve-budgets": "reserve (3 budgets) + release",
    "reserve-main": "reserve + release, main's SQL",
    "reserve-before": "reserve + release, before the refusal counters",
    "refuse": "refused reserve (account_not_found)",
    "refuse-before": "refused reserve, before the refusal counters",
    "step": "persist step",
    "record-step": "record_step (token classes)",
    "finalize": "finalize (7 steps)",
    "lifecycle": "lifecycle: reserve, 7 steps, finish",
    "extend": "reserve + extend + release",
}
# "<workload>@baseline": the same workload at the version before this round (--baseline).
LABELS |= {f"{w}{BASELINE}": f"{LABELS[w]}, baseline" for w in BASELINED}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _top_waits(waits: Counter[str], n: int = 3) -> str:
    total = sum(waits.values())
    if not total:
        return ""
    return ", ".join(f"{what} {count * 100 / total:.0f}%" for what, count in waits.most_common(n))


def throughput_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per workload and accounts, ratios to simple-update (calls/s) and hot/spread."""
    su_runs = [r for r in runs if r["workload"] == "simple-update"]
    su_tps = _median([r["tps"] for r in su_runs])
    su_cpu = _median([r["server_cpu_ms_per_call"] for r in su_runs])
    su_by_round = {r["round"]: r["tps"] for r in su_runs}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["workload"], run["accounts"]), []).append(run)
    rows = []
    for (workload, accounts), group in groups.items():
        waits: Counter[str] = Counter()
        for run in group:
            waits.update(run["waits"])
        calls = _median([r["calls_per_s"] for r in group])
        cpu = _median([r["server_cpu_ms_per_call"] for r in group])
        # Each run against the simple-update runs that bracket it (its round's and the next).
        per_round = [
            r["calls_per_s"] / ((su_by_round[r["round"]] + su_by_round[r["round"] + 1]) / 2)
            for r in group
            if r["round"] in su_by_round and r["round"] + 1 in su_by_round
        ]
        statements: dict[str, list[float]] = {}
        for run in group:
            for s in run["statements"]:
                statements.setdefault(s["command"], []).append(s["latency_ms"])
        rows.append(
            {
                "workload": workload,
                "accounts": accounts,
                "runs": len(group),
                "tps": _median([r["tps"] for r in group]),
                "tps_min": min(r["tps"] for r in group),
                "tps_max": max(r["tps"] for r in group),
                "calls_per_tx": group[0]["calls_per_tx"],
                "calls_per_s": calls,
                "ratio_to_simple_update": (
                    _median(per_round) if per_round else (calls / su_tps if su_tps else 0.0)
                ),
                "ratio_of_medians": calls / su_tps if su_tps else 0.0,
                "ratio_per_round_min": min(per_round) if per_round else None,
                "ratio_per_round_max": max(per_round) if per_round else None,
                "server_cpu_ms_per_call": cpu,
                "cpu_per_call_vs_simple_update": cpu / su_cpu if su_cpu else 0.0,
                "server_cores": _median([r["cpu"]["server_cores"] for r in group]),
                "driver_cores": _median([r["cpu"]["driver_cores"] for r in group]),
                "machine_busy_cores": _median([r["cpu"]["machine_busy_cores"] for r in group]),
                "wal_bytes_per_call": _median([r["wal_bytes_per_call"] for r in group]),
                "wal_syncs_per_call": _median([r["wal_syncs_per_call"] for r in group]),
                "latency_ms": _median([r["latency_ms"] for r in group]),
                "statement_latency_ms": {k: _median(v) for k, v in statements.items()},
                "waits": dict(waits.most_common()),
                "top_waits": _top_waits(waits),
            }
        )
    by_key = {(r["workload"], r["accounts"]): r for r in rows}
    hot = []
    for workload in (
        "reserve",
        "reserve-budgets",
        "reserve-main",
        "step",
        "record-step",
        "finalize",
        "extend",
        "lifecycle",
    ):
        spread, heavy = by_key.get((workload, "spread")), by_key.get((workload, "hot"))
        if spread and heavy and spread["calls_per_s"]:
            hot.append(
                {
                    "workload": workload,
                    "spread_calls_per_s": spread["calls_per_s"],
                    "hot_calls_per_s": heavy["calls_per_s"],
                    "ratio": heavy["calls_per_s"] / spread["calls_per_s"],
                    "hot_top_waits": heavy["top_waits"],
                }
            )
    return {
        "simple_update_tps": su_tps,
        "rows": rows,
        "hot_vs_spread": hot,
        "record_step_vs_persist": record_step_vs_persist(runs),
        "reserve_comparisons": [
            *paired_ratio(runs, "reserve-budgets", "reserve"),
            *paired_ratio(runs, "reserve", "reserve-main"),
            *paired_ratio(runs, "reserve", "reserve-before"),
            *paired_ratio(runs, "refuse", "refuse-before"),
        ],
        "baseline_comparisons": baseline_comparisons(runs, by_key),
    }


def baseline_comparisons(
    runs: list[dict[str, Any]], by_key: dict[tuple[str, str], dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each baselined workload now against its "@baseline" run (the version before this
    round, in database bench_baseline), per accounts mode: paired_ratio's figures plus both
    sides' ratio to simple-update and WAL per call (medians of the rounds)."""
    found = []
    for workload in BASELINED:
        for c in paired_ratio(runs, workload, workload + BASELINE):
            now, then = by_key[(workload, c["accounts"])], by_key[(c["base"], c["accounts"])]
            c |= {
                "x_simple_update": now["ratio_to_simple_update"],
                "base_x_simple_update": then["ratio_to_simple_update"],
                "wal_bytes_per_call": now["wal_bytes_per_call"],
                "base_wal_bytes_per_call": then["wal_bytes_per_call"],
                "top_waits": now["top_waits"],
                "base_top_waits": then["top_waits"],
            }
            found.append(c)
    return found


def _statement_latency(run: dict[str, Any], function: str) -> float | None:
    """pgbench -r's latency (ms, commit included) of the run's statement calling
    ``tokentrack.<function>(``."""
    for s in run["statements"]:
        if f"tokentrack.{function}(" in s["command"]:
            return float(s["latency_ms"])
    return None


CALLS = {  # the reserving call of each reserve workload's script
    "reserve": "try_reserve_tokens",
    "reserve-budgets": "reserve",
    "reserve-main": "try_reserve_tokens",
    "reserve-before": "try_reserve_tokens",
    "refuse": "try_reserve_tokens",
    "refuse-before": "try_reserve_tokens",
    "reserve@baseline": "try_reserve_tokens",
    "reserve-budgets@baseline": "reserve",
}


def paired_ratio(runs: list[dict[str, Any]], workload: str, base: str) -> list[dict[str, Any]]:
    """``workload`` / ``base`` in calls/s (reserve + release cycles), per accounts mode: each
    round's ratio of the two runs (next to each other in the round), their median, the ratio
    of the medians; the same for the reserving call alone (pgbench -r's statement latency,
    base / workload: a call rate ratio) and for the server CPU per call."""
    found = []
    for accounts in ("spread", "hot"):
        of = {
            w: {r["round"]: r for r in runs if (r["workload"], r["accounts"]) == (w, accounts)}
            for w in (workload, base)
        }
        mine, theirs = of[workload], of[base]
        rounds = sorted(set(mine) & set(theirs))
        if not rounds:
            continue
        per_round = [
            mine[n]["calls_per_s"] / theirs[n]["calls_per_s"]
            for n in rounds
            if theirs[n]["calls_per_s"]
        ]
        call_per_round = []
        for n in rounds:
            if workload not in CALLS:  # a workload of several calls: no one call to time
                break
            mine_ms = _statement_latency(mine[n], CALLS[workload])
            theirs_ms = _statement_latency(theirs[n], CALLS[base])
            if mine_ms and theirs_ms:
                call_per_round.append(theirs_ms / mine_ms)
        mine_calls = _median([mine[n]["calls_per_s"] for n in rounds])
        theirs_calls = _median([theirs[n]["calls_per_s"] for n in rounds])
        found.append(
            {
                "workload": workload,
                "base": base,
                "accounts": accounts,
                "rounds": len(rounds),
                "calls_per_s": mine_calls,
                "base_calls_per_s": theirs_calls,
                "ratio": _median(per_round),
                "ratio_per_round": per_round,
                "ratio_of_medians": mine_calls / theirs_calls if theirs_calls else 0.0,
                "call_ratio": _median(call_per_round) if call_per_round else None,
                "call_ratio_per_round": call_per_round,
                "call_latency_ms": _median(
                    [
                        x
                        for n in rounds
                        if workload in CALLS and (x := _statement_latency(mine[n], CALLS[workload]))
                    ]
                ),
                "base_call_latency_ms": _median(
                    [
                        x
                        for n in rounds
                        if base in CALLS and (x := _statement_latency(theirs[n], CALLS[base]))
                    ]
                ),
                "cpu_ms_per_call": _median([mine[n]["server_cpu_ms_per_call"] for n in rounds]),
                "base_cpu_ms_per_call": _median(
                    [theirs[n]["server_cpu_ms_per_call"] for n in rounds]
                ),
            }
        )
    return found


def record_step_vs_persist(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """record_step / persist_step_usage in calls/s, per accounts mode: each round's record-step
    run against that round's step run (they run next to each other), the median of those
    ratios, and the ratio of the medians; the server CPU per call likewise."""
    found = []
    for accounts in ("spread", "hot"):
        of = {
            workload: {
                r["round"]: r
                for r in runs
                if (r["workload"], r["accounts"]) == (workload, accounts)
            }
            for workload in ("step", "record-step")
        }
        step, record = of["step"], of["record-step"]
        rounds = sorted(set(step) & set(record))
        if not rounds:
            continue
        per_round = [
            record[n]["calls_per_s"] / step[n]["calls_per_s"]
            for n in rounds
            if step[n]["calls_per_s"]
        ]
        cpu_per_round = [
            record[n]["server_cpu_ms_per_call"] / step[n]["server_cpu_ms_per_call"]
            for n in rounds
            if step[n]["server_cpu_ms_per_call"]
        ]
        step_calls = _median([step[n]["calls_per_s"] for n in rounds])
        record_calls = _median([record[n]["calls_per_s"] for n in rounds])
        found.append(
            {
                "accounts": accounts,
                "rounds": len(rounds),
                "persist_step_usage_calls_per_s": step_calls,
                "record_step_calls_per_s": record_calls,
                "ratio": _median(per_round),
                "ratio_per_round": per_round,
                "ratio_of_medians": record_calls / step_calls if step_calls else 0.0,
                "persist_step_usage_cpu_ms_per_call": _median(
                    [step[n]["server_cpu_ms_per_call"] for n in rounds]
                ),
                "record_step_cpu_ms_per_call": _median(
                    [record[n]["server_cpu_ms_per_call"] for n in rounds]
                ),
                "cpu_ratio": _median(cpu_per_round),
                "persist_step_usage_latency_ms": _median([step[n]["latency_ms"] for n in rounds]),
                "record_step_latency_ms": _median([record[n]["latency_ms"] for n in rounds]),
            }
        )
    return found


def client_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    pgbench = [r for r in runs if r.get("driver") == "pgbench"]
    client = [
        r
        for r in runs
        if r.get("driver") == "tokentrack_client" and r.get("pool", "create_pool") == "create_pool"
    ]
    default = [r for r in runs if r.get("pool") == "asyncpg"]
    pg_calls = _median([r["calls_per_s"] for r in pgbench])
    cl_calls = _median([r["calls_per_s"] for r in client])
    df_calls = _median([r["calls_per_s"] for r in default]) if default else 0.0
    waits: Counter[str] = Counter()
    for run in client:
        waits.update(run["waits"])
    return {
        "pgbench_calls_per_s": pg_calls,
        "client_calls_per_s": cl_calls,
        "ratio": cl_calls / pg_calls if pg_calls else 0.0,
        "tasks": client[0]["tasks"] if client else 0,
        "pgbench_driver_cores": _median([r["cpu"]["driver_cores"] for r in pgbench]),
        "client_driver_cores": _median([r["cpu"]["driver_cores"] for r in client]),
        "client_cpu_ms_per_call": _median([r["client_cpu_ms_per_call"] for r in client]),
        "pgbench_cpu_ms_per_call": _median(
            [r["cpu"]["driver_cpu_s"] * 1000 / max(r["transactions"] * 9, 1) for r in pgbench]
        ),
        "server_cpu_ms_per_call_client": _median([r["server_cpu_ms_per_call"] for r in client]),
        "server_cpu_ms_per_call_pgbench": _median([r["server_cpu_ms_per_call"] for r in pgbench]),
        "client_top_waits": _top_waits(waits),
        "default_pool": {
            "calls_per_s": df_calls,
            "ratio": df_calls / pg_calls if pg_calls else 0.0,
            "driver_cores": _median([r["cpu"]["driver_cores"] for r in default]),
            "cpu_ms_per_call": _median([r["client_cpu_ms_per_call"] for r in default]),
            "server_cpu_ms_per_call": _median([r["server_cpu_ms_per_call"] for r in default]),
        }
        if default
        else None,
    }


def replay_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the replay's two ways, and per round the ratio of their CPU per step."""
    found: dict[str, Any] = {}
    for mode in ("reports", "bare"):
        mine = [r for r in runs if r["mode"] == mode]
        found[mode] = {
            key: _median([r[key] for r in mine])
            for key in (
                "steps_per_s",
                "driver_cpu_ms_per_step",
                "server_cpu_ms_per_step",
                "cpu_ms_per_step",
                "wal_bytes_per_step",
            )
        }
        found[mode]["calls_per_step"] = _median([r["calls"] / max(r["steps"], 1) for r in mine])
        found[mode]["refused_share"] = _median([r["refused"] / max(r["reports"], 1) for r in mine])
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for run in runs:
        by_round.setdefault(run["round"], {})[run["mode"]] = run
    ratios = [
        pair["reports"]["cpu_ms_per_step"] / pair["bare"]["cpu_ms_per_step"]
        for pair in by_round.values()
        if "reports" in pair and "bare" in pair and pair["bare"]["cpu_ms_per_step"]
    ]
    rates = [
        pair["bare"]["steps_per_s"] / pair["reports"]["steps_per_s"]
        for pair in by_round.values()
        if "reports" in pair and "bare" in pair and pair["reports"]["steps_per_s"]
    ]
    found["cpu_ratio"] = _median(ratios)
    found["cpu_ratios"] = ratios
    found["rate_ratio"] = _median(rates)
    found["tasks"] = runs[0]["tasks"] if runs else 0
    return found


def growth_summary(result: dict[str, Any]) -> dict[str, Any]:
    small, large = (str(size) for size in result["sizes"])
    installed = result["as_installed"]
    rows = []
    for name, at_small in installed[small]["times"].items():
        at_large = installed[large]["times"][name]
        rows.append(
            {
                "name": name,
                "small_blocks": installed[small]["blocks"].get(name),
                "large_blocks": installed[large]["blocks"].get(name),
                "small_ms": at_small["median_ms"],
                "large_ms": at_large["median_ms"],
                "ratio": at_large["median_ms"] / at_small["median_ms"],
                "large_scans": installed[large]["scans"].get(name, []),
            }
        )
    return {"small": result["sizes"][0], "large": result["sizes"][1], "rows": rows}


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _ok(passed: bool) -> str:
    return "yes" if passed else "**no**"


def _n(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def _scans(scans: list[str]) -> str:
    """The scans worth showing: sequential ones and those of the big tables' secondary
    indexes (primary keys and the unique per-report lookups are the expected ones)."""
    keep = [
        s
        for s in scans
        if s.startswith("Seq Scan")
        or not any(k in s for k in ("_pkey", "one_per_report", "one_per_step", "one_active"))
    ]
    return "; ".join(keep)


def _blocks(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}"


def _size(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n // 1000}k"


def render(results: dict[str, Any]) -> str:
    cfg = results["config"]
    env = results["environment"]
    machine, pg = env["machine"], env["postgresql"]
    out: list[str] = []
    add = out.append
    add(f"# tokentrack benchmark ({results['started_at']})\n")
    add(
        f"Machine: {machine['cpus']} x {machine['cpu_model']}, {machine['memory_gb']} GB, "
        f"Linux {machine['kernel']}, data directory on {machine['data_directory_filesystem']}; "
        f"load average {machine['load_average_start'][0]:.2f} at the start, "
        f"{env.get('load_average_end', [0])[0]:.2f} at the end (a shared machine: read ratios).  "
    )
    add(f"Server: {pg['version'].split(' on ')[0]}; {pg['pgbench']}.  ")
    settings = pg["settings"]
    shown = (
        "fsync",
        "synchronous_commit",
        "full_page_writes",
        "shared_buffers",
        "max_wal_size",
        "wal_sync_method",
        "shared_preload_libraries",
        "track_wal_io_timing",
    )
    add(
        "Settings: "
        + ", ".join(f"{k} = {settings[k].split(' (')[0]}" for k in shown if k in settings)
        + " (everything else default).  "
    )
    add(
        f"pgbench: {cfg['clients']} clients, {cfg['threads']} threads, {cfg['duration']} s per run,"
        f" {cfg['rounds']} round(s) interleaved with simple-update (medians); each tokentrack call"
        " is its own transaction (autocommit), as the client makes them. Full run:"
        f" {results.get('wall_seconds', 0) / 60:.1f} min.\n"
    )

    if "throughput" in results:
        t = results["throughput"]["summary"]
        add("## Throughput vs pgbench simple-update (same server, same run)\n")
        add(
            "| workload | accounts | tx/s (min-max) | calls/tx | calls/s | x simple-update "
            "(per round) | ≥ 0.8 | server CPU ms/call (x s-u) | WAL B/call | main waits |"
        )
        add("|---|---|---|---|---|---|---|---|---|---|")
        for r in t["rows"]:
            su = r["workload"] == "simple-update"
            per_round = (
                f" ({r['ratio_per_round_min']:.2f}-{r['ratio_per_round_max']:.2f})"
                if r["ratio_per_round_min"] is not None and not su
                else ""
            )
            add(
                f"| {LABELS[r['workload']]} | {r['accounts']} | {_n(r['tps'])} "
                f"({_n(r['tps_min'])}-{_n(r['tps_max'])}) | {r['calls_per_tx']} | "
                f"{_n(r['calls_per_s'])} | {r['ratio_to_simple_update']:.2f}{per_round} | "
                f"{'' if su else _ok(r['ratio_to_simple_update'] >= TARGET_FUNCTION)} | "
                f"{r['server_cpu_ms_per_call']:.2f} ({r['cpu_per_call_vs_simple_update']:.1f}x) | "
                f"{_n(r['wal_bytes_per_call'])} | {r['top_waits']} |"
            )
        add("")
        add("### Hot account vs spread accounts\n")
        add(
            "| workload | spread calls/s | hot calls/s | hot / spread | >= 0.8 "
            "| hot account's waits |"
        )
        add("|---|---|---|---|---|---|")
        for h in t["hot_vs_spread"]:
            add(
                f"| {LABELS[h['workload']]} | {_n(h['spread_calls_per_s'])} | "
                f"{_n(h['hot_calls_per_s'])} | {h['ratio']:.2f} | {_ok(h['ratio'] >= TARGET_HOT)} "
                f"| {h['hot_top_waits']} |"
            )
        add("")
        if t.get("record_step_vs_persist"):
            add("### record_step vs persist_step_usage (the same priced step)\n")
            add(
                "Both record a new step of 1,200 input and 340 output tokens of a priced model "
                "on the same long-lived reports; record_step also gives its classes (400 cached "
                "input, 120 reasoning) as jsonb. The two runs of a round run next to each "
                "other (in turn first); the ratio is the median of the rounds' ratios.\n"
            )
            add(
                "| accounts | rounds | persist_step_usage calls/s | record_step calls/s | "
                "ratio (per round) | ≥ 0.9 | ratio of medians | server CPU ms/call "
                "persist -> record (ratio) | latency ms persist -> record |"
            )
            add("|---|---|---|---|---|---|---|---|---|")
            for c in t["record_step_vs_persist"]:
                rounds = ", ".join(f"{x:.2f}" for x in c["ratio_per_round"])
                add(
                    f"| {c['accounts']} | {c['rounds']} | "
                    f"{_n(c['persist_step_usage_calls_per_s'])} | "
                    f"{_n(c['record_step_calls_per_s'])} | {c['ratio']:.2f} ({rounds}) | "
                    f"{_ok(c['ratio'] >= TARGET_RECORD_STEP)} | {c['ratio_of_medians']:.2f} | "
                    f"{c['persist_step_usage_cpu_ms_per_call']:.3f} -> "
                    f"{c['record_step_cpu_ms_per_call']:.3f} ({c['cpu_ratio']:.2f}) | "
                    f"{c['persist_step_usage_latency_ms']:.2f} -> "
                    f"{c['record_step_latency_ms']:.2f} |"
                )
            add("")

        if t.get("reserve_comparisons"):
            add("### Budgets: reserve with three budgets, and try_reserve_tokens before them\n")
            add(
                'reserve (3 budgets): `reserve(a, r, {"tokens": 10000}, ARRAY[team, key])` '
                "on accounts that each have a month budget of their own (subject NULL), a "
                "team's day and a key's minute (limits never reached), then "
                "finalize_report_usage releases it; try_reserve_tokens: the same cycle with "
                "`try_reserve_tokens(a, r, 10000)` on the plain accounts (no budget); main's "
                "SQL: that cycle in database bench_main, tokentrack rolled back to version "
                "20261203000000 (the version before budgets). The three runs of a round run "
                "next to each other (each first in turn); ratios are the medians of the rounds' "
                "ratios. Call alone: the reserving statement's latency (pgbench -r, commit "
                "included), as a rate ratio.\n"
            )
            add(
                "| comparison | accounts | rounds | calls/s | base calls/s | ratio (per round) | "
                "target | ratio of medians | call alone: ratio (latency ms) | "
                "server CPU ms/call |"
            )
            add("|---|---|---|---|---|---|---|---|---|---|")
            for c in t["reserve_comparisons"]:
                target = TARGET_BUDGETS if c["workload"] == "reserve-budgets" else TARGET_NOT_SLOWER
                rounds = ", ".join(f"{x:.2f}" for x in c["ratio_per_round"])
                call = (
                    f"{c['call_ratio']:.2f} ({c['call_latency_ms']:.2f} vs "
                    f"{c['base_call_latency_ms']:.2f})"
                    if c["call_ratio"] is not None
                    else ""
                )
                add(
                    f"| {LABELS[c['workload']]} / {LABELS[c['base']]} | {c['accounts']} | "
                    f"{c['rounds']} | {_n(c['calls_per_s'])} | {_n(c['base_calls_per_s'])} | "
                    f"{c['ratio']:.2f} ({rounds}) | ≥ {target:.1f}: "
                    f"{_ok(c['ratio'] >= target)} | {c['ratio_of_medians']:.2f} | {call} | "
                    f"{c['cpu_ms_per_call']:.3f} vs {c['base_cpu_ms_per_call']:.3f} |"
                )
            add("")

        if t.get("baseline_comparisons"):
            add(
                f"### This round's change: now vs version {cfg.get('baseline')} (before and "
                "after, side by side)\n"
            )
            add(
                "Each workload in database bench (this tree's SQL) and in database "
                "bench_baseline (tokentrack installed, then rolled back by the migrator to the "
                "version before this round, which restores that version's function texts and "
                "schema), the two runs next to each other in every round (each first in turn). "
                "Ratios are medians of the rounds' ratios; x simple-update as in the table "
                "above.\n"
            )
            add(
                "| workload | accounts | baseline calls/s (x s-u) | now calls/s (x s-u) | "
                "now / baseline (per round) | now ≥ 0.8 s-u | WAL B/call baseline -> now | "
                "server CPU ms/call baseline -> now | now: main waits |"
            )
            add("|---|---|---|---|---|---|---|---|---|")
            for c in t["baseline_comparisons"]:
                rounds = ", ".join(f"{x:.2f}" for x in c["ratio_per_round"])
                add(
                    f"| {LABELS[c['workload']]} | {c['accounts']} | "
                    f"{_n(c['base_calls_per_s'])} ({c['base_x_simple_update']:.2f}) | "
                    f"{_n(c['calls_per_s'])} ({c['x_simple_update']:.2f}) | "
                    f"{c['ratio']:.2f} ({rounds}) | "
                    f"{_ok(c['x_simple_update'] >= TARGET_FUNCTION)} | "
                    f"{_n(c['base_wal_bytes_per_call'])} -> {_n(c['wal_bytes_per_call'])} | "
                    f"{c['base_cpu_ms_per_call']:.3f} -> {c['cpu_ms_per_call']:.3f} | "
                    f"{c['top_waits']} |"
                )
            add("")

    if "client" in results:
        c = results["client"]["summary"]
        add(f"## The client: lifecycle through tokentrack_client ({c['tasks']} asyncio tasks)\n")
        add(
            "| driver | calls/s | ratio | ≥ 0.8 | driver CPU (cores) | driver CPU ms/call |"
            " server CPU ms/call |"
        )
        add("|---|---|---|---|---|---|---|")
        add(
            f"| pgbench lifecycle.sql | {_n(c['pgbench_calls_per_s'])} | 1.00 | | "
            f"{c['pgbench_driver_cores']:.2f} | {c['pgbench_cpu_ms_per_call']:.3f} | "
            f"{c['server_cpu_ms_per_call_pgbench']:.2f} |"
        )
        add(
            f"| TokenTracker.track_report (tokentrack_client.create_pool) |"
            f" {_n(c['client_calls_per_s'])} | {c['ratio']:.2f} | "
            f"{_ok(c['ratio'] >= TARGET_CLIENT)} | {c['client_driver_cores']:.2f} | "
            f"{c['client_cpu_ms_per_call']:.3f} | {c['server_cpu_ms_per_call_client']:.2f} |"
        )
        if c.get("default_pool"):
            d = c["default_pool"]
            add(
                f"| TokenTracker.track_report (asyncpg.create_pool: its reset query on every"
                f" release) | {_n(d['calls_per_s'])} | {d['ratio']:.2f} | "
                f"{_ok(d['ratio'] >= TARGET_CLIENT)} | {d['driver_cores']:.2f} | "
                f"{d['cpu_ms_per_call']:.3f} | {d['server_cpu_ms_per_call']:.2f} |"
            )
        add("")
        add(
            f"Driver CPU per call ≤ {TARGET_CLIENT_CPU_MS} ms: "
            f"{_ok(c['client_cpu_ms_per_call'] <= TARGET_CLIENT_CPU_MS)}.\n"
        )
        if results["client"].get("replay_summary"):
            rp = results["client"]["replay_summary"]
            add(
                f"### A replayed workload: a report's steps vs the same steps as bare"
                f" increment_usage ({rp['tasks']} asyncio tasks)\n"
            )
            add(
                "Reports of 1 to 7 steps on Zipf-skewed accounts, one in twenty refused (an"
                " account with little budget left), each through track_report; then the same"
                " steps (same accounts, tokens, order and concurrency) as bare increment_usage"
                " calls through the client, the two in interleaved rounds. CPU is the driver's"
                " and the server's over the steps recorded; the ratio is reports / bare per"
                " round (median).\n"
            )
            add(
                "| way | steps/s | calls/step | refused | driver CPU ms/step |"
                " server CPU ms/step | CPU ms/step | WAL B/step | ratio | ≤ 1.25 |"
            )
            add("|---|---|---|---|---|---|---|---|---|---|")
            for mode, label in (
                ("bare", "increment_usage per step"),
                ("reports", "track_report (reserve, steps, finish)"),
            ):
                m = rp[mode]
                ratio = rp["cpu_ratio"] if mode == "reports" else 1.0
                ok = _ok(ratio <= TARGET_REPLAY) if mode == "reports" else ""
                add(
                    f"| {label} | {_n(m['steps_per_s'])} | {m['calls_per_step']:.2f} |"
                    f" {m['refused_share']:.0%} | {m['driver_cpu_ms_per_step']:.3f} |"
                    f" {m['server_cpu_ms_per_step']:.3f} | {m['cpu_ms_per_step']:.3f} |"
                    f" {_n(m['wal_bytes_per_step'])} | {ratio:.2f} | {ok} |"
                )
            per_round = ", ".join(f"{r:.2f}" for r in rp["cpu_ratios"])
            add(
                f"\nCPU per step, reports / bare, by round: {per_round}; steps/s, bare /"
                f" reports: {rp['rate_ratio']:.2f}.\n"
            )

    if "growth" in results:
        gr = results["growth"]
        g = gr["summary"]
        small, large = _size(g["small"]), _size(g["large"])
        add(f"## Growth: {small} vs {large} existing reservations and steps (one client)\n")
        add(
            "Median time of one call (server execution and round trip, commit not included), "
            "both databases on the same server, timed in interleaved rounds. Scans: "
            "what the function's statements (auto_explain, nested) or the query use at "
            f"{large} that touch a large table by more than a key. Buffers: shared blocks hit "
            "or read per call (EXPLAIN ANALYZE BUFFERS through auto_explain, nested statements "
            "included): the growth measure that machine load does not blur.\n"
        )
        add(
            f"| function or query | {small} ms | {large} ms | ratio | <= 1.2 | buffers "
            f"{small} -> {large} | scans at {large} |"
        )
        add("|---" * 7 + "|")
        for r in g["rows"]:
            add(
                f"| {r['name']} | {r['small_ms']:.3f} | {r['large_ms']:.3f} | {r['ratio']:.2f} | "
                f"{_ok(r['ratio'] <= TARGET_GROWTH)} | "
                f"{_blocks(r['small_blocks'])} -> {_blocks(r['large_blocks'])} | "
                f"{_scans(r['large_scans'])} |"
            )
        add("")
        rec = gr["reconcile_all_s"]
        add(
            "`tokentrack monitor` checks usage accuracy with `reconcile_recent()` (the rows "
            "after the verified point, which `exporter: advance_reconcile_point()` moves: here "
            "before each round, so each check reads one round's lifecycles); "
            f"`monitor --full` runs `reconcile()` of every period, an audit that reads "
            f"everything by design: {rec[str(g['small'])]:.2f} s at {small}, "
            f"{rec[str(g['large'])]:.1f} s at {large}.\n"
        )

    if "sweep" in results:
        s = results["sweep"]
        add(f"## The sweep ({s['steps_per_reservation']} steps per expired reservation)\n")
        add(
            "Each batch is one transaction, timed from its SELECT to the end of its COMMIT: "
            "the bound of how long it held its reservation, period and report locks.\n"
        )
        add(
            "| how | backlog | batch | total s | rows/s | longest batch ms | median | p95 | "
            "ms per reservation | <= 100 ms | first -> last full batches ms | batch scan |"
        )
        add("|---|---|---|---|---|---|---|---|---|---|---|---|")
        runs = [s["batched"], *s.get("smaller_batches", [])]
        for b in runs:
            add(
                f"| expire_reservations per transaction | {_n(b['backlog'])} | {b['batch']} | "
                f"{b['total_s']:.1f} | {_n(b['rows_per_s'])} | {b['longest_batch_ms']:.0f} | "
                f"{b['median_batch_ms']:.0f} | {b['p95_batch_ms']:.0f} | "
                f"{b['median_ms_per_reservation']:.2f} | "
                f"{_ok(b['longest_batch_ms'] <= TARGET_SWEEP_MS)} | "
                f"{b['first_batches_ms'][:3]} -> {b['last_full_batches_ms'][-3:]} | "
                f"{'; '.join(b['batch_scan'])} |"
            )
        p = s["procedure"]
        add(
            f"| CALL sweep_expired_reservations | {_n(p['backlog'])} | {p['batch']} | "
            f"{p['total_s']:.1f} | {_n(p['rows_per_s'])} | | | | | | | |"
        )
        add("")
        if "side_by_side" in s:
            sbs = s["side_by_side"]
            add(
                f"Side by side, batches of {sbs['batch']} taking turns on one backlog of "
                f"{_n(sbs['backlog'])}: the current sweep (set-based) and the previous one "
                f"(version 20261213000000, finalize_reservation per reservation); full batches "
                f"only. Current / previous ms per reservation: {sbs['ratio_ms']:.2f}.\n"
            )
            add(
                "| sweep | batches | median batch ms | longest | ms per reservation | "
                "server ms per reservation | WAL B per reservation |"
            )
            add("|---|---|---|---|---|---|---|")
            for which in ("current", "previous"):
                r = sbs[which]
                add(
                    f"| {which} | {r['batches']} | {r['median_batch_ms']:.1f} | "
                    f"{r['longest_batch_ms']:.1f} | {r['median_ms_per_reservation']:.3f} | "
                    f"{r['server_ms_per_reservation']:.3f} | "
                    f"{_n(r['wal_bytes_per_reservation'])} |"
                )
            add("")

    if "profile" in results:
        add("## Where the time goes (pg_stat_statements, track = all)\n")
        for key in (
            "simple-update/-",
            "reserve/spread",
            "reserve-budgets/spread",
            "reserve-budgets/hot",
            "step/spread",
            "record-step/spread",
            "lifecycle/spread",
            "lifecycle/hot",
            "finalize/spread",
        ):
            if key not in results["profile"]:
                continue
            prof = results["profile"][key]
            calls = max(prof["calls"], 1)
            add(f"**{key}** ({_n(prof['calls'])} calls): statements by total execution time\n")
            add("| top | statement | calls | mean ms | ms per call of the workload | WAL B/call |")
            add("|---|---|---|---|---|---|")
            for st in prof["statements"][:10]:
                text = st["query"][:90].replace("|", "\\|")
                add(
                    f"| {'yes' if st['toplevel'] else ''} | `{text}` | {_n(st['calls'])} | "
                    f"{st['mean_exec_time']:.3f} | {st['total_exec_time'] / calls:.3f} | "
                    f"{_n(st['wal_bytes'] / max(st['calls'], 1))} |"
                )
            add("")
        if "sweep" in results:
            prof = results["sweep"].get("profile", {})
            add(
                f"**sweep** (expire_reservations({prof.get('batch')}) over "
                f"{_n(prof.get('backlog', 0))} expired reservations, a run of its own): "
                "statements by total execution time\n"
            )
            add("| top | statement | calls | mean ms | total ms |")
            add("|---|---|---|---|---|")
            for st in results["sweep"].get("profile", {}).get("pg_stat_statements", [])[:8]:
                text = st["query"][:90].replace("|", "\\|")
                add(
                    f"| {'yes' if st['toplevel'] else ''} | `{text}` | {_n(st['calls'])} | "
                    f"{st['mean_exec_time']:.3f} | {_n(st['total_exec_time'])} |"
                )
            add("")

    checks = []
    for key in (
        "bench_db_reconcile_ok",
        "bench_main_db_reconcile_ok",
        "growth_small_db_reconcile_ok",
        "growth_large_db_reconcile_ok",
    ):
        if key in results:
            checks.append(f"{key.split('_reconcile')[0]}: {'ok' if results[key] else 'FAILED'}")
    if checks:
        add("reconcile() at the end: " + ", ".join(checks) + ".\n")
    return "\n".join(out) + "\n"
