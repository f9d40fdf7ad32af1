-- Version 20261214000000: write_path
--
-- The write path reworked for the least work per call that keeps every invariant (issue #16),
-- with the contract unchanged and existing data migrated in place. Each part below says what
-- it changes, why, what it locks while it runs, and how the rollback undoes it exactly.

-- Pin name resolution for this version's transaction (see version 20251219000000).
SET LOCAL search_path = pg_catalog, pg_temp;

-- Part sweep: the set-based expiry sweep (no schema change)
--
-- expire_reservations bills a whole batch in one statement per kind of write (the periods one
-- UPDATE each) instead of finalize_reservation per reservation; cleanup_expired_reservations
-- and sweep_expired_reservations only have their headers brought up to date. Function files
-- only: their version-13 texts are in sql/history/20261213000000, which the rollback of this
-- version re-executes. No table, index or data is touched, so the upgrade costs nothing on a
-- big table and takes no lock beyond replacing the three routines.
