-- version: 20261211000000
--
-- tokentrack.check_correction_text(p_value text, p_column text, p_max integer) -> void
--
-- Internal (no EXECUTE for application roles). Checks an idempotency key or a reason of
-- grant_credits, adjust_usage and refund_report: 22004 when NULL, 22023 when empty or blank,
-- 22001 when longer than p_max characters (200 for a key, 1000 for a reason), as step names
-- and subjects are checked. The error's COLUMN is p_column.
-- Locks nothing, writes nothing.
CREATE OR REPLACE FUNCTION tokentrack.check_correction_text(p_value text, p_column text, p_max integer)
RETURNS void
LANGUAGE plpgsql
IMMUTABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
    IF p_value IS NULL THEN
        RAISE EXCEPTION '% must not be NULL', p_column USING ERRCODE = '22004', COLUMN = p_column;
    END IF;
    IF pg_catalog.btrim(p_value) = '' THEN
        RAISE EXCEPTION '% must not be empty', p_column USING ERRCODE = '22023', COLUMN = p_column;
    END IF;
    IF pg_catalog.length(p_value) > p_max THEN
        RAISE EXCEPTION '% must be at most % characters (got %)', p_column, p_max, pg_catalog.length(p_value)
            USING ERRCODE = '22001', COLUMN = p_column;
    END IF;
END
$function$;

COMMENT ON FUNCTION tokentrack.check_correction_text(text, text, integer) IS
'Internal: checks an idempotency key or a reason (22004 NULL, 22023 blank, 22001 too long).';

REVOKE ALL ON FUNCTION tokentrack.check_correction_text(text, text, integer) FROM PUBLIC;
