-- Rollback of version 20251219000000: add_usage_tracking
--
-- billing-tables: accounts, usage_periods, reports, usage_ledger
--
-- Every table of this version holds billing data (listed parents first, the order a restore
-- fills them): while any holds a row, `tokentrack migrate rollback` refuses to run this file,
-- and `--archive` copies their rows into tokentrack_archive first (docs/INSTALL.md,
-- "Rollback and billing data").
--
-- Removes exactly what that version added: its tables, trigger function, the
-- current_account_id() hook and the schema grants. The functions of sql/functions/ that this
-- version introduced (open_usage_period, increment_usage, lock_active_period) are dropped by
-- the migrator before this file runs (it records their signatures in
-- tokentrack.schema_functions). The roles tokentrack_service and tokentrack_reader are
-- cluster-wide and may be granted to login roles: they are kept.
-- The schema tokentrack and tokentrack.schema_migrations belong to the installer and stay.
-- Refused (by the dependency of version 20260108000000's tables) while that version is applied.

DROP TABLE tokentrack.usage_ledger;
DROP TABLE tokentrack.reports;
DROP TABLE tokentrack.usage_periods;
DROP TABLE tokentrack.accounts;

DROP FUNCTION tokentrack.usage_ledger_is_append_only();
DROP FUNCTION tokentrack.current_account_id();

REVOKE USAGE ON SCHEMA tokentrack FROM tokentrack_service, tokentrack_reader;
