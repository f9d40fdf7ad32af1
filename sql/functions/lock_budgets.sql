-- version: 20261210000000
--
-- tokentrack.lock_budgets(p_budget_ids uuid[]) -> void
--
-- Internal (no EXECUTE for application roles). Rank 4 of the global lock order
-- (docs/REVIEW.md): takes one transaction-scoped advisory lock per budget, pg_advisory_xact_lock
-- on the first 64 bits of its id, in ascending key order, and holds them until the transaction
-- ends. Every function that reads a budget's limit, its windows' use or its holds to decide, or
-- changes them, takes them first: reserve_usage (every budget that applies), extend_reservation,
-- finalize_reservation, finish_report and the late path of record_step_usage (the budgets a
-- reservation holds, through lock_reservation_budgets), the sweep (every budget of its batch),
-- set_budget (the one it changes).
-- Why advisory locks and not the budgets' rows FOR UPDATE: the same mutual exclusion without
-- writing a row lock into the heap (WAL, and a multixact when shared) on every reservation and
-- every billing. Two budgets whose ids share their first 64 bits (about one chance in 2^64 per
-- pair) share a lock: they wait for each other, and the one order (ascending key) still holds.
-- DBAs see them in pg_locks as locktype 'advisory' (classid and objid are the key's two halves).
-- Writes nothing.
CREATE OR REPLACE FUNCTION tokentrack.lock_budgets(p_budget_ids uuid[])
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
    -- One statement: the keys sorted in the subquery, locked in that order by the outer scan.
    PERFORM pg_catalog.pg_advisory_xact_lock(keys.k)
    FROM (
        SELECT DISTINCT ('x' || pg_catalog.left(pg_catalog.replace(b.id::text, '-', ''), 16))::bit(64)::bigint AS k
        FROM pg_catalog.unnest(p_budget_ids) AS b (id)
        WHERE b.id IS NOT NULL
        ORDER BY k
    ) AS keys;
END
$function$;

COMMENT ON FUNCTION tokentrack.lock_budgets(uuid[]) IS
'Internal: takes the budgets'' transaction-scoped advisory locks in ascending key order (rank 4 of '
'the lock order).';

REVOKE ALL ON FUNCTION tokentrack.lock_budgets(uuid[]) FROM PUBLIC;
