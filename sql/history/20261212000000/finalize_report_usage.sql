-- version: 20260108000000
--
-- tokentrack.finalize_report_usage(p_report_id, p_account_id) -> jsonb
--
-- Bills the sum of the report's unbilled steps into the period its reservation was taken in,
-- marks the steps billed, completes the reservation (billed_tokens, finalized_at), writes
-- token_usage on the report and adds 1 to reports_count when the report's status is complete.
-- Billing is actual usage: it may take tokens_used above tokens_limit.
-- Locks, in order: the reservation row (FOR UPDATE; waits for steps being recorded), then
--   through finalize_reservation the period row, the report row and the unbilled step rows.
-- Idempotent: a second call changes nothing and answers "already_finalized": true with the
--   same billed_tokens (also when the sweep billed the reservation).
-- Refusals: report_account_mismatch, reservation_not_found.
-- Errors: 25000 when run under REPEATABLE READ or SERIALIZABLE (READ COMMITTED only, see
--   docs/REVIEW.md); 22004 a NULL argument.
CREATE OR REPLACE FUNCTION tokentrack.finalize_report_usage(p_report_id uuid, p_account_id uuid)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_reservation_id uuid;
BEGIN
    -- READ COMMITTED only: see require_read_committed.
    PERFORM tokentrack.require_read_committed('finalize_report_usage');
    IF p_report_id IS NULL THEN
        RAISE EXCEPTION 'p_report_id must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_report_id';
    END IF;
    IF p_account_id IS NULL THEN
        RAISE EXCEPTION 'p_account_id must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_account_id';
    END IF;

    v_reservation_id := tokentrack.lock_report_reservation(p_report_id, p_account_id);
    IF v_reservation_id IS NULL THEN
        RETURN tokentrack.reservation_refusal(p_report_id, p_account_id);
    END IF;
    RETURN tokentrack.finalize_reservation(v_reservation_id, 'completed');
END
$function$;

COMMENT ON FUNCTION tokentrack.finalize_report_usage(uuid, uuid) IS
'Bills a report''s recorded steps exactly once and completes its reservation; idempotent '
'(already_finalized on repeat).';

REVOKE ALL ON FUNCTION tokentrack.finalize_report_usage(uuid, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.finalize_report_usage(uuid, uuid) TO tokentrack_service;
