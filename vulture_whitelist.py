"""What vulture (``make lint``) cannot see being used: each entry says who uses it.

vulture reads this file as code: a name written here counts as used. Add a name only when
a framework or the users of the public API use it, never to silence dead code. Hypothesis'
``@rule``, ``@initialize`` and ``@invariant`` methods are left out by ``--ignore-decorators``
in the Makefile.
"""

# ruff: noqa  (read by vulture only, never imported or run: ``_.x`` marks an attribute x)

# The parameters of __exit__ / __aexit__ (testing.PostgresServer, tracking.ReportTracker):
# the protocol passes them, the code does not need them.
exc_type

# bench/run.py: _interrupt(signum, frame) is a signal handler; signal passes the frame.
frame

# pytest reads these from tests/conftest.py by name (pytestmark: from a test module).
pytest_plugins
pytest_report_header
pytestmark
# tests/conftest.py: --missing-extension and the requires_extension marker (make test PG=N).
pytest_addoption
pytest_configure
pytest_collection_modifyitems
pytest_terminal_summary

# Hypothesis calls RuleBasedStateMachine.teardown after each run (tests/invariants/test_machine.py).
_.teardown

# Public API documented in docs/API.md, read by users, not by the package itself:
_.retry_policy  # TokenTracker.retry_policy: the policy the tracker retries with
_.ended_from_outside  # ReportTracker.ended_from_outside: the outcome set from outside
_.ledger_entry_id  # Discrepancy.ledger_entry_id: the ledger entry a ledger_entry check names

# LiteLLM reads it (tests/client/test_litellm_integration.py: no banner on mocked errors).
_.suppress_debug_info
