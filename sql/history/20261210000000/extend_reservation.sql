-- version: 20261210000000
--
-- tokentrack.extend_reservation(p_report_id uuid, p_account_id uuid, p_more jsonb) -> jsonb
--
-- Raises an active, unexpired reservation's hold by p_more (tokens, and cost_micros or model,
-- as reserve's p_estimate) when the extra fits the account's active usage period (as reserve
-- checks it) and every budget window the reservation holds (the windows it was granted in),
-- with the same rules as reserve:
--   period: tokens_limit - tokens_used - every active, unexpired reservation of the account
--           (its own included), as try_reserve_tokens counts them
--   budget: limit - used - every active, unexpired hold in that window (its own included)
-- A cost extra without a cost estimate adds 0 to cost budgets (and is refused by an exhausted
-- one, as reserve is). The expiry time does not move.
-- Answer: granted {"success": true, "reservation_id", "reserved_tokens", "reserved_cost_micros",
--   "available_tokens", "expires_at", "period_id", "budgets": [{"budget_id", "subject",
--   "window", "unit", "window_start", "held", "available"}]}; refused (nothing written):
--   reservation_not_found, report_account_mismatch, report_finalized (the reservation is
--   completed, expired, or past expires_at), no_active_period, insufficient_tokens (with
--   period_id),
--   insufficient_budget (as reserve).
-- Locks, in order: the reservation row (FOR UPDATE: rank 2; the report's steps, which take it
--   FOR NO KEY UPDATE, wait), the account's active period row (FOR UPDATE: rank 3), the budgets it
--   holds (lock_reservation_budgets: rank 4), all before the sums are read. Writes: the
--   reservation's reserved_tokens and reserved_cost_micros.
-- Errors: 25000 under REPEATABLE READ or SERIALIZABLE; 22004 a NULL id or p_more, or a NULL
--   p_more.tokens; 22023 and 22001 as reserve's p_estimate (as p_more.<key>); 22003 an extra
--   that would take reserved_tokens past the integer range.
CREATE OR REPLACE FUNCTION tokentrack.extend_reservation(p_report_id uuid, p_account_id uuid, p_more jsonb)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_more tokentrack.reservation_estimate;
    v_reservation_id uuid;
    v_reservation tokentrack.report_reservations%ROWTYPE;
    v_period tokentrack.usage_periods%ROWTYPE;
    v_held bigint;
    v_available bigint;
    v_hold record;
    v_budget tokentrack.budgets%ROWTYPE;
    v_used bigint;
    v_budget_held bigint;
    v_requested bigint;
    v_own bigint;
    v_budget_available bigint;
    v_budgets jsonb := '[]'::jsonb;
BEGIN
    -- READ COMMITTED only: see require_read_committed.
    PERFORM tokentrack.require_read_committed('extend_reservation');
    IF p_report_id IS NULL THEN
        RAISE EXCEPTION 'p_report_id must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_report_id';
    END IF;
    IF p_account_id IS NULL THEN
        RAISE EXCEPTION 'p_account_id must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_account_id';
    END IF;
    v_more := tokentrack.check_estimate(p_more, 'p_more');

    v_reservation_id := tokentrack.lock_report_reservation(p_report_id, p_account_id);
    IF v_reservation_id IS NULL THEN
        RETURN tokentrack.reservation_refusal(p_report_id, p_account_id);
    END IF;
    SELECT rr.* INTO STRICT v_reservation FROM tokentrack.report_reservations AS rr
    WHERE rr.id = v_reservation_id;
    IF v_reservation.status <> 'active' OR v_reservation.expires_at <= pg_catalog.now() THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'report_finalized',
            'message', pg_catalog.format(
                'report %s cannot be extended: its reservation is %s', p_report_id,
                CASE WHEN v_reservation.status = 'active'
                    THEN pg_catalog.format('past its expiry (%s)', v_reservation.expires_at)
                    ELSE v_reservation.status END
            )
        );
    END IF;

    -- The account's active period, as reserve checks it (the reservation may have been taken in
    -- one that a period switch closed since).
    v_period := tokentrack.lock_active_period(p_account_id);
    IF v_period.id IS NULL THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'no_active_period',
            'message', pg_catalog.format('account %s has no active usage period', p_account_id)
        );
    END IF;
    IF v_reservation.reserved_tokens::bigint + v_more.tokens > 2147483647 THEN
        RAISE EXCEPTION 'p_more.tokens (%) would take the reservation past the integer range (it holds %)',
            v_more.tokens, v_reservation.reserved_tokens
            USING ERRCODE = '22003', COLUMN = 'p_more.tokens';
    END IF;
    -- The budgets it holds (rank 4), before anything is summed: a finish or sweep of a report
    -- of an earlier period holds those budgets but not the active period, and has committed
    -- by the time the sums below are read, so the period's sum and the budgets' see it alike.
    IF v_reservation.holds IS NOT NULL THEN
        PERFORM tokentrack.lock_reservation_budgets(p_account_id, v_reservation.holds);
    END IF;
    SELECT COALESCE(pg_catalog.sum(rr.reserved_tokens), 0) INTO v_held
    FROM tokentrack.report_reservations AS rr
    WHERE rr.account_id = p_account_id AND rr.status = 'active' AND rr.expires_at > pg_catalog.now();
    v_available := v_period.tokens_limit - v_period.tokens_used - v_held;
    IF v_more.tokens > v_available THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'insufficient_tokens',
            'message', pg_catalog.format('requested %s more tokens, %s available', v_more.tokens, GREATEST(v_available, 0)),
            'available_tokens', GREATEST(v_available, 0),
            'requested_tokens', v_more.tokens,
            'period_id', v_period.id
        );
    END IF;

    IF v_reservation.holds IS NOT NULL THEN
        FOR v_hold IN
            SELECT h.budget_id, h.window_start
            FROM pg_catalog.jsonb_to_recordset(v_reservation.holds) AS h (budget_id uuid, window_start timestamptz)
            ORDER BY h.budget_id
        LOOP
            SELECT b.* INTO STRICT v_budget FROM tokentrack.budgets AS b
            WHERE b.account_id = p_account_id AND b.id = v_hold.budget_id;
            SELECT w.used INTO STRICT v_used FROM tokentrack.budget_windows AS w
            WHERE w.account_id = p_account_id AND w.budget_id = v_hold.budget_id AND w.window_start = v_hold.window_start;
            v_budget_held := tokentrack.budget_held(p_account_id, v_budget.id, v_budget.unit, v_hold.window_start);
            v_requested := CASE WHEN v_budget.unit = 'tokens' THEN v_more.tokens::bigint ELSE COALESCE(v_more.cost_micros, 0) END;
            v_own := CASE WHEN v_budget.unit = 'tokens' THEN v_reservation.reserved_tokens::bigint
                ELSE COALESCE(v_reservation.reserved_cost_micros, 0) END;
            -- budget_held counts this reservation's own hold too.
            v_budget_available := v_budget.limit_amount - v_used - v_budget_held;
            IF v_requested > v_budget_available OR v_budget_available <= 0 THEN
                RETURN pg_catalog.jsonb_build_object(
                    'success', false, 'error', 'insufficient_budget',
                    'message', pg_catalog.format(
                        'requested %s more %s, %s available in the %s budget of %s (window from %s)',
                        v_requested, v_budget.unit, GREATEST(v_budget_available, 0), v_budget.budget_window,
                        COALESCE(v_budget.subject, 'the account'), v_hold.window_start
                    ),
                    'budget_id', v_budget.id,
                    'subject', v_budget.subject,
                    'window', v_budget.budget_window,
                    'unit', v_budget.unit,
                    'window_start', v_hold.window_start,
                    'available', GREATEST(v_budget_available, 0),
                    'requested', v_requested
                );
            END IF;
            v_budgets := v_budgets || pg_catalog.jsonb_build_array(pg_catalog.jsonb_build_object(
                'budget_id', v_budget.id,
                'subject', v_budget.subject,
                'window', v_budget.budget_window,
                'unit', v_budget.unit,
                'window_start', v_hold.window_start,
                'held', v_own + v_requested,
                'available', v_budget_available - v_requested
            ));
        END LOOP;
    END IF;

    UPDATE tokentrack.report_reservations AS rr
    SET
        reserved_tokens = rr.reserved_tokens + v_more.tokens,
        reserved_cost_micros = CASE
            WHEN v_more.cost_micros IS NULL THEN rr.reserved_cost_micros
            ELSE COALESCE(rr.reserved_cost_micros, 0) + v_more.cost_micros
        END
    WHERE rr.id = v_reservation.id
    RETURNING rr.* INTO v_reservation;

    RETURN pg_catalog.jsonb_build_object(
        'success', true,
        'reservation_id', v_reservation.id,
        'reserved_tokens', v_reservation.reserved_tokens,
        'reserved_cost_micros', v_reservation.reserved_cost_micros,
        'available_tokens', v_available - v_more.tokens,
        'expires_at', v_reservation.expires_at,
        'period_id', v_reservation.period_id,
        'budgets', v_budgets
    );
END
$function$;

COMMENT ON FUNCTION tokentrack.extend_reservation(uuid, uuid, jsonb) IS
'Raises an active reservation''s hold when the extra fits its period and every budget window it '
'holds; refused as reserve is.';

REVOKE ALL ON FUNCTION tokentrack.extend_reservation(uuid, uuid, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.extend_reservation(uuid, uuid, jsonb) TO tokentrack_service;
