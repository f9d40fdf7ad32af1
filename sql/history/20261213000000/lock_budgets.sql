-- version: 20261210000000
--
-- tokentrack.lock_budgets(p_account_id uuid, p_budget_ids uuid[]) -> void
--
-- Internal (no EXECUTE for application roles). Rank 4 of the global lock order
-- (docs/REVIEW.md): locks the account's budgets p_budget_ids FOR UPDATE, in id order, in one
-- statement, until the transaction ends. Every function that reads a budget's limit, its
-- windows' use or its holds to decide, or changes them, takes them first: reserve_usage (every
-- budget that applies), extend_reservation, finalize_reservation, finish_report and the late
-- path of record_step_usage (the budgets a reservation holds, through
-- lock_reservation_budgets), set_budget (the one it changes). The sweep, the one function that
-- holds budgets of several accounts, locks them itself in (account_id, id) order.
-- Row locks, not advisory locks: an advisory lock can be taken by any role that may connect to
-- the database (pg_advisory_lock is PUBLIC and pg_locks shows the keys in use), which would
-- let it stall every reservation of a budget; a row lock needs UPDATE on tokentrack.budgets,
-- which only the owner has.
-- Writes nothing but the row locks.
CREATE OR REPLACE FUNCTION tokentrack.lock_budgets(p_account_id uuid, p_budget_ids uuid[])
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
    PERFORM FROM tokentrack.budgets AS b
    WHERE b.account_id = p_account_id AND b.id = ANY (p_budget_ids)
    ORDER BY b.id
    FOR UPDATE;
END
$function$;

COMMENT ON FUNCTION tokentrack.lock_budgets(uuid, uuid[]) IS
'Internal: locks budgets of an account FOR UPDATE, in id order (rank 4 of the lock order).';

REVOKE ALL ON FUNCTION tokentrack.lock_budgets(uuid, uuid[]) FROM PUBLIC;
