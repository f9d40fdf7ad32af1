-- version: 20261203000000
--
-- tokentrack.check_step_arguments(p_function text, p_report_id uuid, p_account_id uuid,
--     p_step_name text) -> void
--
-- Internal (no EXECUTE for application roles): the checks that persist_step_usage and
-- record_step make first, in this order: READ COMMITTED (require_read_committed), then the
-- ids and the step name.
-- Locks nothing, writes nothing.
-- Errors: 25000 under REPEATABLE READ or SERIALIZABLE; 22004 a NULL id or step name; 22023 a
--   blank step name; 22001 a step name over 200 characters.
CREATE OR REPLACE FUNCTION tokentrack.check_step_arguments(
    p_function text,
    p_report_id uuid,
    p_account_id uuid,
    p_step_name text
)
RETURNS void
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
    -- READ COMMITTED only: see require_read_committed.
    PERFORM tokentrack.require_read_committed(p_function);
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
END
$function$;

COMMENT ON FUNCTION tokentrack.check_step_arguments(text, uuid, uuid, text) IS
'Internal: READ COMMITTED, the ids and the step name, checked first by persist_step_usage and '
'record_step.';

REVOKE ALL ON FUNCTION tokentrack.check_step_arguments(text, uuid, uuid, text) FROM PUBLIC;
