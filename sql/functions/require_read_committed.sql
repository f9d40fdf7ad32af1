-- version: 20260108000000
--
-- tokentrack.require_read_committed(p_function text) -> void
--
-- Internal (no EXECUTE for application roles). Raises SQLSTATE 25000 unless the current
-- transaction runs at READ COMMITTED. try_reserve_tokens, persist_step_usage,
-- finalize_report_usage, finish_report and expire_reservations call it first: each of them,
-- after waiting for a row lock, reads what the lock holders committed meanwhile (the
-- account's reservations, the reservation's status, the report's steps). Under REPEATABLE READ
-- or SERIALIZABLE its snapshot predates those commits, and it would overcommit or leave a step
-- unbilled behind a completed reservation without any error (see docs/REVIEW.md).
-- Locks nothing, writes nothing.
CREATE OR REPLACE FUNCTION tokentrack.require_read_committed(p_function text)
RETURNS void
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
    IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'tokentrack.% must run at READ COMMITTED, not %',
            p_function, pg_catalog.upper(pg_catalog.current_setting('transaction_isolation'))
            USING ERRCODE = '25000',
            HINT = 'Begin its transaction with ISOLATION LEVEL READ COMMITTED (see docs/REVIEW.md).';
    END IF;
END
$function$;

COMMENT ON FUNCTION tokentrack.require_read_committed(text) IS
'Internal: raises 25000 unless the transaction runs at READ COMMITTED, which the write '
'functions need (they read what lock holders committed while they waited).';

REVOKE ALL ON FUNCTION tokentrack.require_read_committed(text) FROM PUBLIC;
