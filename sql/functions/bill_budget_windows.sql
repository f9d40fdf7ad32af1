-- version: 20261210000000
--
-- tokentrack.bill_budget_windows(p_account_id uuid, p_holds jsonb, p_tokens bigint,
--     p_cost_micros bigint, p_released_tokens bigint, p_released_cost_micros bigint) -> void
-- tokentrack.bill_budget_windows(p_account_id uuid, p_holds jsonb, p_tokens bigint,
--     p_cost_micros bigint) -> void   (the same with nothing released: a late step)
--
-- Internal (no EXECUTE for application roles). Adds billed usage to every budget window a
-- reservation holds (p_holds): p_tokens to the tokens budgets, p_cost_micros to the cost
-- budgets. The caller holds those budgets (lock_reservation_budgets); the windows' rows exist
-- since the reservation was granted. A report's usage counts in the windows in which its
-- reservation was granted, late steps included, whatever window is current when it is billed.
-- Notifications (since version 20261212000000): p_released_tokens and p_released_cost_micros
-- are what the billed reservation stops holding in this transaction (finalize_reservation:
-- its reserved_tokens and reserved_cost_micros when it is active and unexpired; 0 for the
-- sweep, whose reservations are past expiry and hold nothing already, and for a late step).
-- A window's used + held rises by the billed amount minus the released one; where it rises,
-- its used + held before the change (used before the UPDATE + budget_held, which still counts
-- the billed reservation: the caller leaves 'active' afterwards) and after it go to
-- note_crossings, which records a notification for each threshold crossed. Billing at most
-- what was held (the common finalize) rises nowhere and reads nothing more.
-- The four-argument form (the late path of record_step_usage) releases nothing. Two signatures,
-- not defaults: the four-argument one is the one version 20261210000000 created, so a fresh
-- install that applies both texts in one transaction replaces it instead of leaving two
-- candidates for a four-argument call.
-- Writes: budget_windows.used of each held window (an UPDATE, rank 6 of the lock order);
--   notifications (through note_crossings, rank 7).
CREATE OR REPLACE FUNCTION tokentrack.bill_budget_windows(
    p_account_id uuid,
    p_holds jsonb,
    p_tokens bigint,
    p_cost_micros bigint,
    p_released_tokens bigint,
    p_released_cost_micros bigint
)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_window record;
    v_rise bigint;
    v_before bigint;
BEGIN
    -- PL/pgSQL: its plan is cached for the session (see lock_reservation_budgets).
    FOR v_window IN
        UPDATE tokentrack.budget_windows AS w
        SET used = w.used + CASE WHEN b.unit = 'tokens' THEN p_tokens ELSE p_cost_micros END
        FROM
            pg_catalog.jsonb_to_recordset(p_holds) AS h (budget_id uuid, window_start timestamptz),
            tokentrack.budgets AS b
        WHERE
            w.account_id = p_account_id AND w.budget_id = h.budget_id AND w.window_start = h.window_start
            AND b.account_id = p_account_id AND b.id = h.budget_id
            -- Adding 0 (a report billed nothing, an unpriced step in a cost budget) writes nothing.
            AND CASE WHEN b.unit = 'tokens' THEN p_tokens ELSE p_cost_micros END <> 0
        RETURNING
            w.budget_id,
            w.window_start,
            b.unit,
            w.used,
            CASE WHEN b.unit = 'tokens' THEN p_tokens ELSE p_cost_micros END AS billed
    LOOP
        v_rise := v_window.billed - CASE
            WHEN v_window.unit = 'tokens' THEN COALESCE(p_released_tokens, 0)
            ELSE COALESCE(p_released_cost_micros, 0)
        END;
        CONTINUE WHEN v_rise <= 0;
        v_before := v_window.used - v_window.billed
            + tokentrack.budget_held(p_account_id, v_window.budget_id, v_window.unit, v_window.window_start);
        PERFORM tokentrack.note_crossings(
            p_account_id, v_window.budget_id, v_window.window_start, v_before, v_before + v_rise
        );
    END LOOP;
END
$function$;

COMMENT ON FUNCTION tokentrack.bill_budget_windows(uuid, jsonb, bigint, bigint, bigint, bigint) IS
'Internal: adds billed tokens and cost to every budget window a reservation holds, and records '
'the notifications of the thresholds that takes across (note_crossings).';

REVOKE ALL ON FUNCTION tokentrack.bill_budget_windows(uuid, jsonb, bigint, bigint, bigint, bigint) FROM PUBLIC;

CREATE OR REPLACE FUNCTION tokentrack.bill_budget_windows(
    p_account_id uuid, p_holds jsonb, p_tokens bigint, p_cost_micros bigint
)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
    PERFORM tokentrack.bill_budget_windows(p_account_id, p_holds, p_tokens, p_cost_micros, 0::bigint, 0::bigint);
END
$function$;

COMMENT ON FUNCTION tokentrack.bill_budget_windows(uuid, jsonb, bigint, bigint) IS
'Internal: bill_budget_windows releasing nothing (a late step of a billed report).';

REVOKE ALL ON FUNCTION tokentrack.bill_budget_windows(uuid, jsonb, bigint, bigint) FROM PUBLIC;
