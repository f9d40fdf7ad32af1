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
-- Why a sequence: nextval is not transactional, so the count adds no write to the caller's
-- transaction (no row version, no row lock; a rolled-back refusal still counts) and two
-- refusals never wait for each other beyond a buffer lock on the sequence's page. It writes
-- WAL once per 32 values (and once after each checkpoint); that 32nd call assigns the
-- caller's transaction an id, so its commit flushes WAL (version 20261213000000's header).
-- A granted answer costs one call and one key test: nothing is read or written.
-- In a read-only transaction (or on a standby) nextval is not allowed: the refusal is
-- answered and not counted.
-- Locks nothing; reads the refusal_counters view (68 constant rows; refusals only).
-- Errors: 22004 a NULL p_operation; 22023 an unknown p_operation.
CREATE OR REPLACE FUNCTION tokentrack.count_refusal(p_operation text, p_answer jsonb)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_counter text;
    v_code text;
    v_unit text := '';
    v_window text := '';
    v_scope text := '';
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
    IF v_code = 'insufficient_budget' THEN
        v_unit := COALESCE(p_answer ->> 'unit', '');
        v_window := COALESCE(p_answer ->> 'window', '');
        v_scope := CASE WHEN p_answer ->> 'subject' IS NULL THEN 'account' ELSE 'subject' END;
    END IF;
    SELECT c.counter INTO v_counter
    FROM tokentrack.refusal_counters AS c
    WHERE
        c.operation = p_operation AND c.code = v_code AND c.budget_unit = v_unit
        AND c.budget_window = v_window AND c.budget_scope = v_scope;
    IF v_counter IS NULL THEN
        SELECT c.counter INTO v_counter
        FROM tokentrack.refusal_counters AS c
        WHERE
            c.operation = p_operation AND c.code = 'other' AND c.budget_unit = ''
            AND c.budget_window = '' AND c.budget_scope = '';
        IF v_counter IS NULL THEN
            RAISE EXCEPTION 'p_operation must be reserve, extend, finalize or step (got %)', p_operation
                USING ERRCODE = '22023', COLUMN = 'p_operation';
        END IF;
    END IF;
    PERFORM pg_catalog.nextval(v_counter::regclass);
    RETURN p_answer;
END
$function$;

COMMENT ON FUNCTION tokentrack.count_refusal(text, jsonb) IS
'Internal: returns its answer; counts it first when it is a refusal (nextval on its '
'refusal_counters sequence: no write to the caller''s transaction).';

REVOKE ALL ON FUNCTION tokentrack.count_refusal(text, jsonb) FROM PUBLIC;
