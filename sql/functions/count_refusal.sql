-- version: 20261213000000
--
-- tokentrack.count_refusal(p_operation text, p_answer jsonb) -> jsonb
--
-- Internal (no EXECUTE for application roles). Returns p_answer unchanged; when it is a
-- refusal ("success": false) it first counts it: nextval() on the sequence that
-- refusal_counters names for (p_operation, its error code, and for insufficient_budget the
-- refusing budget's unit, window and scope: account when its subject is null, else subject),
-- or on p_operation's other counter for a code without one. The public functions wrap their
-- answers in it (reserve, try_reserve_tokens, extend_reservation, finalize_report_usage,
-- finish_report, record_step, persist_step_usage).
-- Why an unlogged sequence: nextval is not transactional, so the count adds no write to the
-- caller's transaction (no row version, no row lock; a rolled-back refusal still counts),
-- two refusals never wait for each other beyond a buffer lock on the sequence's page, and
-- an unlogged one writes no WAL: the caller's transaction gets no transaction id from it, its
-- commit flushes nothing. After a crash the counts start again from 0 (version
-- 20261213000000's header). A granted answer costs one call and one key test.
-- In a read-only transaction (or on a standby) nextval is not allowed: the refusal is
-- answered and not counted.
-- Locks nothing; names the sequence from the answer (refusal_<operation>_<code>, or
--   refusal_<operation>_budget_<unit>_<window>_<scope>) and finds it with to_regclass.
-- Errors: 22004 a NULL p_operation; 22023 an unknown p_operation.
CREATE OR REPLACE FUNCTION tokentrack.count_refusal(p_operation text, p_answer jsonb)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_counter regclass;
    v_code text;
    v_name text;
BEGIN
    IF p_operation IS NULL THEN
        RAISE EXCEPTION 'p_operation must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_operation';
    END IF;
    IF p_answer IS NULL OR (p_answer ->> 'success') IS DISTINCT FROM 'false' THEN
        RETURN p_answer;
    END IF;
    IF pg_catalog.current_setting('transaction_read_only') = 'on' THEN
        RETURN p_answer;
    END IF;
    v_code := COALESCE(p_answer ->> 'error', 'other');
    -- The sequence's name (as the refusal_counters view lists it), without reading the view.
    IF v_code = 'insufficient_budget' THEN
        v_name := pg_catalog.format(
            'refusal_%s_budget_%s_%s_%s', p_operation, p_answer ->> 'unit', p_answer ->> 'window',
            CASE WHEN p_answer ->> 'subject' IS NULL THEN 'account' ELSE 'subject' END
        );
    ELSE
        v_name := pg_catalog.format('refusal_%s_%s', p_operation, v_code);
    END IF;
    v_counter := pg_catalog.to_regclass(pg_catalog.format('tokentrack.%I', v_name));
    IF v_counter IS NULL THEN
        v_counter := pg_catalog.to_regclass(pg_catalog.format('tokentrack.%I', 'refusal_' || p_operation || '_other'));
        IF v_counter IS NULL THEN
            RAISE EXCEPTION 'p_operation must be reserve, extend, finalize or step (got %)', p_operation
                USING ERRCODE = '22023', COLUMN = 'p_operation';
        END IF;
    END IF;
    PERFORM pg_catalog.nextval(v_counter);
    RETURN p_answer;
END
$function$;

COMMENT ON FUNCTION tokentrack.count_refusal(text, jsonb) IS
'Internal: returns its answer; counts it first when it is a refusal (nextval on its '
'refusal_counters sequence: no write to the caller''s transaction).';

REVOKE ALL ON FUNCTION tokentrack.count_refusal(text, jsonb) FROM PUBLIC;
