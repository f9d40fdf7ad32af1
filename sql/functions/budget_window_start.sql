-- version: 20261210000000
--
-- tokentrack.budget_window_start(p_window text, p_timezone text, p_created_at timestamptz,
--     p_at timestamptz) -> timestamptz
--
-- Internal (no EXECUTE for application roles). Where the window of a budget that contains
-- p_at starts: for minute, hour, day, week (ISO: from Monday) and month, the start of that
-- calendar unit in the budget's time zone (date_trunc(unit, p_at, p_timezone): a day in
-- Europe/Berlin has 23 or 25 hours when daylight saving time starts or ends); for total, the
-- budget's created_at (a total budget never resets).
-- Locks nothing, writes nothing.
CREATE OR REPLACE FUNCTION tokentrack.budget_window_start(
    p_window text, p_timezone text, p_created_at timestamptz, p_at timestamptz
)
RETURNS timestamptz
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
    -- PL/pgSQL: no query to plan on every call (see lock_reservation_budgets).
    IF p_window = 'total' THEN
        RETURN p_created_at;
    END IF;
    RETURN pg_catalog.date_trunc(p_window, p_at, p_timezone);
END
$function$;

COMMENT ON FUNCTION tokentrack.budget_window_start(text, text, timestamptz, timestamptz) IS
'Internal: the start of the budget window that contains a moment (calendar windows in the '
'budget''s time zone; a total budget''s window starts when the budget was created).';

REVOKE ALL ON FUNCTION tokentrack.budget_window_start(text, text, timestamptz, timestamptz) FROM PUBLIC;
