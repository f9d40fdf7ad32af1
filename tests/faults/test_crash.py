"""The whole server killed with SIGKILL during a running workload, and restarted.

The stress workload (tests/support/stress.py) runs against a server of its own with fsync,
synchronous_commit and full_page_writes on, so that a commit the client saw acknowledged is
durable. Three times, each after 150 more acknowledged steps, every server process is killed
with SIGKILL in the middle of the workload's calls and the server is restarted (crash
recovery). The workers retry what was
in flight (an interrupted increment_usage is an unknown outcome). After the last recovery:
every step whose persist call was acknowledged is there with its numbers, every
acknowledged billing matches its reservation, nothing is billed twice, and once every
reservation is moved past its expiry and swept, every invariant holds.
"""

from __future__ import annotations

from stress import Config, run_with_own_server


def test_server_killed_mid_workload_loses_no_acknowledged_step() -> None:
    summary = run_with_own_server(
        Config(
            duration=300,  # a bound only: the run ends after the third crash and recovery
            seed=11,
            workers=6,
            crashes=3,
            crash_after_steps=150,
            kill_backends=False,
            lock_faults=False,
        )
    )
    assert summary.server_settings == {
        "fsync": "on",
        "synchronous_commit": "on",
        "full_page_writes": "on",
    }
    assert summary.violations == [], summary.line()
    stats = summary.stats
    assert stats.crashes == 3, summary.line()
    assert stats.retries > 0, summary.line()  # the crashes did interrupt calls in flight
    assert stats.steps >= 4 * 150, summary.line()
