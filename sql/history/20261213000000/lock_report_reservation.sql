-- version: 20260108000000
--
-- tokentrack.lock_report_reservation(p_report_id uuid, p_account_id uuid) -> uuid
--
-- Internal (no EXECUTE for application roles). Locks the report's reservation FOR UPDATE
-- when it belongs to p_account_id and returns its id; returns NULL (locking nothing) when
-- the report has no reservation or it belongs to another account: the caller answers with
-- reservation_refusal().
-- Locks: the reservation row (FOR UPDATE): the first lock of finalize and finish_report.
CREATE OR REPLACE FUNCTION tokentrack.lock_report_reservation(p_report_id uuid, p_account_id uuid)
RETURNS uuid
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
    SELECT rr.id FROM tokentrack.report_reservations AS rr
    WHERE rr.report_id = p_report_id AND rr.account_id = p_account_id
    FOR UPDATE
$function$;

COMMENT ON FUNCTION tokentrack.lock_report_reservation(uuid, uuid) IS
'Internal: locks the report''s reservation of that account (FOR UPDATE) and returns its id.';

REVOKE ALL ON FUNCTION tokentrack.lock_report_reservation(uuid, uuid) FROM PUBLIC;
