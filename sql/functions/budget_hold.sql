-- version: 20261210000000
--
-- tokentrack.budget_hold(p_budget_id uuid, p_window_start timestamptz) -> jsonb
--
-- Internal (no EXECUTE for application roles). One element of report_reservations.holds:
-- {"budget_id": ..., "window_start": "YYYY-MM-DDTHH:MI:SS.USZ"}, the window's start written
-- in UTC whatever the session's TimeZone, so that the same window is always the same JSON
-- (budget_held finds a hold by JSON containment).
-- Locks nothing, writes nothing.
CREATE OR REPLACE FUNCTION tokentrack.budget_hold(p_budget_id uuid, p_window_start timestamptz)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
    -- PL/pgSQL: no query to plan on every call (see lock_reservation_budgets).
    RETURN pg_catalog.jsonb_build_object(
        'budget_id', p_budget_id,
        'window_start', pg_catalog.to_char(
            p_window_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'
        )
    );
END
$function$;

COMMENT ON FUNCTION tokentrack.budget_hold(uuid, timestamptz) IS
'Internal: the holds element naming a budget window (its start in UTC text).';

REVOKE ALL ON FUNCTION tokentrack.budget_hold(uuid, timestamptz) FROM PUBLIC;
