-- Rollback of version 20261210000000: budgets
--
-- billing-tables: budgets, budget_changes, budget_windows
-- billing-columns: report_reservations(holds, reserved_cost_micros)
--
-- The budgets, their change history and their windows' use are billing data, and so are the
-- holds of reservations: while a table holds a row, or a reservation holds a budget or a cost
-- estimate, `tokentrack migrate rollback` refuses to run this file; `--archive` keeps them in
-- tokentrack_archive (docs/INSTALL.md, "Rollback and billing data") and the next install of
-- this version restores them.
--
-- Removes exactly what that version added: the three tables (indexes, policies, triggers,
-- grants), the trigger function, the estimate type and the two reservation columns. The
-- functions that version introduced are dropped by the migrator before this file runs; the
-- functions it reworked get their previous definitions back after it. Periods, reports,
-- reservations and steps are untouched otherwise: what the reports billed stays in
-- usage_periods.tokens_used and the usage ledger.

DROP TABLE tokentrack.budget_windows;
DROP TABLE tokentrack.budget_changes;
DROP TABLE tokentrack.budgets;
DROP FUNCTION tokentrack.budget_changes_are_append_only();
DROP TYPE tokentrack.reservation_estimate;

ALTER TABLE tokentrack.report_reservations
DROP COLUMN reserved_cost_micros,
DROP COLUMN holds;
