-- version: 20261203000000
--
-- tokentrack.record_step(p_report_id uuid, p_account_id uuid, p_step_name text, p_usage jsonb,
--     p_model text DEFAULT NULL) -> jsonb
--
-- Records one finished step with its canonical token classes, as persist_step_usage records
-- input and output (the same retry, conflict, late and report_status rules and answer keys;
-- both run record_step_usage). p_usage is a JSON object with the counts input_tokens (every
-- prompt token, cache reads and writes included), cached_input_tokens and cache_write_tokens
-- (both part of input, disjoint), output_tokens (every generated token, reasoning included),
-- reasoning_tokens (part of output), and total_tokens (at least input + output; absent or null:
-- input + output). An absent class, or one given as null, is 0; any other key is refused.
-- The answer adds cost_micros: the step's cost from the model's price in effect at its
-- completed_at, stored with the step; null when the model (or p_model NULL) has no price.
-- Locks and writes: as persist_step_usage (see record_step_usage).
-- Refusals: report_account_mismatch, reservation_not_found, step_conflict (its "recorded"
--   numbers carry every class).
-- Errors: 25000 under REPEATABLE READ or SERIALIZABLE; 22004 a NULL id, step name or p_usage;
--   22023 a blank step name, p_usage not an object, an unknown key, a count that is not a
--   whole number or is negative, cached_input_tokens + cache_write_tokens above input_tokens,
--   reasoning_tokens above output_tokens, total_tokens below input + output; 22001 a step
--   name or model over 200 characters; 22003 a count beyond the integer range, or input +
--   output beyond it when total_tokens is absent. The message and the COLUMN field name the
--   field, as p_usage.<key>.
CREATE OR REPLACE FUNCTION tokentrack.record_step(
    p_report_id uuid,
    p_account_id uuid,
    p_step_name text,
    p_usage jsonb,
    p_model text DEFAULT NULL
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_key text;
    v_value jsonb;
    v_count numeric;
    v_input integer := 0;
    v_cached integer := 0;
    v_cache_write integer := 0;
    v_output integer := 0;
    v_reasoning integer := 0;
    v_total bigint;
BEGIN
    PERFORM tokentrack.check_step_arguments('record_step', p_report_id, p_account_id, p_step_name);
    IF p_usage IS NULL THEN
        RAISE EXCEPTION 'p_usage must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_usage';
    END IF;
    IF pg_catalog.jsonb_typeof(p_usage) <> 'object' THEN
        RAISE EXCEPTION 'p_usage must be a JSON object (got %)', pg_catalog.jsonb_typeof(p_usage)
            USING ERRCODE = '22023', COLUMN = 'p_usage';
    END IF;
    FOR v_key, v_value IN SELECT e.key, e.value FROM pg_catalog.jsonb_each(p_usage) AS e ORDER BY e.key LOOP
        IF v_key NOT IN (
            'input_tokens', 'cached_input_tokens', 'cache_write_tokens', 'output_tokens',
            'reasoning_tokens', 'total_tokens'
        ) THEN
            RAISE EXCEPTION 'unknown key p_usage.%: the keys are input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens and total_tokens',
                v_key
                USING ERRCODE = '22023', COLUMN = 'p_usage.' || v_key;
        END IF;
        CONTINUE WHEN pg_catalog.jsonb_typeof(v_value) = 'null';
        IF pg_catalog.jsonb_typeof(v_value) <> 'number' THEN
            RAISE EXCEPTION 'p_usage.% must be a number (got %)', v_key, pg_catalog.jsonb_typeof(v_value)
                USING ERRCODE = '22023', COLUMN = 'p_usage.' || v_key;
        END IF;
        v_count := (v_value #>> '{}')::numeric;
        IF v_count <> pg_catalog.trunc(v_count) THEN
            RAISE EXCEPTION 'p_usage.% must be a whole number (got %)', v_key, v_count
                USING ERRCODE = '22023', COLUMN = 'p_usage.' || v_key;
        END IF;
        IF v_count < 0 THEN
            RAISE EXCEPTION 'p_usage.% must not be negative (got %)', v_key, v_count
                USING ERRCODE = '22023', COLUMN = 'p_usage.' || v_key;
        END IF;
        IF v_count > 2147483647 THEN
            RAISE EXCEPTION 'p_usage.% (%) exceeds the integer range', v_key, v_count
                USING ERRCODE = '22003', COLUMN = 'p_usage.' || v_key;
        END IF;
        CASE v_key
            WHEN 'input_tokens' THEN v_input := v_count::integer;
            WHEN 'cached_input_tokens' THEN v_cached := v_count::integer;
            WHEN 'cache_write_tokens' THEN v_cache_write := v_count::integer;
            WHEN 'output_tokens' THEN v_output := v_count::integer;
            WHEN 'reasoning_tokens' THEN v_reasoning := v_count::integer;
            ELSE v_total := v_count::bigint;
        END CASE;
    END LOOP;
    IF v_cached > v_input THEN
        RAISE EXCEPTION 'p_usage.cached_input_tokens (%) must not exceed p_usage.input_tokens (%)',
            v_cached, v_input
            USING ERRCODE = '22023', COLUMN = 'p_usage.cached_input_tokens';
    END IF;
    IF v_cached::bigint + v_cache_write::bigint > v_input THEN
        RAISE EXCEPTION 'p_usage.cache_write_tokens (%) + p_usage.cached_input_tokens (%) must not exceed p_usage.input_tokens (%)',
            v_cache_write, v_cached, v_input
            USING ERRCODE = '22023', COLUMN = 'p_usage.cache_write_tokens';
    END IF;
    IF v_reasoning > v_output THEN
        RAISE EXCEPTION 'p_usage.reasoning_tokens (%) must not exceed p_usage.output_tokens (%)',
            v_reasoning, v_output
            USING ERRCODE = '22023', COLUMN = 'p_usage.reasoning_tokens';
    END IF;
    IF v_total IS NULL THEN
        v_total := v_input::bigint + v_output::bigint;
        IF v_total > 2147483647 THEN
            RAISE EXCEPTION 'p_usage.total_tokens (absent, so input_tokens + output_tokens = %) exceeds the integer range', v_total
                USING ERRCODE = '22003', COLUMN = 'p_usage.total_tokens';
        END IF;
    ELSIF v_total < v_input::bigint + v_output::bigint THEN
        RAISE EXCEPTION 'p_usage.total_tokens (%) must not be below input_tokens + output_tokens (%)',
            v_total, v_input::bigint + v_output::bigint
            USING ERRCODE = '22023', COLUMN = 'p_usage.total_tokens';
    END IF;

    RETURN tokentrack.record_step_usage(
        p_report_id, p_account_id, p_step_name, v_input, v_cached, v_cache_write, v_output,
        v_reasoning, v_total, p_model
    );
END
$function$;

COMMENT ON FUNCTION tokentrack.record_step(uuid, uuid, text, jsonb, text) IS
'Records one finished step with its token classes (input, cached input, cache write, output, '
'reasoning, total) and its cost, as persist_step_usage records input and output.';

REVOKE ALL ON FUNCTION tokentrack.record_step(uuid, uuid, text, jsonb, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.record_step(uuid, uuid, text, jsonb, text) TO tokentrack_service;
