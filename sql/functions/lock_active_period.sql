-- version: 20251219000000
--
-- tokentrack.lock_active_period(p_account_id uuid) -> tokentrack.usage_periods
--
-- Internal helper (no EXECUTE for application roles). Locks the account's active period
-- FOR UPDATE and returns it, or a row of NULLs when the account has none.
-- Locks: the active usage_periods row of the account (FOR UPDATE), nothing else.
-- Writes: nothing.
-- Why a loop: under READ COMMITTED, a caller that waited for the lock while
-- open_usage_period closed that period sees the closed row drop out of its result; the next
-- statement takes a new snapshot and finds the period that replaced it, which may itself be
-- closed while the caller waits again. It therefore tries again for as long as the account
-- has an active period that it failed to lock, and answers "none" only when it has none.
CREATE OR REPLACE FUNCTION tokentrack.lock_active_period(p_account_id uuid)
RETURNS tokentrack.usage_periods
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_period tokentrack.usage_periods%ROWTYPE;
BEGIN
    LOOP
        SELECT p.* INTO v_period
        FROM tokentrack.usage_periods AS p
        WHERE p.account_id = p_account_id AND p.status = 'active'
        FOR UPDATE;
        EXIT WHEN FOUND;
        -- Not found: either there is none, or a switch replaced the row this one waited for.
        EXIT WHEN NOT EXISTS (
            SELECT FROM tokentrack.usage_periods AS p
            WHERE p.account_id = p_account_id AND p.status = 'active'
        );
    END LOOP;
    RETURN v_period;
END
$function$;

COMMENT ON FUNCTION tokentrack.lock_active_period(uuid) IS
'Internal: locks and returns the account''s active usage period (all NULL when none).';

REVOKE ALL ON FUNCTION tokentrack.lock_active_period(uuid) FROM PUBLIC;
