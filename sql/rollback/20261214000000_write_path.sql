-- Rollback of version 20261214000000: write_path
--
-- billing-tables: none
--
-- Undoes exactly what that version changed; the functions it reworked get their previous
-- definitions back from the migrator after this file runs.

SET LOCAL search_path = pg_catalog, pg_temp;

-- Part sweep: nothing to undo here (no schema change); the migrator restores
-- expire_reservations, cleanup_expired_reservations and sweep_expired_reservations from their
-- version-13 texts (sql/history/20261213000000).
