-- version: 20261214000000
--
-- tokentrack.advance_reconcile_point() -> jsonb
--
-- Runs tokentrack.reconcile_recent() over every account and, when it is ok, moves the verified
-- point forward: the usage_ledger rows after through_entry up to the pending point are summed
-- into reconcile_periods (per period: tokens, reports) and reconcile_windows (per budget window
-- held by the reservation of a billing entry's report: what the steps that entry billed add to
-- its used, in the budget's unit), and through_entry becomes the pending point. Ledger ids are
-- not handed out in commit order, so the pending point is settled the way billing_totals()
-- settles its counters: a run records the highest ledger id it sees with its snapshot's xmax
-- (pending_entry, pending_xmax); a later run folds through it once its snapshot's xmin has
-- reached pending_xmax (every transaction that could still commit a lower id has ended), and
-- records the next one. So the point lags one run behind, and each run reads what changed in
-- about two intervals, never the history (the first run after the install sums the existing
-- ledger once).
-- A run that finds a discrepancy does not move the point: the rows after it, the faulty ones
-- among them, are checked again by every run until the discrepancy is corrected (an adjustment,
-- adjust_usage), and reconcile() audits everything.
-- Who calls it: tokentrack exporter's slow task (every --reconcile-interval), or pg_cron / a
-- cron job (`SELECT tokentrack.advance_reconcile_point()`); tokentrack monitor only reads the
-- point (reconcile_recent() in its read-only snapshot). Runs concurrently with itself (the
-- second waits for the first's point row) and with billing.
-- Returns reconcile_recent()'s answer (checked against the point before this run) plus
--   "advanced" (true when the point moved), "through_entry" (the point now), "pending_entry"
--   (the next point, null when none).
-- Locks: the reconcile_point row FOR UPDATE, and the rows of reconcile_periods and
--   reconcile_windows it writes: tables of its own, which no billing function reads or locks,
--   so it takes no lock of the global order (docs/REVIEW.md) and never waits for billing nor
--   makes billing wait; it reads the billing tables under MVCC. Writes: those three tables.
-- Errors: none.
CREATE OR REPLACE FUNCTION tokentrack.advance_reconcile_point()
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_point tokentrack.reconcile_point%ROWTYPE;
    v_snapshot pg_catalog.pg_snapshot;
    v_settled boolean;
    v_check jsonb;
    v_advanced boolean := false;
    v_last bigint;
BEGIN
    INSERT INTO tokentrack.reconcile_point (id) VALUES (TRUE) ON CONFLICT (id) DO NOTHING;
    SELECT rp.* INTO STRICT v_point FROM tokentrack.reconcile_point AS rp FOR UPDATE;

    -- Before the check, so that the check's snapshot (taken later) sees every row <= pending.
    v_snapshot := pg_catalog.pg_current_snapshot();
    v_settled := v_point.pending_entry IS NOT NULL
        AND pg_catalog.pg_snapshot_xmin(v_snapshot) >= v_point.pending_xmax;

    v_check := tokentrack.reconcile_recent(NULL);

    IF (v_check ->> 'ok')::boolean AND v_settled THEN
        INSERT INTO tokentrack.reconcile_periods AS rp (account_id, period_id, tokens, reports)
        SELECT p.account_id, l.period_id, pg_catalog.sum(l.tokens), pg_catalog.sum(l.reports)
        FROM tokentrack.usage_ledger AS l
        INNER JOIN tokentrack.usage_periods AS p ON p.id = l.period_id
        WHERE l.id > v_point.through_entry AND l.id <= v_point.pending_entry
        GROUP BY p.account_id, l.period_id
        ON CONFLICT (account_id, period_id) DO UPDATE
            SET tokens = rp.tokens + excluded.tokens, reports = rp.reports + excluded.reports;

        INSERT INTO tokentrack.reconcile_windows AS rw (account_id, budget_id, window_start, amount)
        SELECT
            rr.account_id, h.budget_id, h.window_start,
            pg_catalog.sum(CASE WHEN b.unit = 'tokens' THEN s.total_tokens::bigint ELSE COALESCE(s.cost_micros, 0) END)
        FROM tokentrack.usage_ledger AS l
        INNER JOIN tokentrack.report_reservations AS rr ON rr.report_id = l.report_id
        CROSS JOIN LATERAL pg_catalog.jsonb_to_recordset(rr.holds) AS h (budget_id uuid, window_start timestamptz)
        INNER JOIN tokentrack.budgets AS b ON b.account_id = rr.account_id AND b.id = h.budget_id
        INNER JOIN tokentrack.report_step_usage AS s ON s.report_id = l.report_id AND s.billing_entry_id = l.id
        WHERE
            l.id > v_point.through_entry AND l.id <= v_point.pending_entry
            AND l.kind IN ('report_billed', 'report_expired', 'late_step')
            AND rr.holds IS NOT NULL
        GROUP BY rr.account_id, h.budget_id, h.window_start
        ON CONFLICT (account_id, budget_id, window_start) DO UPDATE
            SET amount = rw.amount + excluded.amount;

        v_point.through_entry := v_point.pending_entry;
        v_point.pending_entry := NULL;
        v_point.pending_xmax := NULL;
        v_point.advanced_at := pg_catalog.now();
        v_advanced := true;
    END IF;

    IF v_point.pending_entry IS NULL THEN
        SELECT l.id INTO v_last FROM tokentrack.usage_ledger AS l ORDER BY l.id DESC LIMIT 1;
        IF v_last > v_point.through_entry THEN
            v_point.pending_entry := v_last;
            v_point.pending_xmax := pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot());
        END IF;
    END IF;

    UPDATE tokentrack.reconcile_point AS rp
    SET
        through_entry = v_point.through_entry,
        pending_entry = v_point.pending_entry,
        pending_xmax = v_point.pending_xmax,
        advanced_at = v_point.advanced_at,
        checked_at = pg_catalog.now()
    WHERE rp.id;

    RETURN v_check || pg_catalog.jsonb_build_object(
        'advanced', v_advanced,
        'through_entry', v_point.through_entry,
        'pending_entry', v_point.pending_entry
    );
END
$function$;

COMMENT ON FUNCTION tokentrack.advance_reconcile_point() IS
'Runs reconcile_recent() and, when it is ok, moves the incremental reconcile''s verified point '
'forward over the ledger rows that have settled since the last run.';

REVOKE ALL ON FUNCTION tokentrack.advance_reconcile_point() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.advance_reconcile_point() TO tokentrack_service;
