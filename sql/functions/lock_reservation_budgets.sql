-- version: 20261210000000
--
-- tokentrack.lock_reservation_budgets(p_account_id uuid, p_holds jsonb) -> void
--
-- Internal (no EXECUTE for application roles). Locks the budgets a reservation holds
-- (p_holds, its holds column; NULL: none) as lock_budgets does: rank 4 of the global lock
-- order (after the period, before the report; docs/REVIEW.md), FOR UPDATE in id order in one
-- statement. finalize_reservation, finish_report, extend_reservation and the late path of
-- record_step_usage call it before they change what a window has used or holds.
-- Since version 20261214000000 it runs lock_budgets' statement itself (the same rows in the
-- same order), one function call fewer on every finalize of a reservation with budgets.
-- Writes nothing but the row locks.
CREATE OR REPLACE FUNCTION tokentrack.lock_reservation_budgets(p_account_id uuid, p_holds jsonb)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
    -- A reservation with no budgets (holds NULL) locks none: no statement.
    IF p_holds IS NULL THEN
        RETURN;
    END IF;
    PERFORM FROM tokentrack.budgets AS b
    WHERE
        b.account_id = p_account_id
        AND b.id = ANY (ARRAY(
            SELECT h.budget_id FROM pg_catalog.jsonb_to_recordset(p_holds) AS h (budget_id uuid)
        ))
    ORDER BY b.id
    FOR UPDATE;
END
$function$;

COMMENT ON FUNCTION tokentrack.lock_reservation_budgets(uuid, jsonb) IS
'Internal: locks the budgets a reservation holds (lock_budgets).';

REVOKE ALL ON FUNCTION tokentrack.lock_reservation_budgets(uuid, jsonb) FROM PUBLIC;
