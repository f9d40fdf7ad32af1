-- version: 20260108000000
--
-- tokentrack.expire_reservations(p_limit integer) -> jsonb
--
-- The sweep's work, for at most p_limit reservations (NULL: all of them): finds active
-- reservations past expires_at, bills their recorded steps exactly as finalize would
-- (finalize_reservation, ledger kind report_expired) and marks them expired.
-- Returns {"success", "expired", "billed_tokens", "steps"}.
-- Locks, in order: every chosen reservation row first, in one statement (FOR UPDATE, in
--   (expires_at, id) order; a reservation that a concurrent finalize or sweep billed
--   meanwhile drops out when its lock is granted), then per reservation, in (period_id, id)
--   order, its period row, report row and unbilled step rows. Taking all reservation locks
--   before any period lock keeps the global order (reservation, period, report, steps), so
--   the sweep cannot deadlock with finalize, finish_report or persist_step_usage. A sweep is
--   the only caller that holds several period rows at once; it finalizes its batch in
--   (period_id, id) order, so it takes periods in ascending order and two sweeps cannot
--   deadlock on periods either (in reservation id order, sweep A could hold period 1 and
--   wait for period 2 while sweep B held period 2 and waited for period 1). Since version
--   20261210000000 it locks every period of the batch (ascending) and then every budget the
--   batch holds (ascending) before it bills any reservation, so that no period is locked after
--   a budget.
-- Batch: the longest-expired first, (expires_at, id), which report_reservations_active_by_expiry
--   serves by a range scan of the due reservations only (ORDER BY id would walk the whole
--   primary key, every reservation ever made, to find the due ones).
-- Runs with the caller's transaction: cleanup_expired_reservations() calls it once for all;
--   sweep_expired_reservations() and `tokentrack cleanup` call it per batch, committing in
--   between, until a batch expires nothing ('expired' 0: nothing was due at its now()). A
--   short batch does not mean nothing is left: rows billed by a concurrent finalize drop out,
--   and reservations that came due after the batch's now() are not in it.
-- Errors: 25000 when run under REPEATABLE READ or SERIALIZABLE (READ COMMITTED only, see
--   docs/REVIEW.md); 22023 a p_limit below 1.
CREATE OR REPLACE FUNCTION tokentrack.expire_reservations(p_limit integer)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_ids uuid[];
    v_periods uuid[];
    v_period uuid;
    v_id uuid;
    v_result jsonb;
    v_expired integer := 0;
    -- ::bigint initialisers: no implicit integer-to-bigint cast at run time.
    v_billed bigint := 0::bigint;
    v_steps bigint := 0::bigint;
BEGIN
    -- READ COMMITTED only: see require_read_committed.
    PERFORM tokentrack.require_read_committed('expire_reservations');
    IF p_limit < 1 THEN
        RAISE EXCEPTION 'p_limit must be at least 1 (got %)', p_limit USING ERRCODE = '22023', COLUMN = 'p_limit';
    END IF;

    -- Finalized in (period_id, id) order: periods are locked in ascending order (see the header).
    SELECT pg_catalog.array_agg(due.id ORDER BY due.period_id, due.id) INTO v_ids
    FROM (
        SELECT rr.id, rr.period_id FROM tokentrack.report_reservations AS rr
        WHERE rr.status = 'active' AND rr.expires_at <= pg_catalog.now()
        ORDER BY rr.expires_at, rr.id
        LIMIT p_limit
        FOR UPDATE
    ) AS due;

    IF v_ids IS NOT NULL THEN
        -- Since version 20261210000000: every period of the batch (ascending), then every budget
        -- its reservations hold (ascending), before any of them is billed, so the sweep never
        -- takes a period after a budget (rank 3 before rank 4, docs/REVIEW.md).
        SELECT pg_catalog.array_agg(DISTINCT rr.period_id ORDER BY rr.period_id) INTO v_periods
        FROM tokentrack.report_reservations AS rr WHERE rr.id = ANY (v_ids);
        -- One by one (each by the primary key), in ascending order.
        FOREACH v_period IN ARRAY v_periods LOOP
            PERFORM FROM tokentrack.usage_periods AS p WHERE p.id = v_period FOR UPDATE;
        END LOOP;
        PERFORM FROM tokentrack.budgets AS b
        WHERE (b.account_id, b.id) IN (
            SELECT rr.account_id, h.budget_id
            FROM tokentrack.report_reservations AS rr
            CROSS JOIN LATERAL pg_catalog.jsonb_to_recordset(rr.holds) AS h (budget_id uuid)
            WHERE rr.id = ANY (v_ids) AND rr.holds IS NOT NULL
        )
        ORDER BY b.account_id, b.id
        FOR UPDATE;
        FOREACH v_id IN ARRAY v_ids LOOP
            v_result := tokentrack.finalize_reservation(v_id, 'expired');
            IF NOT (v_result ->> 'already_finalized')::boolean THEN
                v_expired := v_expired + 1;
                v_billed := v_billed + (v_result ->> 'billed_tokens')::bigint;
                v_steps := v_steps + (v_result ->> 'steps')::bigint;
            END IF;
        END LOOP;
    END IF;

    RETURN pg_catalog.jsonb_build_object(
        'success', true, 'expired', v_expired, 'billed_tokens', v_billed, 'steps', v_steps
    );
END
$function$;

COMMENT ON FUNCTION tokentrack.expire_reservations(integer) IS
'Bills and expires at most p_limit active reservations past expires_at (NULL: all), in the '
'caller''s transaction. Used by cleanup_expired_reservations and sweep_expired_reservations.';

REVOKE ALL ON FUNCTION tokentrack.expire_reservations(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.expire_reservations(integer) TO tokentrack_service;
