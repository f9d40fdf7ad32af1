-- version: 20261210000000
--
-- tokentrack.lock_reservation_budgets(p_account_id uuid, p_holds jsonb) -> void
--
-- Internal (no EXECUTE for application roles). Locks the budgets a reservation holds
-- (p_holds, its holds column; NULL: none) through lock_budgets: rank 4 of the global lock
-- order (after the period, before the report; docs/REVIEW.md). finalize_reservation,
-- finish_report, extend_reservation and the late path of record_step_usage call it before
-- they change what a window has used or holds.
-- Writes nothing.
CREATE OR REPLACE FUNCTION tokentrack.lock_reservation_budgets(p_account_id uuid, p_holds jsonb)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
    PERFORM tokentrack.lock_budgets(p_account_id, ARRAY(
        SELECT h.budget_id FROM pg_catalog.jsonb_to_recordset(p_holds) AS h (budget_id uuid)
    ));
END
$function$;

COMMENT ON FUNCTION tokentrack.lock_reservation_budgets(uuid, jsonb) IS
'Internal: locks the budgets a reservation holds (lock_budgets).';

REVOKE ALL ON FUNCTION tokentrack.lock_reservation_budgets(uuid, jsonb) FROM PUBLIC;
