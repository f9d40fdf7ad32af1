-- Rollback of version 20260108000000: antifragile_token_tracking
--
-- Removes exactly what that version added: its two tables (with their indexes, policies and
-- grants). The functions of sql/functions/ that this version introduced are dropped by the
-- migrator before this file runs, and every function it changed gets its previous definition
-- back from tokentrack.schema_functions after it. Nothing of version 20251219000000 is
-- touched: usage_periods, reports, usage_ledger and increment_usage stay exactly as they are.
-- The step and reservation history is dropped with the tables; what they billed stays in
-- usage_periods.tokens_used and in the usage ledger.

DROP TABLE tokentrack.report_step_usage;
DROP TABLE tokentrack.report_reservations;
