-- Version 20261214000000: write_path
--
-- The write path reworked for the least work per call that keeps every invariant (issue #16),
-- with the contract unchanged and existing data migrated in place. Each part below says what
-- it changes, why, what it locks while it runs, and how the rollback undoes it exactly.

-- Pin name resolution for this version's transaction (see version 20251219000000).
SET LOCAL search_path = pg_catalog, pg_temp;

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
