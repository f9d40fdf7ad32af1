-- version: 20260108000000
--
-- tokentrack.persist_step_usage(p_report_id, p_account_id, p_step_name, p_input_tokens,
--                               p_output_tokens, p_total_tokens, p_model) -> jsonb
--
-- Records one finished step of a report. p_total_tokens NULL means input + output; a larger
-- total may count cache or reasoning tokens; a smaller one is invalid. Since version
-- 20261203000000 it checks its arguments and calls record_step_usage (the implementation it
-- shares with record_step) with 0 cached, cache-write and reasoning tokens: the step is priced
-- as record_step prices it, and the answer stays Part 1's (no cost_micros).
-- Two paths (record_step_usage):
--   * the report's reservation is active: the step is recorded unbilled; finalize or the
--     sweep bills it. Locks the reservation row FOR SHARE (many steps of one report run
--     together; finalize and the sweep, which lock it FOR UPDATE, wait for them), so no step
--     can slip in unbilled behind a finalize.
--   * the reservation is completed or expired (the report was billed): the step is billed at
--     once into the reservation's period ("late": true). Locks, in order: the period row
--     (FOR UPDATE), then the report row (its token_usage is updated). The period lock also
--     serialises late steps of one report, so a late step is billed once.
-- Global lock order (shared by every function): model_prices (table, ROW SHARE, for a new
--   step with a model), reservation, period, report, steps.
-- Writes: one report_step_usage row; for a late step also one usage_ledger row (late_step),
--   usage_periods.tokens_used and reports.token_usage.
-- Idempotent: the same (report, step) with the same numbers is a retry ("duplicate": true,
--   nothing written; a step recorded by record_step with cached, cache-write or reasoning
--   tokens is not the same numbers); different numbers are refused with step_conflict and
--   the first record stands. Answers for a report that already has an outcome carry "report_status".
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
    v_answer jsonb;
BEGIN
    PERFORM tokentrack.check_step_arguments('persist_step_usage', p_report_id, p_account_id, p_step_name);
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

    -- Part 1's numbers: no cached, cache-write or reasoning tokens.
    v_answer := tokentrack.record_step_usage(
        p_report_id, p_account_id, p_step_name, p_input_tokens, 0, 0, p_output_tokens, 0, v_total, p_model
    );
    -- Part 1's answer, key for key: no cost_micros, and a conflict's recorded numbers are input,
    -- output and total.
    v_answer := v_answer - 'cost_micros';
    IF v_answer ? 'recorded' THEN
        v_answer := pg_catalog.jsonb_set(
            v_answer, '{recorded}',
            pg_catalog.jsonb_build_object(
                'input_tokens', v_answer -> 'recorded' -> 'input_tokens',
                'output_tokens', v_answer -> 'recorded' -> 'output_tokens',
                'total_tokens', v_answer -> 'recorded' -> 'total_tokens'
            )
        );
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
