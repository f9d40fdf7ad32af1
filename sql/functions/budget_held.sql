-- version: 20261210000000
--
-- tokentrack.budget_held(p_account_id uuid, p_budget_id uuid, p_unit text,
--     p_window_start timestamptz) -> bigint
--
-- Internal (no EXECUTE for application roles). What the account's active, unexpired
-- reservations hold in one budget window: reserved_tokens (a tokens budget) or
-- reserved_cost_micros (a cost budget; NULL holds 0) of every one whose holds name that
-- budget and window.
-- Reads the account's active reservations by report_reservations_active_by_account (the
-- scan try_reserve_tokens makes for the period).
-- Locks nothing, writes nothing; its callers hold the budget row (FOR UPDATE), under which
-- no hold of that budget is added or released.
CREATE OR REPLACE FUNCTION tokentrack.budget_held(
    p_account_id uuid, p_budget_id uuid, p_unit text, p_window_start timestamptz
)
RETURNS bigint
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_hold jsonb := pg_catalog.jsonb_build_array(tokentrack.budget_hold(p_budget_id, p_window_start));
BEGIN
    -- PL/pgSQL (planned once per session, and the file does not depend on budget_hold being
    -- created first); the hold is built once, not for every reservation scanned.
    RETURN (
        SELECT COALESCE(pg_catalog.sum(
            CASE WHEN p_unit = 'tokens' THEN rr.reserved_tokens::bigint ELSE COALESCE(rr.reserved_cost_micros, 0) END
        ), 0)::bigint
        FROM tokentrack.report_reservations AS rr
        WHERE
            rr.account_id = p_account_id
            AND rr.status = 'active'
            AND rr.expires_at > pg_catalog.now()
            AND rr.holds @> v_hold
    );
END
$function$;

COMMENT ON FUNCTION tokentrack.budget_held(uuid, uuid, text, timestamptz) IS
'Internal: what the account''s active, unexpired reservations hold in one budget window.';

REVOKE ALL ON FUNCTION tokentrack.budget_held(uuid, uuid, text, timestamptz) FROM PUBLIC;
