-- Version 20261214000000: write_path
--
-- The write path reworked for the least work per call that keeps every invariant (issue #16),
-- with the contract unchanged and existing data migrated in place. Each part below says what
-- it changes, why, what it locks while it runs, and how the rollback undoes it exactly.

-- Pin name resolution for this version's transaction (see version 20251219000000).
SET LOCAL search_path = pg_catalog, pg_temp;

-- Part wpath: step billing and persist WAL (issue #16)
--
-- What it changes, and why (bench/wal_per_call.py measures each; docs/REVIEW.md has the
-- figures):
--   * report_step_usage loses report_step_usage_billing_entry_idx and
--     report_step_usage_billed_period_idx, and gets fillfactor 70 (in bench/wal_per_call.py 85
--     left 12 % of the billing updates non-HOT, 80 11 %, 70 none: a page must hold the new
--     versions of its rows until the old ones are pruned; the table's new pages are 30 % empty).
--     Billing sets billed_at, billed_period_id and billing_entry_id on every step; while indexes covered two of them no
--     billing UPDATE was HOT, so each billed step got a new heap tuple on another page and a new
--     entry in every index of the table (5). Without them (the steps of a report are found by
--     report_step_usage_one_per_step (report_id, step_name); billing_totals, refund_report,
--     reconcile and the TRUNCATE guard below read them so) and with room left on each page,
--     billing is a HOT update on the same page with prefix/suffix-compressed WAL.
--   * The foreign keys report_step_usage_billed_period_fk and report_step_usage_billing_entry_fk
--     go: their RI query ran once per billed step, for a row billing itself holds (the period,
--     FOR UPDATE) or has just written (the ledger row). Every billed step's billing_entry_id is
--     the usage_ledger row written in the same transaction, and its billed_period_id that row's
--     period_id; usage_ledger is append-only (never deleted, never truncated) and
--     usage_ledger_period_fk keeps refusing the DELETE of that period.
--   * The foreign key report_step_usage_account_fk goes: on every step recorded it locked the
--     account row FOR KEY SHARE, which for many clients of one account become multixacts on
--     the account row (the other writers that lock the account row, reserve's report and
--     reservation and every ledger row, hold the account's period FOR UPDATE, so they take it
--     one after the other). Deleting an account that has steps stays refused, with the same
--     SQLSTATE (23503), constraint name and message as the foreign key gave, by the AFTER
--     DELETE row trigger accounts_keep_billing_rows (named so that it fires after the RI
--     triggers of the foreign keys that remain, whose refusals therefore come first as
--     before). Inserts stay consistent: only record_step_usage (SECURITY DEFINER) and the
--     schema owner insert steps, and record_step_usage does so while it holds the report's
--     reservation (or, late, the period), whose own foreign keys keep the account
--     (docs/REVIEW.md, "Foreign keys of the write path"). report_step_usage_report_fk and
--     usage_ledger_account_fk stay: each costs one Heap LOCK record per call and no multixact
--     (the report's steps are recorded one at a time under its reservation lock; ledger rows
--     under the period lock), and tests/faults/test_interrupted.py interrupts persist and
--     increment_usage while they wait on those very locks.
--   * report_step_usage.id and report_reservations.id default to tokentrack.uuid_v7(), a
--     time-ordered uuid (UUIDv7 layout: 48 bits of Unix milliseconds, version 7, variant,
--     random bits; PostgreSQL before 18 has no uuidv7()): new keys go to the right edge of the
--     primary key instead of a random page of it, so a checkpoint is followed by one full-page
--     image of the rightmost leaf rather than one per insert. Existing ids are kept.
--   * report_step_usage_billed_immutable (the row trigger of version 20261202000000) fires
--     AFTER instead of BEFORE (below). Its function is not replaced: its TRUNCATE guard,
--     EXISTS (... WHERE billed_period_id IS NOT NULL), stays exact without the dropped index
--     (a scan that stops at the first billed row, under the ACCESS EXCLUSIVE lock TRUNCATE
--     holds; its comment naming the index is out of date), and a function that a schema file
--     defines must come back byte for byte when this version is rolled back
--     (tests/installer/test_functions.py).
-- Locks while it runs: ACCESS EXCLUSIVE on report_step_usage, SHARE ROW EXCLUSIVE on
--   usage_ledger, accounts, usage_periods (dropping constraints, creating the trigger),
--   ACCESS EXCLUSIVE on report_reservations (the new default); no table is rewritten or
--   scanned: fillfactor applies to pages written from now on (a VACUUM FULL or pg_repack
--   would apply it to old pages; not needed: old steps are billed already, or are billed once).
-- Rollback: recreates the two indexes (a scan of report_step_usage), re-adds the three foreign
--   keys (each validates by a scan of the table), resets fillfactor and the id defaults,
--   drops the guard trigger, its function and uuid_v7(), and makes the immutability row
--   trigger BEFORE again.

DROP INDEX tokentrack.report_step_usage_billing_entry_idx;
DROP INDEX tokentrack.report_step_usage_billed_period_idx;
ALTER TABLE tokentrack.report_step_usage SET (fillfactor = 70);

ALTER TABLE tokentrack.report_step_usage
DROP CONSTRAINT report_step_usage_billed_period_fk,
DROP CONSTRAINT report_step_usage_billing_entry_fk,
DROP CONSTRAINT report_step_usage_account_fk;

CREATE FUNCTION tokentrack.accounts_keep_billing_rows()
RETURNS trigger
LANGUAGE plpgsql
-- SECURITY DEFINER: it must see every row of the child tables, whatever row level security
-- shows the role that deletes.
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
    -- Served by report_step_usage_account_idx.
    IF EXISTS (SELECT FROM tokentrack.report_step_usage AS s WHERE s.account_id = old.id) THEN
        RAISE EXCEPTION 'update or delete on table "accounts" violates foreign key constraint '
            '"report_step_usage_account_fk" on table "report_step_usage"'
            USING ERRCODE = '23503', CONSTRAINT = 'report_step_usage_account_fk',
            SCHEMA = 'tokentrack', TABLE = 'report_step_usage',
            DETAIL = pg_catalog.format('Key (id)=(%s) is still referenced from table "report_step_usage".', old.id),
            HINT = 'Billing data is never deleted: an account with recorded steps stays.';
    END IF;
    RETURN NULL;
END
$function$;

COMMENT ON FUNCTION tokentrack.accounts_keep_billing_rows() IS
'Trigger function refusing the DELETE of a tokentrack.accounts row that has steps (SQLSTATE 23503, '
'as the foreign key report_step_usage_account_fk did).';

REVOKE ALL ON FUNCTION tokentrack.accounts_keep_billing_rows() FROM PUBLIC;

CREATE TRIGGER accounts_keep_billing_rows
AFTER DELETE ON tokentrack.accounts
FOR EACH ROW EXECUTE FUNCTION tokentrack.accounts_keep_billing_rows();

CREATE FUNCTION tokentrack.uuid_v7()
RETURNS uuid
LANGUAGE sql
VOLATILE
PARALLEL SAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
    -- A random (version 4) uuid whose first 6 bytes become the Unix time in milliseconds and
    -- whose version nibble becomes 7 (0100 -> 0111: bits 52 and 53 set); the variant bits of
    -- gen_random_uuid() stay.
    SELECT pg_catalog.encode(
        pg_catalog.set_bit(
            pg_catalog.set_bit(
                pg_catalog.overlay(
                    pg_catalog.uuid_send(pg_catalog.gen_random_uuid()),
                    pg_catalog.substr(
                        pg_catalog.int8send(
                            pg_catalog.floor(
                                pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()) * 1000
                            )::bigint
                        ),
                        3
                    ),
                    1,
                    6
                ),
                52, 1
            ),
            53, 1
        ),
        'hex'
    )::uuid
$function$;

COMMENT ON FUNCTION tokentrack.uuid_v7() IS
'A time-ordered uuid (UUIDv7 layout: Unix milliseconds, version 7, random bits): the id default '
'of report_step_usage and report_reservations, so new keys fill the right edge of their index.';

REVOKE ALL ON FUNCTION tokentrack.uuid_v7() FROM PUBLIC;

ALTER TABLE tokentrack.report_step_usage ALTER COLUMN id SET DEFAULT tokentrack.uuid_v7();
ALTER TABLE tokentrack.report_reservations ALTER COLUMN id SET DEFAULT tokentrack.uuid_v7();

-- AFTER, not BEFORE: a BEFORE row trigger makes every UPDATE lock the old row first (one Heap
-- LOCK record per billed step, before its WHEN is even evaluated); an AFTER row trigger with
-- the same WHEN refuses the same statements with the same error, and the transaction that
-- tried rolls back.
DROP TRIGGER report_step_usage_billed_immutable ON tokentrack.report_step_usage;
CREATE TRIGGER report_step_usage_billed_immutable
AFTER UPDATE OR DELETE ON tokentrack.report_step_usage
FOR EACH ROW WHEN (old.billed_at IS NOT NULL)
EXECUTE FUNCTION tokentrack.report_step_usage_billed_is_immutable();

-- Part sweep: the set-based expiry sweep (no schema change)
--
-- expire_reservations bills a whole batch in one statement per kind of write (the periods one
-- UPDATE each) instead of finalize_reservation per reservation; cleanup_expired_reservations
-- and sweep_expired_reservations only have their headers brought up to date. Function files
-- only: their version-13 texts are in sql/history/20261213000000, which the rollback of this
-- version re-executes. No table, index or data is touched, so the upgrade costs nothing on a
-- big table and takes no lock beyond replacing the three routines.

-- Part bperf: the reserve path in fewer statements (functions only, no schema change)
--
-- reserve_usage, reserve, try_reserve_tokens, check_estimate, lock_budgets (header) and
-- lock_reservation_budgets are reworked (their version-13 text is in
-- sql/history/20261213000000): the same answers, locks (rank 3 then rank 4 in id order) and
-- writes in fewer statements and calls. No table, index or row changes, so nothing is
-- migrated and nothing is locked while this part runs beyond CREATE OR REPLACE FUNCTION.
-- Rollback: nothing to undo here; the migrator restores the functions' version-13 texts.

-- Part recon: the incremental reconcile's verified point
--
-- What: three tables of tokentrack.reconcile_recent() (sql/functions/reconcile_recent.sql) and
-- tokentrack.advance_reconcile_point(). reconcile_point (one row) holds the verified point,
-- through_entry: every usage_ledger row with id <= through_entry is summed, per period, into
-- reconcile_periods (tokens and reports) and, per budget window, into reconcile_windows (what
-- the steps those billing entries billed add to the window's used, in the budget's unit). The
-- ledger is append-only, so a sum of its prefix stays true: reconcile_recent() checks each
-- period it reads against point + the ledger rows after the point + the corrections, so its
-- cost follows what changed since the point, not the history. pending_entry and pending_xmax
-- are the next point, settled once every transaction that could still commit a lower ledger id
-- has ended (the rule of billing_totals()).
-- Why: tokentrack monitor and the exporter ran a full reconcile() (10 s at 1M rows, issue #16).
-- The tables are a cache of sums of append-only records, not billing data: no foreign key (an
-- insert's key check would take FOR KEY SHARE on usage_periods rows, which the write path
-- locks FOR UPDATE); a period that has a row here has ledger rows, so it can never be deleted.
-- Locks while it runs: creates three empty tables; touches no existing table, so nothing large
-- is rewritten or scanned whatever the history (no point row means through_entry 0: the first
-- advance_reconcile_point() creates the row and sums the existing ledger once).
-- Rollback: drops the three tables; they are declared billing tables (the migrator's rule for
-- every table of a version), so once the point has been advanced the rollback refuses, or with
-- ARCHIVE keeps their rows, which the next install moves back (sums of a prefix of the
-- append-only ledger stay true).
CREATE TABLE tokentrack.reconcile_point (
    id boolean NOT NULL DEFAULT TRUE CONSTRAINT reconcile_point_pkey PRIMARY KEY
    CONSTRAINT reconcile_point_one_row CHECK (id),
    through_entry bigint NOT NULL DEFAULT 0
    CONSTRAINT reconcile_point_through_non_negative CHECK (through_entry >= 0),
    pending_entry bigint,
    pending_xmax xid8,
    advanced_at timestamptz,
    checked_at timestamptz,
    CONSTRAINT reconcile_point_pending_after CHECK (pending_entry > through_entry),
    CONSTRAINT reconcile_point_pending_whole CHECK ((pending_entry IS NULL) = (pending_xmax IS NULL))
);

COMMENT ON TABLE tokentrack.reconcile_point IS
'The incremental reconcile''s verified point (one row): the usage ledger through through_entry '
'is summed into reconcile_periods and reconcile_windows (no row: 0). Written by advance_reconcile_point() only.';

CREATE TABLE tokentrack.reconcile_periods (
    account_id uuid NOT NULL,
    period_id uuid NOT NULL,
    tokens bigint NOT NULL,
    reports bigint NOT NULL,
    CONSTRAINT reconcile_periods_pkey PRIMARY KEY (account_id, period_id)
);

COMMENT ON TABLE tokentrack.reconcile_periods IS
'Per usage period, the sums of its usage_ledger rows with id <= reconcile_point.through_entry.';

CREATE TABLE tokentrack.reconcile_windows (
    account_id uuid NOT NULL,
    budget_id uuid NOT NULL,
    window_start timestamptz NOT NULL,
    amount bigint NOT NULL,
    CONSTRAINT reconcile_windows_pkey PRIMARY KEY (account_id, budget_id, window_start)
);

COMMENT ON TABLE tokentrack.reconcile_windows IS
'Per budget window, what the steps billed by the usage_ledger rows with id <= '
'reconcile_point.through_entry add to its used (total_tokens or cost_micros, by the budget''s unit).';

-- Owner only (the two SECURITY DEFINER functions read and write them); row level security on,
-- with no policy, as they hold account ids.
ALTER TABLE tokentrack.reconcile_point ENABLE ROW LEVEL SECURITY;
ALTER TABLE tokentrack.reconcile_periods ENABLE ROW LEVEL SECURITY;
ALTER TABLE tokentrack.reconcile_windows ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON tokentrack.reconcile_point, tokentrack.reconcile_periods, tokentrack.reconcile_windows FROM PUBLIC;
