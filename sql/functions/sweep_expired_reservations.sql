-- version: 20260108000000
--
-- PROCEDURE tokentrack.sweep_expired_reservations(p_batch_size integer DEFAULT 100)
--
-- The expiry sweep in bounded batches, for pg_cron and large backlogs:
--   CALL tokentrack.sweep_expired_reservations();
-- Each batch bills and expires at most p_batch_size reservations (expire_reservations) and
-- commits, so the locks of a batch are held only for that batch. The default keeps a batch
-- well under 100 ms: it was 50 while the sweep billed one reservation after the other (about
-- 1 ms each in `make bench`, 500 took ~550 ms); since version 20261214000000, which bills a
-- batch set-based, it is 100 (bench/results/latest.md: 0.15 ms per reservation in batches of
-- 100, the longest 24 ms; batches of 500 held their locks up to 171 ms). It
-- goes on until a batch finds nothing due (that last, empty batch locks nothing), so no
-- reservation that was due when that batch began is left active; a short batch alone does not
-- stop it. Must be called outside an explicit transaction block (it commits). Reports the
-- totals with a NOTICE (batches counts the last, empty one).
-- It runs with the caller's rights (a procedure that commits cannot be SECURITY DEFINER); the
-- caller needs EXECUTE on expire_reservations, which tokentrack_service has.
-- search_path: a procedure that commits cannot carry SET search_path either, so it pins the
--   path itself with SET LOCAL at the start of each of its transactions (the first and the one
--   after every COMMIT); the caller's session keeps its own path once the CALL returns. Its
--   variable types are pg_catalog-qualified because they are resolved when the body is
--   compiled, before the first statement runs, under the caller's path.
-- Errors: 22004 a NULL batch size; 22023 a batch size below 1; 25000 (from expire_reservations)
--   when the session's default isolation is above READ COMMITTED; 2D000 when CALLed inside a
--   transaction block.
CREATE OR REPLACE PROCEDURE tokentrack.sweep_expired_reservations(p_batch_size integer DEFAULT 100)
LANGUAGE plpgsql
AS $procedure$
DECLARE
    -- pg_catalog.jsonb, not jsonb: a type named jsonb in a schema that the
    -- caller's search_path lists before pg_catalog would otherwise be used. The ::bigint
    -- initialisers avoid an implicit integer-to-bigint cast at run time.
    v_batch pg_catalog.jsonb;
    v_expired bigint := 0::bigint;
    v_billed bigint := 0::bigint;
    v_batches integer := 0;
BEGIN
    -- Resolve every operator and function below in pg_catalog, whatever
    -- search_path the caller (a pg_cron job, a superuser) has; repeated after each COMMIT.
    SET LOCAL search_path = pg_catalog, pg_temp;
    IF p_batch_size IS NULL THEN
        RAISE EXCEPTION 'p_batch_size must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_batch_size';
    END IF;
    IF p_batch_size < 1 THEN
        RAISE EXCEPTION 'p_batch_size must be at least 1 (got %)', p_batch_size
            USING ERRCODE = '22023', COLUMN = 'p_batch_size';
    END IF;
    LOOP
        v_batch := tokentrack.expire_reservations(p_batch_size);
        COMMIT;
        SET LOCAL search_path = pg_catalog, pg_temp;
        v_batches := v_batches + 1;
        v_expired := v_expired + (v_batch ->> 'expired')::bigint;
        v_billed := v_billed + (v_batch ->> 'billed_tokens')::bigint;
        -- Stop only when a batch found nothing due. A batch can expire fewer than
        -- p_batch_size while due reservations remain: the rows a concurrent finalize billed
        -- drop out of it once their lock is granted, and reservations that came due after the
        -- batch's now() (while it waited for such a lock) are not in it. Bounded: every
        -- further batch expires at least one reservation.
        EXIT WHEN (v_batch ->> 'expired')::integer = 0;
    END LOOP;
    RAISE NOTICE 'tokentrack sweep: % reservations expired, % tokens billed, % batches',
        v_expired, v_billed, v_batches;
END
$procedure$;

-- (sqlfluff misparses the argument list of COMMENT ON PROCEDURE: hence the noqa below)
COMMENT ON PROCEDURE tokentrack.sweep_expired_reservations(integer) IS -- noqa: LT01
'Expiry sweep in batches of p_batch_size, committing after each batch (for pg_cron).';

REVOKE ALL ON PROCEDURE tokentrack.sweep_expired_reservations(integer) FROM PUBLIC;
GRANT EXECUTE ON PROCEDURE tokentrack.sweep_expired_reservations(integer) TO tokentrack_service;
