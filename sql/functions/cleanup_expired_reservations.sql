-- version: 20260108000000
--
-- tokentrack.cleanup_expired_reservations() -> jsonb
--
-- The expiry sweep, in one transaction: every active reservation past expires_at is billed
-- (its recorded steps, exactly as finalize would) and marked expired. Afterwards no
-- reservation is active past its expiry. Returns {"success", "expired", "billed_tokens", "steps"}.
-- Locks: see expire_reservations (all due reservation rows first, then their periods, the
--   budgets they hold, their reports, then their steps and held budget windows; since version
--   20261214000000 each rank for the whole batch at once), held until the caller's
--   transaction ends. For a large
--   backlog, CALL tokentrack.sweep_expired_reservations() instead: it commits per batch so no
--   period stays locked for long.
-- Safe to run concurrently with itself and with finalize: a reservation billed by one is
--   already_finalized for the other and is not counted twice.
-- Errors: 25000 (from expire_reservations) under REPEATABLE READ or SERIALIZABLE.
CREATE OR REPLACE FUNCTION tokentrack.cleanup_expired_reservations()
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
    RETURN tokentrack.expire_reservations(NULL);
END
$function$;

COMMENT ON FUNCTION tokentrack.cleanup_expired_reservations() IS
'Expiry sweep: bills and expires every active reservation past expires_at, in one transaction.';

REVOKE ALL ON FUNCTION tokentrack.cleanup_expired_reservations() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.cleanup_expired_reservations() TO tokentrack_service;
