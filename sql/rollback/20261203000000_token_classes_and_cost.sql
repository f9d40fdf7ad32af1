-- Rollback of version 20261203000000: token_classes_and_cost
--
-- billing-tables: model_prices
-- billing-columns: report_step_usage(cached_input_tokens, cache_write_tokens, reasoning_tokens, cost_micros)
--
-- model_prices explains every stored cost, and the four step columns hold usage the older
-- schema has no place for: while the table holds a row, or a step holds a class or a cost,
-- `tokentrack migrate rollback` refuses to run this file; `--archive` keeps both in
-- tokentrack_archive (docs/INSTALL.md, "Rollback and billing data"), and the next install of
-- this version restores them.
--
-- Removes exactly what that version added: the price table (its index, triggers and grants)
-- with its trigger function, and the four columns of report_step_usage with their
-- constraints. The functions that version introduced are dropped by the migrator before this
-- file runs; persist_step_usage and finalize_reservation get their previous definitions back
-- from tokentrack.schema_functions after it. Steps, reservations and periods stay as they
-- are: input, output and total tokens, and everything they billed, are untouched.

DROP TABLE tokentrack.model_prices;
DROP FUNCTION tokentrack.model_prices_are_immutable();

ALTER TABLE tokentrack.report_step_usage
DROP COLUMN cost_micros,
DROP COLUMN reasoning_tokens,
DROP COLUMN cache_write_tokens,
DROP COLUMN cached_input_tokens;
