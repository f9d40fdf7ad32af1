-- Rollback of version 20260108000000: antifragile_token_tracking
--
-- billing-tables: report_reservations, report_step_usage
--
-- Both tables hold billing data: while either holds a row, `tokentrack migrate rollback`
-- refuses to run this file; `--archive` first bills every active reservation as the sweep
-- does, then copies both tables into tokentrack_archive (docs/INSTALL.md, "Rollback and
-- billing data"), and the next install of this version restores them.
--
-- Removes exactly what that version added: its two tables (with their indexes, policies and
-- grants). The functions of sql/functions/ that this version introduced are dropped by the
-- migrator before this file runs, and every function it changed gets its previous definition
-- back from tokentrack.schema_functions after it. Nothing of version 20251219000000 is
-- touched: usage_periods, reports, usage_ledger and increment_usage stay exactly as they are.
-- The step and reservation history is dropped with the tables (kept in tokentrack_archive
-- with --archive); what they billed stays in usage_periods.tokens_used and the usage ledger.

DROP TABLE tokentrack.report_step_usage;
DROP TABLE tokentrack.report_reservations;
