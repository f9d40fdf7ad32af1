-- version: 20261212000000
--
-- tokentrack.note_crossings(p_account_id uuid, p_budget_id uuid, p_window_start timestamptz,
--     p_before bigint, p_after bigint) -> integer
--
-- Internal (no EXECUTE for application roles). Records the notifications of one change of a
-- budget window: p_before and p_after are the window's used amount plus its active,
-- unexpired holds (in the budget's unit) just before and just after the change. A threshold
-- of t percent is crossed when
--     p_before < ceil(L * t / 100) <= p_after,  L = budget_limit(account, budget, window)
-- (the window's effective limit now: the budget's limit plus its unexpired grants that
-- overlap the window), compared exactly (numeric: no rounding, no overflow); a limit of 0 is
-- never crossed. For each threshold crossed it inserts one notification (subject, unit,
-- window, used = p_after, limit_amount = L) unless (account, budget, window_start, threshold)
-- already has one (notifications_one_per_crossing: exactly one per crossing, whatever was
-- retried or raced), and sends pg_notify('tokentrack_notifications', '{"id": ..,
-- "account_id": ..}') for it, which PostgreSQL delivers after the transaction commits (and
-- never when it rolls back). Returns how many it recorded. A change that does not raise used +
-- held (p_after <= p_before: a finalize that bills less than it held, a refund) records none.
-- Callers: reserve_usage, extend_reservation, bill_budget_windows (finalize, finish_report,
-- the sweep, late steps) and adjust_usage, each after its change and in its transaction.
-- Locks: the caller holds the budget row FOR UPDATE (rank 4: lock_budgets), under which p_before
--   and p_after were read and no other change of that budget runs; so two transactions never
--   insert the same crossing at once, and each crossing is seen by exactly one of them. The
--   insert is the last lock it takes (rank 7, docs/REVIEW.md: a notification row).
-- Writes: notifications (insert only).
-- Errors: 22004 a NULL argument.
CREATE OR REPLACE FUNCTION tokentrack.note_crossings(
    p_account_id uuid, p_budget_id uuid, p_window_start timestamptz, p_before bigint, p_after bigint
)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_budget tokentrack.budgets%ROWTYPE;
    v_limit bigint;
    v_threshold integer;
    v_bound numeric;
    v_id bigint;
    v_recorded integer := 0;
BEGIN
    IF p_account_id IS NULL THEN
        RAISE EXCEPTION 'p_account_id must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_account_id';
    END IF;
    IF p_budget_id IS NULL THEN
        RAISE EXCEPTION 'p_budget_id must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_budget_id';
    END IF;
    IF p_window_start IS NULL THEN
        RAISE EXCEPTION 'p_window_start must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_window_start';
    END IF;
    IF p_before IS NULL THEN
        RAISE EXCEPTION 'p_before must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_before';
    END IF;
    IF p_after IS NULL THEN
        RAISE EXCEPTION 'p_after must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_after';
    END IF;
    -- Nothing rose: nothing crossed (the common case of finalize, and every refund).
    IF p_after <= p_before THEN
        RETURN 0;
    END IF;

    SELECT b.* INTO v_budget FROM tokentrack.budgets AS b
    WHERE b.account_id = p_account_id AND b.id = p_budget_id;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    v_limit := tokentrack.budget_limit(p_account_id, p_budget_id, p_window_start);

    FOREACH v_threshold IN ARRAY v_budget.thresholds LOOP
        v_bound := pg_catalog.ceil(v_limit::numeric * v_threshold::numeric / 100::numeric);
        CONTINUE WHEN v_bound <= 0 OR NOT (p_before::numeric < v_bound AND p_after::numeric >= v_bound);
        INSERT INTO tokentrack.notifications (
            account_id, budget_id, subject, unit, budget_window, window_start, threshold, used, limit_amount
        )
        VALUES (
            p_account_id, p_budget_id, v_budget.subject, v_budget.unit, v_budget.budget_window,
            p_window_start, v_threshold, p_after, v_limit
        )
        ON CONFLICT ON CONSTRAINT notifications_one_per_crossing DO NOTHING
        RETURNING id INTO v_id;
        IF FOUND THEN
            PERFORM pg_catalog.pg_notify(
                'tokentrack_notifications',
                pg_catalog.jsonb_build_object('id', v_id, 'account_id', p_account_id)::text
            );
            v_recorded := v_recorded + 1;
        END IF;
    END LOOP;
    RETURN v_recorded;
END
$function$;

COMMENT ON FUNCTION tokentrack.note_crossings(uuid, uuid, timestamptz, bigint, bigint) IS
'Internal: records one notification per threshold a change of a budget window''s used + held '
'crossed (from below to at or above), once per (budget, window, threshold), and NOTIFYs '
'tokentrack_notifications (delivered after commit).';

REVOKE ALL ON FUNCTION tokentrack.note_crossings(uuid, uuid, timestamptz, bigint, bigint) FROM PUBLIC;
