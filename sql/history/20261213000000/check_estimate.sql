-- version: 20261210000000
--
-- tokentrack.check_estimate(p_estimate jsonb, p_name text) -> tokentrack.reservation_estimate
--
-- Internal (no EXECUTE for application roles): checks reserve's p_estimate (and
-- extend_reservation's p_more; p_name is the argument's name for the messages) and returns
-- (tokens, cost_micros). A JSON object: tokens (required, a positive whole number) and at most
-- one of cost_micros (a whole number, not negative) and model (a model name: the tokens priced
-- at that model's dearest class, from its price in effect now, rounded half up; an unpriced
-- model gives no cost estimate, cost_micros NULL). A key given as null is absent.
-- Locks nothing, writes nothing.
-- Errors: 22004 a NULL p_estimate or a missing tokens; 22023 not an object, an unknown key,
--   tokens not a positive whole number, cost_micros not a whole number >= 0, both cost_micros
--   and model, a model that is not a string; 22001 a model over 200 characters; 22003 tokens
--   beyond the integer range or cost_micros beyond bigint. The message and COLUMN name the
--   field as <p_name>.<key>.
CREATE OR REPLACE FUNCTION tokentrack.check_estimate(p_estimate jsonb, p_name text)
RETURNS tokentrack.reservation_estimate
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_key text;
    v_value jsonb;
    v_number numeric;
    v_model text;
    v_price tokentrack.model_prices%ROWTYPE;
    v_result tokentrack.reservation_estimate;
BEGIN
    IF p_estimate IS NULL THEN
        RAISE EXCEPTION '% must not be NULL', p_name USING ERRCODE = '22004', COLUMN = p_name;
    END IF;
    IF pg_catalog.jsonb_typeof(p_estimate) <> 'object' THEN
        RAISE EXCEPTION '% must be a JSON object (got %)', p_name, pg_catalog.jsonb_typeof(p_estimate)
            USING ERRCODE = '22023', COLUMN = p_name;
    END IF;
    FOR v_key, v_value IN SELECT e.key, e.value FROM pg_catalog.jsonb_each(p_estimate) AS e ORDER BY e.key LOOP
        IF v_key NOT IN ('tokens', 'cost_micros', 'model') THEN
            RAISE EXCEPTION 'unknown key %.%: the keys are tokens, cost_micros and model', p_name, v_key
                USING ERRCODE = '22023', COLUMN = p_name || '.' || v_key;
        END IF;
        CONTINUE WHEN pg_catalog.jsonb_typeof(v_value) = 'null';
        IF v_key = 'model' THEN
            IF pg_catalog.jsonb_typeof(v_value) <> 'string' THEN
                RAISE EXCEPTION '%.model must be a model name (got %)', p_name, pg_catalog.jsonb_typeof(v_value)
                    USING ERRCODE = '22023', COLUMN = p_name || '.model';
            END IF;
            v_model := v_value #>> '{}';
            IF pg_catalog.length(v_model) > 200 THEN
                RAISE EXCEPTION '%.model must be at most 200 characters (got %)', p_name, pg_catalog.length(v_model)
                    USING ERRCODE = '22001', COLUMN = p_name || '.model';
            END IF;
            CONTINUE;
        END IF;
        IF pg_catalog.jsonb_typeof(v_value) <> 'number' THEN
            RAISE EXCEPTION '%.% must be a number (got %)', p_name, v_key, pg_catalog.jsonb_typeof(v_value)
                USING ERRCODE = '22023', COLUMN = p_name || '.' || v_key;
        END IF;
        v_number := (v_value #>> '{}')::numeric;
        IF v_number <> pg_catalog.trunc(v_number) THEN
            RAISE EXCEPTION '%.% must be a whole number (got %)', p_name, v_key, v_number
                USING ERRCODE = '22023', COLUMN = p_name || '.' || v_key;
        END IF;
        IF v_key = 'tokens' THEN
            IF v_number <= 0 THEN
                RAISE EXCEPTION '%.tokens must be positive (got %)', p_name, v_number
                    USING ERRCODE = '22023', COLUMN = p_name || '.tokens';
            END IF;
            IF v_number > 2147483647 THEN
                RAISE EXCEPTION '%.tokens (%) exceeds the integer range', p_name, v_number
                    USING ERRCODE = '22003', COLUMN = p_name || '.tokens';
            END IF;
            v_result.tokens := v_number::integer;
        ELSE
            IF v_number < 0 THEN
                RAISE EXCEPTION '%.cost_micros must not be negative (got %)', p_name, v_number
                    USING ERRCODE = '22023', COLUMN = p_name || '.cost_micros';
            END IF;
            IF v_number > 9223372036854775807 THEN
                RAISE EXCEPTION '%.cost_micros (%) exceeds the bigint range', p_name, v_number
                    USING ERRCODE = '22003', COLUMN = p_name || '.cost_micros';
            END IF;
            v_result.cost_micros := v_number::bigint;
        END IF;
    END LOOP;
    IF v_result.tokens IS NULL THEN
        RAISE EXCEPTION '%.tokens is required', p_name USING ERRCODE = '22004', COLUMN = p_name || '.tokens';
    END IF;
    IF v_result.cost_micros IS NOT NULL AND v_model IS NOT NULL THEN
        RAISE EXCEPTION '%.cost_micros and %.model are both given: give one of them', p_name, p_name
            USING ERRCODE = '22023', COLUMN = p_name || '.model';
    END IF;
    IF v_model IS NOT NULL THEN
        v_price := tokentrack.model_price_at(v_model, pg_catalog.now());
        IF v_price.id IS NOT NULL THEN
            v_result.cost_micros := pg_catalog.round(
                v_result.tokens::numeric * GREATEST(
                    v_price.input, v_price.cached_input, v_price.cache_write, v_price.output,
                    v_price.reasoning
                ) * 0.000001
            )::bigint;
        END IF;
    END IF;
    RETURN v_result;
END
$function$;

COMMENT ON FUNCTION tokentrack.check_estimate(jsonb, text) IS
'Internal: checks a reservation estimate (tokens, and cost_micros or a model to price them) '
'and returns (tokens, cost_micros).';

REVOKE ALL ON FUNCTION tokentrack.check_estimate(jsonb, text) FROM PUBLIC;
