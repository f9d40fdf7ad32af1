-- version: 20260108000000
--
-- tokentrack.reservation_refusal(p_report_id uuid, p_account_id uuid) -> jsonb
--
-- Internal (no EXECUTE for application roles). The refusal for a report whose reservation
-- the caller could not find for p_account_id: report_account_mismatch when the report or its
-- reservation belongs to another account, reservation_not_found otherwise.
-- Locks nothing, writes nothing.
CREATE OR REPLACE FUNCTION tokentrack.reservation_refusal(p_report_id uuid, p_account_id uuid)
RETURNS jsonb
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
    SELECT CASE
        WHEN EXISTS (
            SELECT FROM tokentrack.reports AS r WHERE r.id = p_report_id AND r.account_id <> p_account_id
        ) OR EXISTS (
            SELECT FROM tokentrack.report_reservations AS rr
            WHERE rr.report_id = p_report_id AND rr.account_id <> p_account_id
        )
            THEN pg_catalog.jsonb_build_object(
                'success', false, 'error', 'report_account_mismatch',
                'message', pg_catalog.format('report %s belongs to another account', p_report_id)
            )
        ELSE pg_catalog.jsonb_build_object(
            'success', false, 'error', 'reservation_not_found',
            'message', pg_catalog.format('report %s has no reservation', p_report_id)
        )
    END
$function$;

COMMENT ON FUNCTION tokentrack.reservation_refusal(uuid, uuid) IS
'Internal: the refusal (report_account_mismatch or reservation_not_found) for a report whose '
'reservation was not found for that account.';

REVOKE ALL ON FUNCTION tokentrack.reservation_refusal(uuid, uuid) FROM PUBLIC;
