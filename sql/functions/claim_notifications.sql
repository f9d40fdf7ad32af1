-- version: 20261212000000
--
-- tokentrack.claim_notifications(p_consumer text, p_limit integer,
--     p_lease interval DEFAULT '60 seconds') -> jsonb
--
-- Hands out at most p_limit unacknowledged notifications to consumer p_consumer, oldest
-- first (by id), each one whose lease is free (never claimed) or lapsed (lease_until <= now():
-- its last claimer died, hung or gave up before acknowledging it), and leases them to it
-- for p_lease (default 60 seconds): claimed_by = p_consumer, lease_until = now() + p_lease,
-- attempts + 1. While the lease is live no other claim hands the notification out; once it
-- lapses the next claim does (at least once delivery). A notification acknowledged
-- (ack_notification) is never handed out again. The contract's two-argument call takes the
-- default lease.
-- Answer: {"notifications": [{"id", "account_id", "budget_id", "subject", "window_start",
--   "threshold", "used", "limit", "created_at", "unit", "window", "lease_until",
--   "attempts"}, ...]} ([] when nothing is due).
-- Locks: the notification rows it hands out (FOR UPDATE SKIP LOCKED, rank 7 of the global
--   order, docs/REVIEW.md): a row that a concurrent claim or ack holds is skipped, not waited
--   for, so concurrent claimers never hand out the same notification and never wait for each
--   other; a row whose lease another claim took meanwhile drops out when it is re-read.
-- Writes: claimed_by, lease_until and attempts of the rows it hands out.
-- Errors: 25000 under REPEATABLE READ or SERIALIZABLE; 22004 a NULL argument; 22023 a blank
--   p_consumer, a p_limit outside 1..1000, a p_lease not above 0 or above 1 day; 22001 a
--   p_consumer over 200 characters.
CREATE OR REPLACE FUNCTION tokentrack.claim_notifications(
    p_consumer text, p_limit integer, p_lease interval DEFAULT '60 seconds'::interval
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_answer jsonb;
BEGIN
    -- READ COMMITTED only: see require_read_committed (a claim re-reads a row it waited for).
    PERFORM tokentrack.require_read_committed('claim_notifications');
    IF p_consumer IS NULL THEN
        RAISE EXCEPTION 'p_consumer must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_consumer';
    END IF;
    IF pg_catalog.length(p_consumer) > 200 THEN
        RAISE EXCEPTION 'p_consumer must be at most 200 characters (got %)', pg_catalog.length(p_consumer)
            USING ERRCODE = '22001', COLUMN = 'p_consumer';
    END IF;
    IF pg_catalog.btrim(p_consumer) = '' THEN
        RAISE EXCEPTION 'p_consumer must not be blank' USING ERRCODE = '22023', COLUMN = 'p_consumer';
    END IF;
    IF p_limit IS NULL THEN
        RAISE EXCEPTION 'p_limit must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_limit';
    END IF;
    IF p_limit < 1 OR p_limit > 1000 THEN
        RAISE EXCEPTION 'p_limit must be between 1 and 1000 (got %)', p_limit
            USING ERRCODE = '22023', COLUMN = 'p_limit';
    END IF;
    IF p_lease IS NULL THEN
        RAISE EXCEPTION 'p_lease must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_lease';
    END IF;
    IF p_lease <= INTERVAL '0' OR p_lease > INTERVAL '1 day' THEN
        RAISE EXCEPTION 'p_lease must be above 0 and at most 1 day (got %)', p_lease
            USING ERRCODE = '22023', COLUMN = 'p_lease';
    END IF;

    WITH picked AS (
        SELECT
            n.account_id,
            n.id
        FROM tokentrack.notifications AS n
        WHERE
            n.acked_at IS NULL
            AND (n.lease_until IS NULL OR n.lease_until <= pg_catalog.now())
        ORDER BY n.id
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ),

    claimed AS (
        UPDATE tokentrack.notifications AS n
        SET
            claimed_by = p_consumer,
            lease_until = pg_catalog.now() + p_lease,
            attempts = n.attempts + 1
        FROM picked AS p
        WHERE n.account_id = p.account_id AND n.id = p.id
        RETURNING n.*
    )

    SELECT pg_catalog.jsonb_build_object(
        'notifications', COALESCE(pg_catalog.jsonb_agg(
            pg_catalog.jsonb_build_object(
                'id', c.id,
                'account_id', c.account_id,
                'budget_id', c.budget_id,
                'subject', c.subject,
                'window_start', c.window_start,
                'threshold', c.threshold,
                'used', c.used,
                'limit', c.limit_amount,
                'created_at', c.created_at,
                'unit', c.unit,
                'window', c.budget_window,
                'lease_until', c.lease_until,
                'attempts', c.attempts
            ) ORDER BY c.id
        ), '[]'::jsonb)
    ) INTO v_answer
    FROM claimed AS c;

    RETURN v_answer;
END
$function$;

COMMENT ON FUNCTION tokentrack.claim_notifications(text, integer, interval) IS
'Hands out unacknowledged notifications whose lease is free or lapsed to one consumer, oldest '
'first, with a lease (default 60 seconds; FOR UPDATE SKIP LOCKED: one claimer at a time).';

REVOKE ALL ON FUNCTION tokentrack.claim_notifications(text, integer, interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.claim_notifications(text, integer, interval) TO tokentrack_service;
