-- version: 20260108000000
--
-- tokentrack.finish_report(p_report_id, p_account_id, p_status, p_error_message DEFAULT NULL)
--   -> jsonb
--
-- Sets the report's outcome (complete, failed or cancelled) and finalizes it in one
-- transaction; answers as finalize_report_usage does, plus "report_status". This is how a
-- generator ends a report and how a cancel button cancels one from outside: steps that arrive
-- afterwards are billed late and their answers carry report_status.
-- When the reservation was billed before the report had an outcome (finalize called first,
-- or the sweep) and the outcome is complete, the report is counted then (1 to reports_count,
-- with a report_completed ledger row), so that a completed report is counted exactly once.
-- Locks, in order: the reservation row (FOR UPDATE), the period row (FOR UPDATE), the budgets
--   the reservation holds (lock_budgets; since version 20261210000000), the report row
--   (FOR UPDATE), then through finalize_reservation the unbilled step rows.
-- Idempotent: the same outcome again is a retry (nothing changes, already_finalized true);
--   another outcome is refused with report_finalized and nothing changes.
-- Refusals: report_account_mismatch, reservation_not_found, report_finalized.
-- Errors: 25000 when run under REPEATABLE READ or SERIALIZABLE (READ COMMITTED only, see
--   docs/REVIEW.md); 22004 a NULL id or status; 22023 a status other than complete, failed, cancelled;
--   22001 an error message over 10,000 characters.
CREATE OR REPLACE FUNCTION tokentrack.finish_report(
    p_report_id uuid, p_account_id uuid, p_status text, p_error_message text DEFAULT NULL
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_reservation tokentrack.report_reservations%ROWTYPE;
    v_report tokentrack.reports%ROWTYPE;
    v_reservation_id uuid;
    v_count_now boolean := false;
    v_answer jsonb;
BEGIN
    -- READ COMMITTED only: see require_read_committed.
    PERFORM tokentrack.require_read_committed('finish_report');
    IF p_report_id IS NULL THEN
        RAISE EXCEPTION 'p_report_id must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_report_id';
    END IF;
    IF p_account_id IS NULL THEN
        RAISE EXCEPTION 'p_account_id must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_account_id';
    END IF;
    IF p_status IS NULL THEN
        RAISE EXCEPTION 'p_status must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_status';
    END IF;
    IF p_status NOT IN ('complete', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'p_status must be complete, failed or cancelled (got %)', pg_catalog.left(p_status, 100)
            USING ERRCODE = '22023', COLUMN = 'p_status';
    END IF;
    IF pg_catalog.length(p_error_message) > 10000 THEN
        RAISE EXCEPTION 'p_error_message must be at most 10000 characters (got %)',
            pg_catalog.length(p_error_message)
            USING ERRCODE = '22001', COLUMN = 'p_error_message';
    END IF;

    v_reservation_id := tokentrack.lock_report_reservation(p_report_id, p_account_id);
    IF v_reservation_id IS NULL THEN
        RETURN tokentrack.reservation_refusal(p_report_id, p_account_id);
    END IF;
    SELECT rr.* INTO STRICT v_reservation FROM tokentrack.report_reservations AS rr
    WHERE rr.id = v_reservation_id;

    PERFORM FROM tokentrack.usage_periods AS p WHERE p.id = v_reservation.period_id FOR UPDATE;
    -- The held budgets before the report (rank 4, see docs/REVIEW.md): finalize_reservation
    -- locks them again (already held).
    IF v_reservation.holds IS NOT NULL THEN
        PERFORM tokentrack.lock_reservation_budgets(v_reservation.account_id, v_reservation.holds);
    END IF;
    SELECT r.* INTO STRICT v_report FROM tokentrack.reports AS r WHERE r.id = p_report_id FOR UPDATE;

    IF v_report.status IN ('complete', 'failed', 'cancelled') THEN
        IF v_report.status <> p_status THEN
            RETURN pg_catalog.jsonb_build_object(
                'success', false, 'error', 'report_finalized',
                'message', pg_catalog.format('report %s already ended as %s', p_report_id, v_report.status),
                'report_status', v_report.status
            );
        END IF;
    ELSE
        UPDATE tokentrack.reports AS r
        SET status = p_status, error_message = p_error_message
        WHERE r.id = p_report_id;
        v_count_now := p_status = 'complete' AND v_reservation.status <> 'active';
    END IF;

    v_answer := tokentrack.finalize_reservation(v_reservation_id, 'completed');

    IF v_count_now THEN
        INSERT INTO tokentrack.usage_ledger (account_id, period_id, kind, tokens, reports, report_id)
        VALUES (p_account_id, v_reservation.period_id, 'report_completed', 0, 1, p_report_id);
        UPDATE tokentrack.usage_periods AS p
        SET reports_count = p.reports_count + 1
        WHERE p.id = v_reservation.period_id;
    END IF;

    RETURN v_answer || pg_catalog.jsonb_build_object('report_status', p_status);
END
$function$;

COMMENT ON FUNCTION tokentrack.finish_report(uuid, uuid, text, text) IS
'Sets a report''s outcome (complete, failed, cancelled) and finalizes it in one transaction; '
'another outcome afterwards is refused with report_finalized.';

REVOKE ALL ON FUNCTION tokentrack.finish_report(uuid, uuid, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.finish_report(uuid, uuid, text, text) TO tokentrack_service;
