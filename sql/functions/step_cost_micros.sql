-- version: 20261203000000
--
-- tokentrack.step_cost_micros(p_price tokentrack.model_prices, p_input_tokens integer,
--     p_cached_input_tokens integer, p_cache_write_tokens integer, p_output_tokens integer,
--     p_reasoning_tokens integer) -> bigint
--
-- Internal (no EXECUTE for application roles). A step's cost in micros under a price (per
-- million tokens), as the contract defines it:
--   (input - cached - cache write) x input + cached x cached_input + cache write x cache_write
--   + (output - reasoning) x output + reasoning x reasoning, divided by 10^6, rounded half up
-- once, to a whole micro. In numeric throughout: the multiplication by 0.000001 is exact, so
-- the one rounding is round() (half away from zero, which is half up for a cost >= 0).
-- NULL when the price is NULL (unpriced). Used when a step is recorded and by reconcile().
-- PL/pgSQL since version 20261214000000 (it was LANGUAGE sql, planned again at every call
-- before PostgreSQL 18, as a function with SET is never inlined); the same expression.
CREATE OR REPLACE FUNCTION tokentrack.step_cost_micros(
    p_price tokentrack.model_prices,
    p_input_tokens integer,
    p_cached_input_tokens integer,
    p_cache_write_tokens integer,
    p_output_tokens integer,
    p_reasoning_tokens integer
)
RETURNS bigint
LANGUAGE plpgsql
IMMUTABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
    RETURN pg_catalog.round((
        (p_input_tokens::numeric - p_cached_input_tokens - p_cache_write_tokens) * (p_price).input
        + p_cached_input_tokens::numeric * (p_price).cached_input
        + p_cache_write_tokens::numeric * (p_price).cache_write
        + (p_output_tokens::numeric - p_reasoning_tokens) * (p_price).output
        + p_reasoning_tokens::numeric * (p_price).reasoning
    ) * 0.000001)::bigint;
END
$function$;

COMMENT ON FUNCTION tokentrack.step_cost_micros(
    tokentrack.model_prices, integer, integer, integer, integer, integer
) IS
'Internal: a step''s cost in micros under a price, rounded half up once; NULL when unpriced.';

REVOKE ALL ON FUNCTION tokentrack.step_cost_micros(
    tokentrack.model_prices, integer, integer, integer, integer, integer
) FROM PUBLIC;
