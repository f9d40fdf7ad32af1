-- version: 20261203000000
--
-- tokentrack.record_step_usage(p_report_id, p_account_id, p_step_name, p_input_tokens,
--     p_cached_input_tokens, p_cache_write_tokens, p_output_tokens, p_reasoning_tokens,
--     p_total_tokens bigint, p_model) -> jsonb
--
-- Internal (no EXECUTE for application roles): the one implementation behind
-- persist_step_usage and record_step, which check their arguments first (ids, step name and
-- counts valid, the classes within input and output, p_total_tokens the step's total) and
-- shape the answer. Checks the model's length itself.
-- Two paths:
--   * the report's reservation is active: the step is recorded unbilled; finalize or the
--     sweep bills it. Locks the reservation row FOR NO KEY UPDATE (finalize and the sweep,
--     which lock it FOR UPDATE, wait for the steps being recorded, so no step can slip in
--     unbilled behind a finalize; the steps of one report are recorded one after the other,
--     so each one's overrun sum counts the steps committed before it; under FOR SHARE, as
--     before, two steps recorded at once each summed without the other and neither answer
--     carried over_reservation).
--   * the reservation is completed or expired (the report was billed): the step is billed at
--     once into the reservation's period ("late": true). Locks, in order: the period row
--     (FOR UPDATE), then the report row (its token_usage gains the step's total in
--     totalTokens and lateTokens, 1 in lateSteps, its cost in costMicros, and 1 in
--     unpricedSteps when it has none). The period lock also
--     serialises late steps of one report, so a late step is billed once. Since version
--     20261210000000 it also locks the budgets the reservation holds (after the period, in id
--     order) and adds the step's tokens and cost to the windows the reservation was granted in.
-- Cost: a new step with a model first takes model_prices IN ROW SHARE MODE (a table lock, in
--   the fast path: it conflicts only with set_model_price's EXCLUSIVE), then prices itself with
--   the price in effect at its completed_at (now(), the column's default), once: cost_micros is
--   stored with the row and never recomputed. NULL when the model has no price then.
-- Global lock order (shared by every function, docs/REVIEW.md): model_prices (table),
--   reservation, period, budgets, report, steps and budget windows.
-- Writes: one report_step_usage row; for a late step also one usage_ledger row (late_step),
--   usage_periods.tokens_used and reports.token_usage.
-- Idempotent: the same (report, step) with the same numbers (every class and the total) is a
--   retry ("duplicate": true, nothing written); different numbers are refused with
--   step_conflict and the first record stands. Answers for a report that already has an
--   outcome carry "report_status".
-- Answer keys: success, step_id, total_tokens, duplicate, late, cost_micros (and
--   report_status; and once the report's recorded total_tokens pass its reserved_tokens,
--   over_reservation true with over_by, reserved_tokens and recorded_tokens); refusals
--   report_account_mismatch, reservation_not_found, step_conflict (with step_id and the
--   recorded numbers, every class).
-- Errors: 22001 a model over 200 characters.
CREATE OR REPLACE FUNCTION tokentrack.record_step_usage(
    p_report_id uuid,
    p_account_id uuid,
    p_step_name text,
    p_input_tokens integer,
    p_cached_input_tokens integer,
    p_cache_write_tokens integer,
    p_output_tokens integer,
    p_reasoning_tokens integer,
    p_total_tokens bigint,
    p_model text
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_reservation tokentrack.report_reservations%ROWTYPE;
    v_step tokentrack.report_step_usage%ROWTYPE;
    v_cost bigint;
    v_entry_id bigint;
    v_inserted boolean := false;
    v_report_status text;
    v_answer jsonb;
    v_recorded bigint;
BEGIN
    IF pg_catalog.length(p_model) > 200 THEN
        RAISE EXCEPTION 'p_model must be at most 200 characters (got %)', pg_catalog.length(p_model)
            USING ERRCODE = '22001', COLUMN = 'p_model';
    END IF;

    SELECT rr.* INTO v_reservation FROM tokentrack.report_reservations AS rr WHERE rr.report_id = p_report_id;
    IF NOT FOUND THEN
        IF EXISTS (
            SELECT FROM tokentrack.reports AS r WHERE r.id = p_report_id AND r.account_id <> p_account_id
        ) THEN
            RETURN pg_catalog.jsonb_build_object(
                'success', false, 'error', 'report_account_mismatch',
                'message', pg_catalog.format('report %s belongs to another account', p_report_id)
            );
        END IF;
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'reservation_not_found',
            'message', pg_catalog.format('report %s has no reservation', p_report_id)
        );
    END IF;
    IF v_reservation.account_id <> p_account_id THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'report_account_mismatch',
            'message', pg_catalog.format('report %s belongs to another account', p_report_id)
        );
    END IF;

    -- A step's numbers never change once written: a committed row answers retries unlocked.
    SELECT s.* INTO v_step FROM tokentrack.report_step_usage AS s
    WHERE s.report_id = p_report_id AND s.step_name = p_step_name;
    IF NOT FOUND THEN
        IF p_model IS NOT NULL THEN
            -- Before the price is read: see set_model_price.
            LOCK TABLE tokentrack.model_prices IN ROW SHARE MODE;
            v_cost := tokentrack.step_cost_micros(
                tokentrack.model_price_at(p_model, pg_catalog.now()),
                p_input_tokens, p_cached_input_tokens, p_cache_write_tokens,
                p_output_tokens, p_reasoning_tokens
            );
        END IF;

        IF v_reservation.status = 'active' THEN
            SELECT rr.status, rr.reserved_tokens INTO v_reservation.status, v_reservation.reserved_tokens
            FROM tokentrack.report_reservations AS rr WHERE rr.id = v_reservation.id
            FOR NO KEY UPDATE;
        END IF;

        IF v_reservation.status = 'active' THEN
            INSERT INTO tokentrack.report_step_usage (
                report_id, account_id, step_name, input_tokens, cached_input_tokens,
                cache_write_tokens, output_tokens, reasoning_tokens, total_tokens, model,
                completed_at, cost_micros
            )
            VALUES (
                p_report_id, p_account_id, p_step_name, p_input_tokens, p_cached_input_tokens,
                p_cache_write_tokens, p_output_tokens, p_reasoning_tokens, p_total_tokens, p_model,
                pg_catalog.now(), v_cost
            )
            ON CONFLICT ON CONSTRAINT report_step_usage_one_per_step DO NOTHING
            RETURNING * INTO v_step;
            v_inserted := FOUND;
        ELSE
            -- Late: the report was billed. Bill this step at once, into the same period.
            PERFORM FROM tokentrack.usage_periods AS p WHERE p.id = v_reservation.period_id FOR UPDATE;
            IF v_reservation.holds IS NOT NULL THEN
                PERFORM tokentrack.lock_reservation_budgets(p_account_id, v_reservation.holds);
            END IF;
            IF NOT EXISTS (
                SELECT FROM tokentrack.report_step_usage AS s
                WHERE s.report_id = p_report_id AND s.step_name = p_step_name
            ) THEN
                INSERT INTO tokentrack.usage_ledger (account_id, period_id, kind, tokens, report_id)
                VALUES (p_account_id, v_reservation.period_id, 'late_step', p_total_tokens, p_report_id)
                RETURNING id INTO v_entry_id;

                INSERT INTO tokentrack.report_step_usage (
                    report_id, account_id, step_name, input_tokens, cached_input_tokens,
                    cache_write_tokens, output_tokens, reasoning_tokens, total_tokens, model,
                    completed_at, cost_micros, billed_at, billed_period_id, billing_entry_id, late
                )
                VALUES (
                    p_report_id, p_account_id, p_step_name, p_input_tokens, p_cached_input_tokens,
                    p_cache_write_tokens, p_output_tokens, p_reasoning_tokens, p_total_tokens,
                    p_model, pg_catalog.now(), v_cost, pg_catalog.now(), v_reservation.period_id,
                    v_entry_id, true
                )
                RETURNING * INTO v_step;
                v_inserted := true;

                UPDATE tokentrack.usage_periods AS p
                SET tokens_used = p.tokens_used + p_total_tokens
                WHERE p.id = v_reservation.period_id;

                UPDATE tokentrack.reports AS r
                SET token_usage = COALESCE(r.token_usage, '{}'::jsonb) || pg_catalog.jsonb_build_object(
                    'totalTokens', COALESCE((r.token_usage ->> 'totalTokens')::bigint, 0) + p_total_tokens,
                    'lateTokens', COALESCE((r.token_usage ->> 'lateTokens')::bigint, 0) + p_total_tokens,
                    'lateSteps', COALESCE((r.token_usage ->> 'lateSteps')::bigint, 0) + 1,
                    -- As totalTokens, the report's cost counts its late steps; the class sums,
                    -- as inputTokens and outputTokens, cover the steps billed with the
                    -- reservation (so each stays within its whole).
                    'costMicros', COALESCE((r.token_usage ->> 'costMicros')::bigint, 0) + COALESCE(v_cost, 0),
                    'unpricedSteps',
                    COALESCE((r.token_usage ->> 'unpricedSteps')::bigint, 0)
                    + CASE WHEN v_cost IS NULL THEN 1 ELSE 0 END
                )
                WHERE r.id = p_report_id;

                -- The windows its reservation was granted in (version 20261210000000; rank 6,
                -- after the report).
                IF v_reservation.holds IS NOT NULL THEN
                    PERFORM tokentrack.bill_budget_windows(
                        p_account_id, v_reservation.holds, p_total_tokens, COALESCE(v_cost, 0)
                    );
                END IF;
            END IF;
        END IF;

        IF NOT v_inserted THEN
            -- An identical call committed the same step while this one ran.
            SELECT s.* INTO v_step FROM tokentrack.report_step_usage AS s
            WHERE s.report_id = p_report_id AND s.step_name = p_step_name;
        END IF;
    END IF;

    SELECT r.status INTO v_report_status FROM tokentrack.reports AS r WHERE r.id = p_report_id;

    IF v_inserted OR (
        v_step.input_tokens = p_input_tokens
        AND v_step.cached_input_tokens = p_cached_input_tokens
        AND v_step.cache_write_tokens = p_cache_write_tokens
        AND v_step.output_tokens = p_output_tokens
        AND v_step.reasoning_tokens = p_reasoning_tokens
        AND v_step.total_tokens = p_total_tokens
    ) THEN
        v_answer := pg_catalog.jsonb_build_object(
            'success', true, 'step_id', v_step.id, 'total_tokens', v_step.total_tokens,
            'duplicate', NOT v_inserted, 'late', v_step.late, 'cost_micros', v_step.cost_micros
        );
    ELSE
        v_answer := pg_catalog.jsonb_build_object(
            'success', false, 'error', 'step_conflict',
            'message', pg_catalog.format(
                'step %s of report %s was already recorded with other numbers', p_step_name, p_report_id
            ),
            'step_id', v_step.id,
            'recorded', pg_catalog.jsonb_build_object(
                'input_tokens', v_step.input_tokens,
                'cached_input_tokens', v_step.cached_input_tokens,
                'cache_write_tokens', v_step.cache_write_tokens,
                'output_tokens', v_step.output_tokens,
                'reasoning_tokens', v_step.reasoning_tokens,
                'total_tokens', v_step.total_tokens
            )
        );
    END IF;

    IF v_report_status IN ('complete', 'failed', 'cancelled') THEN
        v_answer := v_answer || pg_catalog.jsonb_build_object('report_status', v_report_status);
    END IF;
    -- Overrun (version 20261210000000): the report's recorded tokens past what it reserved.
    -- A statement of its own, after the reservation lock: its snapshot has every step of the
    -- report committed before this one.
    IF (v_answer ->> 'success')::boolean THEN
        SELECT pg_catalog.sum(s.total_tokens) INTO v_recorded
        FROM tokentrack.report_step_usage AS s WHERE s.report_id = p_report_id;
        IF v_recorded > v_reservation.reserved_tokens THEN
            v_answer := v_answer || pg_catalog.jsonb_build_object(
                'over_reservation', true,
                'over_by', v_recorded - v_reservation.reserved_tokens,
                'reserved_tokens', v_reservation.reserved_tokens,
                'recorded_tokens', v_recorded
            );
        END IF;
    END IF;
    RETURN v_answer;
END
$function$;

COMMENT ON FUNCTION tokentrack.record_step_usage(
    uuid, uuid, text, integer, integer, integer, integer, integer, bigint, text
) IS
'Internal: records one finished step with its token classes and cost (persist_step_usage and '
'record_step check their arguments and call it).';

REVOKE ALL ON FUNCTION tokentrack.record_step_usage(
    uuid, uuid, text, integer, integer, integer, integer, integer, bigint, text
) FROM PUBLIC;
