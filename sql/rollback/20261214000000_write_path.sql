-- Rollback of version 20261214000000: write_path
--
-- billing-tables: reconcile_point, reconcile_periods, reconcile_windows
--
-- Undoes exactly what that version changed; the functions it reworked get their previous
-- definitions back from the migrator after this file runs.

SET LOCAL search_path = pg_catalog, pg_temp;

-- Part recon: the incremental reconcile's verified point. Its tables hold sums derived from
-- the append-only ledger, declared above so that a rollback after advance_reconcile_point()
-- has run refuses or, with ARCHIVE, keeps them (the next install moves them back: sums of a
-- prefix of an append-only ledger stay true); where it never ran they are empty. The migrator
-- has dropped the functions of this version (reconcile_recent, advance_reconcile_point) before
-- this file runs, and restores reconcile() from sql/history/20261213000000/reconcile.sql after.
DROP TABLE tokentrack.reconcile_windows;
DROP TABLE tokentrack.reconcile_periods;
DROP TABLE tokentrack.reconcile_point;
