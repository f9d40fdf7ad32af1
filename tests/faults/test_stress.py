"""`make stress`, short: the stress runner's command line for 15 seconds (CI's share of it).

Backend kills, lock_timeout and statement_timeout faults against the concurrent workload
(budgets, subjects and extensions included), then every invariant; the runner exits 1 on any
violation. Long runs:
``make stress DURATION=600 SEED=42``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

STRESS = Path(__file__).resolve().parents[1] / "support" / "stress.py"


def test_short_stress_run_reports_zero_violations() -> None:
    result = subprocess.run(
        [sys.executable, str(STRESS), "--duration", "15", "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    line = next(line for line in result.stdout.splitlines() if line.startswith("stress seed=1 "))
    numbers = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
    assert numbers["invariant_violations"] == 0, output
    # The workload and its faults ran (the other counters are in the line, for the reader).
    assert numbers["faults_injected"] > 0, line
    assert numbers["reports"] > 0, line
    assert numbers["steps"] > 0, line
    assert numbers["budget_refusals"] > 0, line
    assert numbers["extensions"] > 0, line
