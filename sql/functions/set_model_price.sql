-- version: 20261203000000
--
-- tokentrack.set_model_price(p_model text, p_prices jsonb, p_effective_from timestamptz DEFAULT now())
--     -> jsonb
--
-- Adds a price for p_model (an exact model name, or a pattern where `*` matches any run of
-- characters; see model_price_at for which one prices a step) from p_effective_from on.
-- p_prices holds input and output (required) and cached_input, cache_write, reasoning
-- (optional: cached input and cache write default to the input price, reasoning to the output
-- price), each a non-negative JSON number of micros per million tokens (fractions allowed).
-- Prices are never edited in place: a new price is a new model_prices row.
-- When the price takes effect: a p_effective_from before the start of the calling
-- transaction is refused (the steps recorded since were priced already, and their costs are
-- never repriced). A p_effective_from that has passed by the time the lock below is granted
-- (the default now() always has) takes effect at that moment, clock_timestamp() under the
-- lock; a later one as given. The answer says which.
-- Locks: model_prices IN EXCLUSIVE MODE (readers go on; a step being recorded with a model
--   takes ROW SHARE on it before it looks its price up, and holds it until it commits). So
--   every step that looked a price up before this one has committed before the lock is
--   granted, and had its completed_at before the new price takes effect; every later step
--   sees the new row. No step is priced by a price that a later commit would contradict.
--   Takes no other lock, so it cannot deadlock with the write functions; a transaction that
--   recorded a step with a model (and so holds ROW SHARE) is refused with 25000 rather than
--   left to deadlock with another one doing the same.
-- Writes: one model_prices row, unless the price in effect for exactly this model name at
--   that moment has these prices already: then nothing, "duplicate": true (so importing the
--   same price list twice adds nothing).
-- Answer: {"success": true, "price_id", "duplicate", "model", "effective_from",
--   "prices": {"input", "cached_input", "cache_write", "output", "reasoning"}}; a price with
--   the same model and effective_from but other prices is refused with price_conflict.
-- EXECUTE: the schema owner only (the installer's role); grant it to a pricing role if needed.
-- Errors: 25000 in a transaction that recorded a step with a model; 22004 a NULL model,
--   prices or effective_from, or a NULL price; 22023 a blank model, prices not an object, an
--   unknown key, a missing input or output, a price that is not a number or is negative, an
--   effective_from in the past; 22001 a model over 200 characters; 22003 a price above 10^12.
CREATE OR REPLACE FUNCTION tokentrack.set_model_price(
    p_model text,
    p_prices jsonb,
    p_effective_from timestamptz DEFAULT pg_catalog.now()
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_key text;
    v_value jsonb;
    v_input numeric;
    v_cached_input numeric;
    v_cache_write numeric;
    v_output numeric;
    v_reasoning numeric;
    v_effective timestamptz;
    v_in_effect tokentrack.model_prices%ROWTYPE;
    v_row tokentrack.model_prices%ROWTYPE;
    v_duplicate boolean := false;
BEGIN
    IF p_model IS NULL THEN
        RAISE EXCEPTION 'p_model must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_model';
    END IF;
    IF pg_catalog.btrim(p_model) = '' THEN
        RAISE EXCEPTION 'p_model must not be empty' USING ERRCODE = '22023', COLUMN = 'p_model';
    END IF;
    IF pg_catalog.length(p_model) > 200 THEN
        RAISE EXCEPTION 'p_model must be at most 200 characters (got %)', pg_catalog.length(p_model)
            USING ERRCODE = '22001', COLUMN = 'p_model';
    END IF;
    IF p_prices IS NULL THEN
        RAISE EXCEPTION 'p_prices must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_prices';
    END IF;
    IF pg_catalog.jsonb_typeof(p_prices) <> 'object' THEN
        RAISE EXCEPTION 'p_prices must be a JSON object (got %)', pg_catalog.jsonb_typeof(p_prices)
            USING ERRCODE = '22023', COLUMN = 'p_prices';
    END IF;
    IF p_effective_from IS NULL THEN
        RAISE EXCEPTION 'p_effective_from must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_effective_from';
    END IF;
    IF p_effective_from < pg_catalog.now() THEN
        RAISE EXCEPTION 'p_effective_from (%) is in the past: costs already recorded are never repriced',
            p_effective_from
            USING ERRCODE = '22023', COLUMN = 'p_effective_from',
            HINT = 'Set the new price from now (the default) or from a moment to come.';
    END IF;
    FOR v_key, v_value IN SELECT e.key, e.value FROM pg_catalog.jsonb_each(p_prices) AS e ORDER BY e.key LOOP
        IF v_key NOT IN ('input', 'cached_input', 'cache_write', 'output', 'reasoning') THEN
            RAISE EXCEPTION 'unknown key p_prices.%: the keys are input, output, cached_input, cache_write and reasoning',
                v_key
                USING ERRCODE = '22023', COLUMN = 'p_prices.' || v_key;
        END IF;
        IF pg_catalog.jsonb_typeof(v_value) = 'null' THEN
            RAISE EXCEPTION 'p_prices.% must not be null', v_key
                USING ERRCODE = '22004', COLUMN = 'p_prices.' || v_key;
        END IF;
        IF pg_catalog.jsonb_typeof(v_value) <> 'number' THEN
            RAISE EXCEPTION 'p_prices.% must be a number of micros per million tokens (got %)',
                v_key, pg_catalog.jsonb_typeof(v_value)
                USING ERRCODE = '22023', COLUMN = 'p_prices.' || v_key;
        END IF;
        IF (v_value #>> '{}')::numeric < 0 THEN
            RAISE EXCEPTION 'p_prices.% must not be negative (got %)', v_key, v_value #>> '{}'
                USING ERRCODE = '22023', COLUMN = 'p_prices.' || v_key;
        END IF;
        IF (v_value #>> '{}')::numeric > 1e12 THEN
            RAISE EXCEPTION 'p_prices.% must be at most 10^12 micros per million tokens (got %)',
                v_key, v_value #>> '{}'
                USING ERRCODE = '22003', COLUMN = 'p_prices.' || v_key;
        END IF;
    END LOOP;
    IF NOT p_prices ? 'input' THEN
        RAISE EXCEPTION 'p_prices.input is required' USING ERRCODE = '22023', COLUMN = 'p_prices.input';
    END IF;
    IF NOT p_prices ? 'output' THEN
        RAISE EXCEPTION 'p_prices.output is required' USING ERRCODE = '22023', COLUMN = 'p_prices.output';
    END IF;
    v_input := (p_prices ->> 'input')::numeric;
    v_output := (p_prices ->> 'output')::numeric;
    v_cached_input := COALESCE((p_prices ->> 'cached_input')::numeric, v_input);
    v_cache_write := COALESCE((p_prices ->> 'cache_write')::numeric, v_input);
    v_reasoning := COALESCE((p_prices ->> 'reasoning')::numeric, v_output);

    -- A transaction that recorded a step with a model holds ROW SHARE: two of them setting a
    -- price would each wait for the other's. Refused at once instead of a deadlock.
    IF EXISTS (
        SELECT FROM pg_catalog.pg_locks AS l
        WHERE
            l.pid = pg_catalog.pg_backend_pid()
            AND l.locktype = 'relation'
            AND l.relation = 'tokentrack.model_prices'::pg_catalog.regclass
            AND l.mode = 'RowShareLock'
    ) THEN
        RAISE EXCEPTION 'set_model_price must run in a transaction that recorded no step with a model'
            USING ERRCODE = '25000',
            HINT = 'Set prices in a transaction of their own (tokentrack prices import does).';
    END IF;
    LOCK TABLE tokentrack.model_prices IN EXCLUSIVE MODE;
    v_effective := GREATEST(p_effective_from, pg_catalog.clock_timestamp());

    SELECT mp.* INTO v_in_effect FROM tokentrack.model_prices AS mp
    WHERE mp.model = p_model AND mp.effective_from <= v_effective
    ORDER BY mp.effective_from DESC
    LIMIT 1;
    IF FOUND AND v_in_effect.input = v_input AND v_in_effect.cached_input = v_cached_input
        AND v_in_effect.cache_write = v_cache_write AND v_in_effect.output = v_output
        AND v_in_effect.reasoning = v_reasoning THEN
        v_row := v_in_effect;
        v_duplicate := true;
    ELSIF FOUND AND v_in_effect.effective_from = v_effective THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'price_conflict',
            'message', pg_catalog.format(
                'model %s already has other prices from %s', p_model, v_effective
            ),
            'price_id', v_in_effect.id
        );
    ELSE
        INSERT INTO tokentrack.model_prices (
            model, effective_from, input, cached_input, cache_write, output, reasoning
        )
        VALUES (p_model, v_effective, v_input, v_cached_input, v_cache_write, v_output, v_reasoning)
        RETURNING * INTO v_row;
    END IF;

    RETURN pg_catalog.jsonb_build_object(
        'success', true,
        'price_id', v_row.id,
        'duplicate', v_duplicate,
        'model', v_row.model,
        'effective_from', v_row.effective_from,
        'prices', pg_catalog.jsonb_build_object(
            'input', v_row.input,
            'cached_input', v_row.cached_input,
            'cache_write', v_row.cache_write,
            'output', v_row.output,
            'reasoning', v_row.reasoning
        )
    );
END
$function$;

COMMENT ON FUNCTION tokentrack.set_model_price(text, jsonb, timestamptz) IS
'Adds a price (micros per million tokens per token class) for a model name or pattern from '
'p_effective_from on; never edits one. The same price again is a duplicate.';

REVOKE ALL ON FUNCTION tokentrack.set_model_price(text, jsonb, timestamptz) FROM PUBLIC;
