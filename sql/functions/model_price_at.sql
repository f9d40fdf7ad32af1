-- version: 20261203000000
--
-- tokentrack.model_price_at(p_model text, p_at timestamptz) -> tokentrack.model_prices
--
-- Internal (no EXECUTE for application roles). The price of model p_model in effect at p_at:
-- of every model_prices row with effective_from <= p_at, the newest one of the exact name
-- p_model; when the exact name has none in effect, the newest one of each pattern that
-- matches p_model (`*` matches any run of characters; case-sensitive) and, of those, the
-- pattern with the most characters other than `*` (a tie: the smallest pattern text, byte
-- by byte: COLLATE "C", the same on every installation).
-- So an exact name always wins over a pattern, and `gpt-4o-mini*` wins over `gpt-4o*`.
-- A row of NULLs when no price is in effect (or p_model is NULL): the step is unpriced.
-- Reads by model_prices_one_per_start (the exact name) and model_prices_patterns_idx.
-- Locks nothing, writes nothing.
-- PL/pgSQL since version 20261214000000 (it was LANGUAGE sql, whose statement PostgreSQL before
-- 18 plans again at every call: once per recorded step); the same statement, the same answer.
CREATE OR REPLACE FUNCTION tokentrack.model_price_at(p_model text, p_at timestamptz)
RETURNS tokentrack.model_prices
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_price tokentrack.model_prices;
BEGIN
    -- No row: v_price stays a row of NULLs.
    SELECT c.* INTO v_price FROM (
        (
            SELECT mp.* FROM tokentrack.model_prices AS mp
            WHERE mp.model = p_model AND NOT mp.is_pattern AND mp.effective_from <= p_at
            ORDER BY mp.effective_from DESC
            LIMIT 1
        )
        UNION ALL
        (
            SELECT DISTINCT ON (mp.model) mp.* FROM tokentrack.model_prices AS mp
            WHERE mp.is_pattern AND p_model LIKE mp.like_pattern AND mp.effective_from <= p_at
            ORDER BY mp.model ASC, mp.effective_from DESC
        )
    ) AS c
    ORDER BY c.is_pattern ASC, c.specificity DESC, c.model COLLATE "C" ASC
    LIMIT 1;
    RETURN v_price;
END
$function$;

COMMENT ON FUNCTION tokentrack.model_price_at(text, timestamptz) IS
'Internal: the model''s price in effect at a moment: the exact name''s newest price, else the '
'most specific matching pattern''s; NULLs when unpriced.';

REVOKE ALL ON FUNCTION tokentrack.model_price_at(text, timestamptz) FROM PUBLIC;
