-- version: 20260108000000
--
-- tokentrack.finalize_reservation(p_reservation_id uuid, p_final_status text) -> jsonb
--
-- Internal (no EXECUTE for application roles): bills a reservation. The caller must already
-- hold the reservation row FOR UPDATE; finalize_report_usage, finish_report and the sweep do.
-- When the reservation is active: sums the report's unbilled steps, writes one usage_ledger
-- row (report_billed, or report_expired for the sweep) with that sum and with 1 report when
-- the report's status is complete, adds both to the period the reservation was taken in,
-- marks the steps billed by that ledger row, sets the reservation to p_final_status with
-- billed_tokens and finalized_at, and writes token_usage on the report: totalTokens,
-- inputTokens, outputTokens, cachedInputTokens, cacheWriteTokens, reasoningTokens, costMicros
-- (the sum of the priced steps' cost_micros), unpricedSteps (steps without a cost), steps and
-- billedAt (since version 20261203000000: the classes, costMicros and unpricedSteps).
-- When it is no longer active: locks nothing more, changes nothing and answers
-- already_finalized with the billed_tokens recorded the first time.
-- Locks, in order after the caller's reservation lock: the period row (FOR UPDATE), the
--   budgets the reservation holds (lock_budgets; since version 20261210000000), the
--   report row (FOR UPDATE), then the report's unbilled step rows (by the UPDATE) and the held
--   budget windows (by the UPDATE of their used: the billed tokens into tokens budgets, the
--   billed cost into cost budgets), then the notifications of the thresholds that billing
--   takes a window across (since version 20261212000000: bill_budget_windows, told what the
--   reservation stops holding, so a finalize that bills less than it held notifies nothing).
-- Why it cannot double-bill: steps are billed only here (and by the late path of
--   persist_step_usage, which runs only after this reservation left 'active'); here only
--   steps with billed_at IS NULL are billed, under the reservation lock that every new
--   unbilled step must share, and the reservation leaves 'active' in the same transaction.
CREATE OR REPLACE FUNCTION tokentrack.finalize_reservation(p_reservation_id uuid, p_final_status text)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_reservation tokentrack.report_reservations%ROWTYPE;
    v_period tokentrack.usage_periods%ROWTYPE;
    v_report tokentrack.reports%ROWTYPE;
    -- bigint: count(*) is bigint, so no bigint-to-integer cast is needed.
    v_steps bigint;
    v_tokens bigint;
    v_input bigint;
    v_output bigint;
    v_cached bigint;
    v_cache_write bigint;
    v_reasoning bigint;
    v_cost bigint;
    v_unpriced bigint;
    v_reports integer;
    v_entry_id bigint;
BEGIN
    IF p_final_status IS NULL OR p_final_status NOT IN ('completed', 'expired') THEN
        RAISE EXCEPTION 'p_final_status must be completed or expired (got %)', p_final_status
            USING ERRCODE = '22023', COLUMN = 'p_final_status';
    END IF;

    SELECT rr.* INTO STRICT v_reservation FROM tokentrack.report_reservations AS rr
    WHERE rr.id = p_reservation_id;

    IF v_reservation.status <> 'active' THEN
        SELECT p.* INTO v_period FROM tokentrack.usage_periods AS p WHERE p.id = v_reservation.period_id;
        RETURN pg_catalog.jsonb_build_object(
            'success', true,
            'already_finalized', true,
            'reservation_status', v_reservation.status,
            'billed_tokens', v_reservation.billed_tokens,
            'steps', (
                SELECT pg_catalog.count(*) FROM tokentrack.report_step_usage AS s
                WHERE s.report_id = v_reservation.report_id AND NOT s.late
            ),
            'tokens_used', v_period.tokens_used,
            'tokens_limit', v_period.tokens_limit
        );
    END IF;

    PERFORM FROM tokentrack.usage_periods AS p WHERE p.id = v_reservation.period_id FOR UPDATE;
    IF v_reservation.holds IS NOT NULL THEN
        PERFORM tokentrack.lock_reservation_budgets(v_reservation.account_id, v_reservation.holds);
    END IF;
    SELECT r.* INTO v_report FROM tokentrack.reports AS r WHERE r.id = v_reservation.report_id FOR UPDATE;

    SELECT
        pg_catalog.count(*),
        COALESCE(pg_catalog.sum(s.total_tokens), 0),
        COALESCE(pg_catalog.sum(s.input_tokens), 0),
        COALESCE(pg_catalog.sum(s.output_tokens), 0),
        COALESCE(pg_catalog.sum(s.cached_input_tokens), 0),
        COALESCE(pg_catalog.sum(s.cache_write_tokens), 0),
        COALESCE(pg_catalog.sum(s.reasoning_tokens), 0),
        -- sum(bigint) is numeric; a report's cost stays far within bigint.
        COALESCE(pg_catalog.sum(s.cost_micros), 0)::bigint,
        pg_catalog.count(*) FILTER (WHERE s.cost_micros IS NULL)
    INTO v_steps, v_tokens, v_input, v_output, v_cached, v_cache_write, v_reasoning, v_cost, v_unpriced
    FROM tokentrack.report_step_usage AS s
    WHERE s.report_id = v_reservation.report_id AND s.billed_at IS NULL;

    v_reports := CASE WHEN v_report.status = 'complete' THEN 1 ELSE 0 END;

    INSERT INTO tokentrack.usage_ledger (account_id, period_id, kind, tokens, reports, report_id)
    VALUES (
        v_reservation.account_id, v_reservation.period_id,
        CASE WHEN p_final_status = 'completed' THEN 'report_billed' ELSE 'report_expired' END,
        v_tokens, v_reports, v_reservation.report_id
    )
    RETURNING id INTO v_entry_id;

    UPDATE tokentrack.report_step_usage AS s
    SET billed_at = pg_catalog.now(), billed_period_id = v_reservation.period_id, billing_entry_id = v_entry_id
    WHERE s.report_id = v_reservation.report_id AND s.billed_at IS NULL;

    UPDATE tokentrack.usage_periods AS p
    SET tokens_used = p.tokens_used + v_tokens, reports_count = p.reports_count + v_reports
    WHERE p.id = v_reservation.period_id
    RETURNING p.* INTO v_period;

    IF v_reservation.holds IS NOT NULL AND (v_tokens <> 0 OR v_cost <> 0) THEN
        -- What the reservation stops holding here: its estimate while it is unexpired; nothing
        -- once past expires_at (the sweep, or a finalize after expiry): it held nothing then.
        PERFORM tokentrack.bill_budget_windows(
            v_reservation.account_id, v_reservation.holds, v_tokens, v_cost,
            CASE WHEN v_reservation.expires_at > pg_catalog.now() THEN v_reservation.reserved_tokens::bigint ELSE 0 END,
            CASE WHEN v_reservation.expires_at > pg_catalog.now()
                THEN COALESCE(v_reservation.reserved_cost_micros, 0) ELSE 0 END
        );
    END IF;

    UPDATE tokentrack.report_reservations AS rr
    SET status = p_final_status, billed_tokens = v_tokens, finalized_at = pg_catalog.now()
    WHERE rr.id = p_reservation_id;

    UPDATE tokentrack.reports AS r
    SET token_usage = pg_catalog.jsonb_build_object(
        'totalTokens', v_tokens,
        'inputTokens', v_input,
        'outputTokens', v_output,
        'cachedInputTokens', v_cached,
        'cacheWriteTokens', v_cache_write,
        'reasoningTokens', v_reasoning,
        'costMicros', v_cost,
        'unpricedSteps', v_unpriced,
        'steps', v_steps,
        'billedAt', pg_catalog.now()
    )
    WHERE r.id = v_reservation.report_id;

    RETURN pg_catalog.jsonb_build_object(
        'success', true,
        'already_finalized', false,
        'reservation_status', p_final_status,
        'billed_tokens', v_tokens,
        'steps', v_steps,
        'tokens_used', v_period.tokens_used,
        'tokens_limit', v_period.tokens_limit
    );
END
$function$;

COMMENT ON FUNCTION tokentrack.finalize_reservation(uuid, text) IS
'Internal: bills a reservation the caller has locked (FOR UPDATE) into its period, exactly once.';

REVOKE ALL ON FUNCTION tokentrack.finalize_reservation(uuid, text) FROM PUBLIC;
