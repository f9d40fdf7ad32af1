-- Rollback of version 20261211000000: credits
--
-- billing-tables: credit_grants, usage_adjustments, report_refunds
--
-- Grants, adjustments and refunds are billing records: while one of the tables holds a row,
-- `tokentrack migrate rollback` refuses to run this file; `--archive` keeps their rows in
-- tokentrack_archive (docs/INSTALL.md, "Rollback and billing data") and the next install of
-- this version restores them. Until then reconcile (at the budgets version) cannot explain the
-- used amounts and tokens_used that adjustments and refunds changed: they stay as they are.
--
-- Removes exactly what that version added: the three tables (indexes, policies, triggers,
-- grants), the trigger function and usage_periods' key (account_id, id). The functions that
-- version introduced are dropped by the migrator before this file runs; the functions it
-- reworked get their previous definitions back after it.

DROP TABLE tokentrack.report_refunds;
DROP TABLE tokentrack.usage_adjustments;
DROP TABLE tokentrack.credit_grants;
DROP FUNCTION tokentrack.credit_records_are_append_only();

ALTER TABLE tokentrack.usage_periods DROP CONSTRAINT usage_periods_account_id_key;
