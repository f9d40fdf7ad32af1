-- Version 20261214000000: write_path
--
-- The write path reworked for the least work per call that keeps every invariant (issue #16),
-- with the contract unchanged and existing data migrated in place. Each part below says what
-- it changes, why, what it locks while it runs, and how the rollback undoes it exactly.

-- Pin name resolution for this version's transaction (see version 20251219000000).
SET LOCAL search_path = pg_catalog, pg_temp;

-- Part bperf: the reserve path in fewer statements (functions only, no schema change)
--
-- reserve_usage, reserve, try_reserve_tokens, check_estimate, lock_budgets (header) and
-- lock_reservation_budgets are reworked (their version-13 text is in
-- sql/history/20261213000000): the same answers, locks (rank 3 then rank 4 in id order) and
-- writes in fewer statements and calls. No table, index or row changes, so nothing is
-- migrated and nothing is locked while this part runs beyond CREATE OR REPLACE FUNCTION.
-- Rollback: nothing to undo here; the migrator restores the functions' version-13 texts.
