-- version: 20261212000000
--
-- tokentrack.ack_notification(p_id bigint, p_consumer text) -> jsonb
--
-- Acknowledges notification p_id on behalf of consumer p_consumer: it is delivered, and no
-- claim hands it out again. Whoever holds it may acknowledge it: the consumer whose lease it
-- is under (live or lapsed), or anyone when it is unclaimed or its lease lapsed (an operator
-- dismissing it, a consumer that delivered it just after its lease ran out). While another
-- consumer's lease is live it is refused (notification_claimed): that consumer is delivering
-- it and acknowledges it itself, so each notification is acknowledged by the consumer that
-- delivered it last.
-- Answer: {"success": true, "duplicate": false, "id", "acked_at", "acked_by"}; again (by
--   anyone): {"success": true, "duplicate": true, ...} with the first acknowledgement's
--   acked_at and acked_by, nothing written.
-- Refusals (success false, nothing written): notification_not_found; notification_claimed
--   (with claimed_by and lease_until).
-- Locks: the notification row (FOR UPDATE, rank 7 of the global order, docs/REVIEW.md).
-- Writes: acked_at and acked_by (claimed_by and lease_until stay: who held it last).
-- Errors: 25000 under REPEATABLE READ or SERIALIZABLE; 22004 a NULL argument; 22023 a p_id below
--   1 or a blank p_consumer; 22001 a p_consumer over 200 characters.
CREATE OR REPLACE FUNCTION tokentrack.ack_notification(p_id bigint, p_consumer text)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_notification tokentrack.notifications%ROWTYPE;
BEGIN
    -- READ COMMITTED only: see require_read_committed (it re-reads a row it waited for).
    PERFORM tokentrack.require_read_committed('ack_notification');
    IF p_id IS NULL THEN
        RAISE EXCEPTION 'p_id must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_id';
    END IF;
    IF p_id < 1 THEN
        RAISE EXCEPTION 'p_id must be at least 1 (got %)', p_id USING ERRCODE = '22023', COLUMN = 'p_id';
    END IF;
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

    SELECT n.* INTO v_notification FROM tokentrack.notifications AS n WHERE n.id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'notification_not_found',
            'message', pg_catalog.format('notification %s does not exist', p_id)
        );
    END IF;
    IF v_notification.acked_at IS NOT NULL THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', true, 'duplicate', true, 'id', v_notification.id,
            'acked_at', v_notification.acked_at, 'acked_by', v_notification.acked_by
        );
    END IF;
    IF
        v_notification.claimed_by IS DISTINCT FROM p_consumer
        AND v_notification.lease_until > pg_catalog.now()
    THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'notification_claimed',
            'message', pg_catalog.format(
                'notification %s is being delivered by consumer %s (its lease runs until %s)',
                p_id, v_notification.claimed_by, v_notification.lease_until
            ),
            'claimed_by', v_notification.claimed_by,
            'lease_until', v_notification.lease_until
        );
    END IF;

    UPDATE tokentrack.notifications AS n
    SET acked_at = pg_catalog.now(), acked_by = p_consumer
    WHERE n.account_id = v_notification.account_id AND n.id = p_id
    RETURNING n.* INTO v_notification;

    RETURN pg_catalog.jsonb_build_object(
        'success', true, 'duplicate', false, 'id', v_notification.id,
        'acked_at', v_notification.acked_at, 'acked_by', v_notification.acked_by
    );
END
$function$;

COMMENT ON FUNCTION tokentrack.ack_notification(bigint, text) IS
'Acknowledges a notification (never handed out again); again: duplicate. Refused while another '
'consumer''s lease on it is live (notification_claimed).';

REVOKE ALL ON FUNCTION tokentrack.ack_notification(bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.ack_notification(bigint, text) TO tokentrack_service;
