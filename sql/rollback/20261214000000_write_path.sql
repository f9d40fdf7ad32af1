-- Rollback of version 20261214000000: write_path
--
-- billing-tables: reconcile_point, reconcile_periods, reconcile_windows
--
-- Undoes exactly what that version changed; the functions it reworked get their previous
-- definitions back from the migrator after this file runs.

SET LOCAL search_path = pg_catalog, pg_temp;

-- Part wpath: step billing and persist WAL. Undoes it exactly: the immutability row trigger
-- BEFORE again, the id defaults, the guard trigger, the three foreign keys (each validated by
-- a scan of the table), fillfactor and the two indexes (a scan of report_step_usage each).

DROP TRIGGER report_step_usage_billed_immutable ON tokentrack.report_step_usage;
CREATE TRIGGER report_step_usage_billed_immutable
BEFORE UPDATE OR DELETE ON tokentrack.report_step_usage
FOR EACH ROW WHEN (old.billed_at IS NOT NULL)
EXECUTE FUNCTION tokentrack.report_step_usage_billed_is_immutable();

ALTER TABLE tokentrack.report_step_usage ALTER COLUMN id SET DEFAULT gen_random_uuid();
ALTER TABLE tokentrack.report_reservations ALTER COLUMN id SET DEFAULT gen_random_uuid();
DROP FUNCTION tokentrack.uuid_v7();

DROP TRIGGER accounts_keep_billing_rows ON tokentrack.accounts;
DROP FUNCTION tokentrack.accounts_keep_billing_rows();

ALTER TABLE tokentrack.report_step_usage
ADD CONSTRAINT report_step_usage_account_fk FOREIGN KEY (account_id)
REFERENCES tokentrack.accounts (id) ON DELETE RESTRICT,
ADD CONSTRAINT report_step_usage_billed_period_fk FOREIGN KEY (billed_period_id)
REFERENCES tokentrack.usage_periods (id) ON DELETE RESTRICT,
ADD CONSTRAINT report_step_usage_billing_entry_fk FOREIGN KEY (billing_entry_id)
REFERENCES tokentrack.usage_ledger (id) ON DELETE RESTRICT;

ALTER TABLE tokentrack.report_step_usage RESET (fillfactor);
CREATE INDEX report_step_usage_billing_entry_idx
ON tokentrack.report_step_usage (billing_entry_id) WHERE billing_entry_id IS NOT NULL;
CREATE INDEX report_step_usage_billed_period_idx
ON tokentrack.report_step_usage (billed_period_id) WHERE billed_period_id IS NOT NULL;

-- Part sweep: nothing to undo here (no schema change); the migrator restores
-- expire_reservations, cleanup_expired_reservations and sweep_expired_reservations from their
-- version-13 texts (sql/history/20261213000000).

-- Part bperf: nothing (functions only; the migrator restores their version-13 definitions
-- from the recorded history).

-- Part recon: the incremental reconcile's verified point. Its tables hold sums derived from
-- the append-only ledger, declared above so that a rollback after advance_reconcile_point()
-- has run refuses or, with ARCHIVE, keeps them (the next install moves them back: sums of a
-- prefix of an append-only ledger stay true); where it never ran they are empty. The migrator
-- has dropped the functions of this version (reconcile_recent, advance_reconcile_point) before
-- this file runs, and restores reconcile() from sql/history/20261213000000/reconcile.sql after.
DROP TABLE tokentrack.reconcile_windows;
DROP TABLE tokentrack.reconcile_periods;
DROP TABLE tokentrack.reconcile_point;
