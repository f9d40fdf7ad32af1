-- version: 20261210000000
--
-- tokentrack.bill_budget_windows(p_account_id uuid, p_holds jsonb, p_tokens bigint,
--     p_cost_micros bigint) -> void
--
-- Internal (no EXECUTE for application roles). Adds billed usage to every budget window a
-- reservation holds (p_holds): p_tokens to the tokens budgets, p_cost_micros to the cost
-- budgets. The caller holds those budgets (lock_reservation_budgets); the windows' rows exist
-- since the reservation was granted. A report's usage counts in the windows in which its
-- reservation was granted, late steps included, whatever window is current when it is billed.
-- Writes: budget_windows.used of each held window (an UPDATE, rank 6 of the lock order).
CREATE OR REPLACE FUNCTION tokentrack.bill_budget_windows(
    p_account_id uuid, p_holds jsonb, p_tokens bigint, p_cost_micros bigint
)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
    -- PL/pgSQL: its plan is cached for the session (see lock_reservation_budgets).
    UPDATE tokentrack.budget_windows AS w
    SET used = w.used + CASE WHEN b.unit = 'tokens' THEN p_tokens ELSE p_cost_micros END
    FROM
        pg_catalog.jsonb_to_recordset(p_holds) AS h (budget_id uuid, window_start timestamptz),
        tokentrack.budgets AS b
    WHERE
        w.account_id = p_account_id AND w.budget_id = h.budget_id AND w.window_start = h.window_start
        AND b.account_id = p_account_id AND b.id = h.budget_id
        -- Adding 0 (a report billed nothing, an unpriced step in a cost budget) writes nothing.
        AND CASE WHEN b.unit = 'tokens' THEN p_tokens ELSE p_cost_micros END <> 0;
END
$function$;

COMMENT ON FUNCTION tokentrack.bill_budget_windows(uuid, jsonb, bigint, bigint) IS
'Internal: adds billed tokens and cost to every budget window a reservation holds.';

REVOKE ALL ON FUNCTION tokentrack.bill_budget_windows(uuid, jsonb, bigint, bigint) FROM PUBLIC;
