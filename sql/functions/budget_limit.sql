-- version: 20261211000000
--
-- tokentrack.budget_limit(p_account_id uuid, p_budget_id uuid, p_window_start timestamptz)
--     -> bigint
--
-- Internal (no EXECUTE for application roles). A budget's effective limit in its window that
-- starts at p_window_start, now: its limit_amount plus the amount of every grant of it
-- (credit_grants) that is unexpired (expires_at NULL or after now()) and overlaps the window,
-- i.e. was granted before the window ends (the contract: "A grant on a windowed budget raises
-- the limit of every window it overlaps while unexpired"). A window ends one calendar unit
-- after it starts, in the budget's time zone; a total budget's window never ends, so every
-- unexpired grant counts in it. A grant that expired stops counting at its expires_at: what was
-- billed under it stays billed. Capped at the bigint maximum (a sum of grants may exceed it).
-- NULL when the account has no such budget.
-- reserve_usage, extend_reservation, health and reconcile read a budget's limit through it.
-- Locks nothing, writes nothing; its callers that decide with it (reserve_usage,
-- extend_reservation) hold the budget's row lock (rank 4), which grant_credits takes too, so
-- no grant is added between their read and their decision.
CREATE OR REPLACE FUNCTION tokentrack.budget_limit(
    p_account_id uuid, p_budget_id uuid, p_window_start timestamptz
)
RETURNS bigint
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
    -- PL/pgSQL: its plan is cached for the session (see lock_reservation_budgets).
    RETURN (
        SELECT LEAST(
            b.limit_amount::numeric + COALESCE((
                SELECT pg_catalog.sum(g.amount)
                FROM tokentrack.credit_grants AS g
                WHERE
                    g.account_id = p_account_id
                    AND g.budget_id = p_budget_id
                    AND (g.expires_at IS NULL OR g.expires_at > pg_catalog.now())
                    AND (g.expires_at IS NULL OR g.expires_at > p_window_start)
                    AND (
                        b.budget_window = 'total'
                        OR g.granted_at < (
                            (p_window_start AT TIME ZONE b.timezone)
                            + pg_catalog.make_interval(
                                mins => (b.budget_window = 'minute')::integer,
                                hours => (b.budget_window = 'hour')::integer,
                                days => (b.budget_window = 'day')::integer,
                                weeks => (b.budget_window = 'week')::integer,
                                months => (b.budget_window = 'month')::integer
                            )
                        ) AT TIME ZONE b.timezone
                    )
            ), 0),
            9223372036854775807
        )::bigint
        FROM tokentrack.budgets AS b
        WHERE b.account_id = p_account_id AND b.id = p_budget_id
    );
END
$function$;

COMMENT ON FUNCTION tokentrack.budget_limit(uuid, uuid, timestamptz) IS
'Internal: a budget''s effective limit in a window, now: its limit plus its unexpired grants '
'that overlap the window.';

REVOKE ALL ON FUNCTION tokentrack.budget_limit(uuid, uuid, timestamptz) FROM PUBLIC;
