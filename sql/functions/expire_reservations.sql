-- version: 20260108000000
--
-- tokentrack.expire_reservations(p_limit integer) -> jsonb
--
-- The sweep's work, for at most p_limit reservations (NULL: all of them): finds active
-- reservations past expires_at, bills their recorded steps exactly as finalize would
-- (settle_reservation, ledger kind report_expired) and marks them expired.
-- Returns {"success", "expired", "billed_tokens", "steps"}.
-- Locks, in order: every chosen reservation row first, in one statement (FOR UPDATE, in id
--   order; a reservation that a concurrent finalize or sweep billed meanwhile drops out when
--   its lock is granted), then per reservation its period row, report row and unbilled step
--   rows. Taking all reservation locks before any period lock keeps the global order
--   (reservation, period, report, steps), so the sweep cannot deadlock with finalize,
--   finish_report or persist_step_usage, nor with another sweep (same id order).
-- Runs with the caller's transaction: cleanup_expired_reservations() calls it once for all;
--   sweep_expired_reservations() calls it per batch and commits in between.
-- Errors: 22023 a p_limit below 1.
CREATE FUNCTION tokentrack.expire_reservations(p_limit integer)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_ids uuid[];
    v_id uuid;
    v_result jsonb;
    v_expired integer := 0;
    v_billed bigint := 0;
    v_steps bigint := 0;
BEGIN
    IF p_limit < 1 THEN
        RAISE EXCEPTION 'p_limit must be at least 1 (got %)', p_limit USING ERRCODE = '22023', COLUMN = 'p_limit';
    END IF;

    SELECT pg_catalog.array_agg(due.id ORDER BY due.id) INTO v_ids
    FROM (
        SELECT rr.id FROM tokentrack.report_reservations AS rr
        WHERE rr.status = 'active' AND rr.expires_at <= pg_catalog.now()
        ORDER BY rr.id
        LIMIT p_limit
        FOR UPDATE
    ) AS due;

    IF v_ids IS NOT NULL THEN
        FOREACH v_id IN ARRAY v_ids LOOP
            v_result := tokentrack.settle_reservation(v_id, 'expired');
            IF NOT (v_result ->> 'already_finalized')::boolean THEN
                v_expired := v_expired + 1;
                v_billed := v_billed + (v_result ->> 'billed_tokens')::bigint;
                v_steps := v_steps + (v_result ->> 'steps')::bigint;
            END IF;
        END LOOP;
    END IF;

    RETURN pg_catalog.jsonb_build_object(
        'success', true, 'expired', v_expired, 'billed_tokens', v_billed, 'steps', v_steps
    );
END
$function$;

COMMENT ON FUNCTION tokentrack.expire_reservations(integer) IS
'Bills and expires at most p_limit active reservations past expires_at (NULL: all), in the '
'caller''s transaction. Used by cleanup_expired_reservations and sweep_expired_reservations.';

REVOKE ALL ON FUNCTION tokentrack.expire_reservations(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.expire_reservations(integer) TO tokentrack_service;
