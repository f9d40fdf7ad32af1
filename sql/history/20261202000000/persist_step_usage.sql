-- version: 20260108000000
--
-- tokentrack.persist_step_usage(p_report_id, p_account_id, p_step_name, p_input_tokens,
--                               p_output_tokens, p_total_tokens, p_model) -> jsonb
--
-- Records one finished step of a report. p_total_tokens NULL means input + output; a larger
-- total may count cache or reasoning tokens; a smaller one is invalid.
-- Two paths:
--   * the report's reservation is active: the step is recorded unbilled; finalize or the
--     sweep bills it. Locks the reservation row FOR SHARE (many steps of one report run
--     together; finalize and the sweep, which lock it FOR UPDATE, wait for them), so no step
--     can slip in unbilled behind a finalize.
--   * the reservation is completed or expired (the report was billed): the step is billed at
--     once into the reservation's period ("late": true). Locks, in order: the period row
--     (FOR UPDATE), then the report row (its token_usage is updated). The period lock also
--     serialises late steps of one report, so a late step is billed once.
-- Global lock order (shared by every function): reservation, period, report, steps.
-- Writes: one report_step_usage row; for a late step also one usage_ledger row (late_step),
--   usage_periods.tokens_used and reports.token_usage.
-- Idempotent: the same (report, step) with the same numbers is a retry ("duplicate": true,
--   nothing written); different numbers are refused with step_conflict and the first record
--   stands. Answers for a report that already has an outcome carry "report_status".
-- Refusals: report_account_mismatch, reservation_not_found, step_conflict.
-- Errors: 25000 when run under REPEATABLE READ or SERIALIZABLE (READ COMMITTED only, see
--   docs/REVIEW.md); 22004 a NULL id, step name or token count; 22023 a negative count, a
--   total below input + output, a blank step name; 22001 a step name or model over 200
--   characters; 22003 input + output beyond the integer range.
CREATE OR REPLACE FUNCTION tokentrack.persist_step_usage(
    p_report_id uuid,
    p_account_id uuid,
    p_step_name text,
    p_input_tokens integer,
    p_output_tokens integer,
    p_total_tokens integer,
    p_model text
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_total bigint;
    v_reservation tokentrack.report_reservations%ROWTYPE;
    v_step tokentrack.report_step_usage%ROWTYPE;
    v_entry_id bigint;
    v_inserted boolean := false;
    v_report_status text;
    v_answer jsonb;
BEGIN
    -- READ COMMITTED only: see require_read_committed.
    PERFORM tokentrack.require_read_committed('persist_step_usage');
    IF p_report_id IS NULL THEN
        RAISE EXCEPTION 'p_report_id must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_report_id';
    END IF;
    IF p_account_id IS NULL THEN
        RAISE EXCEPTION 'p_account_id must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_account_id';
    END IF;
    IF p_step_name IS NULL THEN
        RAISE EXCEPTION 'p_step_name must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_step_name';
    END IF;
    IF pg_catalog.btrim(p_step_name) = '' THEN
        RAISE EXCEPTION 'p_step_name must not be empty' USING ERRCODE = '22023', COLUMN = 'p_step_name';
    END IF;
    IF pg_catalog.length(p_step_name) > 200 THEN
        RAISE EXCEPTION 'p_step_name must be at most 200 characters (got %)', pg_catalog.length(p_step_name)
            USING ERRCODE = '22001', COLUMN = 'p_step_name';
    END IF;
    IF p_input_tokens IS NULL THEN
        RAISE EXCEPTION 'p_input_tokens must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_input_tokens';
    END IF;
    IF p_input_tokens < 0 THEN
        RAISE EXCEPTION 'p_input_tokens must not be negative (got %)', p_input_tokens
            USING ERRCODE = '22023', COLUMN = 'p_input_tokens';
    END IF;
    IF p_output_tokens IS NULL THEN
        RAISE EXCEPTION 'p_output_tokens must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_output_tokens';
    END IF;
    IF p_output_tokens < 0 THEN
        RAISE EXCEPTION 'p_output_tokens must not be negative (got %)', p_output_tokens
            USING ERRCODE = '22023', COLUMN = 'p_output_tokens';
    END IF;
    v_total := p_input_tokens::bigint + p_output_tokens::bigint;
    IF p_total_tokens IS NULL THEN
        IF v_total > 2147483647 THEN
            RAISE EXCEPTION 'p_total_tokens (NULL, so p_input_tokens + p_output_tokens = %) exceeds the integer range', v_total
                USING ERRCODE = '22003', COLUMN = 'p_total_tokens';
        END IF;
    ELSIF p_total_tokens < v_total THEN
        RAISE EXCEPTION 'p_total_tokens (%) must not be below p_input_tokens + p_output_tokens (%)',
            p_total_tokens, v_total
            USING ERRCODE = '22023', COLUMN = 'p_total_tokens';
    ELSE
        -- Explicit cast: no implicit integer-to-bigint cast at run time.
        v_total := p_total_tokens::bigint;
    END IF;
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
        IF v_reservation.status = 'active' THEN
            SELECT rr.status INTO v_reservation.status
            FROM tokentrack.report_reservations AS rr WHERE rr.id = v_reservation.id
            FOR SHARE;
        END IF;

        IF v_reservation.status = 'active' THEN
            INSERT INTO tokentrack.report_step_usage (
                report_id, account_id, step_name, input_tokens, output_tokens, total_tokens, model
            )
            VALUES (p_report_id, p_account_id, p_step_name, p_input_tokens, p_output_tokens, v_total, p_model)
            ON CONFLICT ON CONSTRAINT report_step_usage_one_per_step DO NOTHING
            RETURNING * INTO v_step;
            v_inserted := FOUND;
        ELSE
            -- Late: the report was billed. Bill this step at once, into the same period.
            PERFORM FROM tokentrack.usage_periods AS p WHERE p.id = v_reservation.period_id FOR UPDATE;
            IF NOT EXISTS (
                SELECT FROM tokentrack.report_step_usage AS s
                WHERE s.report_id = p_report_id AND s.step_name = p_step_name
            ) THEN
                INSERT INTO tokentrack.usage_ledger (account_id, period_id, kind, tokens, report_id)
                VALUES (p_account_id, v_reservation.period_id, 'late_step', v_total, p_report_id)
                RETURNING id INTO v_entry_id;

                INSERT INTO tokentrack.report_step_usage (
                    report_id, account_id, step_name, input_tokens, output_tokens, total_tokens, model,
                    billed_at, billed_period_id, billing_entry_id, late
                )
                VALUES (
                    p_report_id, p_account_id, p_step_name, p_input_tokens, p_output_tokens, v_total,
                    p_model, pg_catalog.now(), v_reservation.period_id, v_entry_id, true
                )
                RETURNING * INTO v_step;
                v_inserted := true;

                UPDATE tokentrack.usage_periods AS p
                SET tokens_used = p.tokens_used + v_total
                WHERE p.id = v_reservation.period_id;

                UPDATE tokentrack.reports AS r
                SET token_usage = COALESCE(r.token_usage, '{}'::jsonb) || pg_catalog.jsonb_build_object(
                    'totalTokens', COALESCE((r.token_usage ->> 'totalTokens')::bigint, 0) + v_total,
                    'lateTokens', COALESCE((r.token_usage ->> 'lateTokens')::bigint, 0) + v_total,
                    'lateSteps', COALESCE((r.token_usage ->> 'lateSteps')::bigint, 0) + 1
                )
                WHERE r.id = p_report_id;
            END IF;
        END IF;

        IF NOT v_inserted THEN
            -- An identical call committed the same step while this one ran.
            SELECT s.* INTO v_step FROM tokentrack.report_step_usage AS s
            WHERE s.report_id = p_report_id AND s.step_name = p_step_name;
        END IF;
    END IF;

    SELECT r.status INTO v_report_status FROM tokentrack.reports AS r WHERE r.id = p_report_id;

    IF v_inserted THEN
        v_answer := pg_catalog.jsonb_build_object(
            'success', true, 'step_id', v_step.id, 'total_tokens', v_step.total_tokens,
            'duplicate', false, 'late', v_step.late
        );
    ELSIF v_step.input_tokens = p_input_tokens
        AND v_step.output_tokens = p_output_tokens
        AND v_step.total_tokens = v_total THEN
        v_answer := pg_catalog.jsonb_build_object(
            'success', true, 'step_id', v_step.id, 'total_tokens', v_step.total_tokens,
            'duplicate', true, 'late', v_step.late
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
                'output_tokens', v_step.output_tokens,
                'total_tokens', v_step.total_tokens
            )
        );
    END IF;

    IF v_report_status IN ('complete', 'failed', 'cancelled') THEN
        v_answer := v_answer || pg_catalog.jsonb_build_object('report_status', v_report_status);
    END IF;
    RETURN v_answer;
END
$function$;

COMMENT ON FUNCTION tokentrack.persist_step_usage(uuid, uuid, text, integer, integer, integer, text) IS
'Records one finished step of a report: unbilled while the reservation is active, billed at once '
'(late) after the report was billed. Retries with the same numbers are duplicates; other numbers '
'are refused with step_conflict.';

REVOKE ALL ON FUNCTION tokentrack.persist_step_usage(uuid, uuid, text, integer, integer, integer, text)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.persist_step_usage(uuid, uuid, text, integer, integer, integer, text)
TO tokentrack_service;
