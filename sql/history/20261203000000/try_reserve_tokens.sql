-- version: 20260108000000
--
-- tokentrack.try_reserve_tokens(p_account_id, p_report_id, p_estimated_tokens) -> jsonb
--
-- Reserves an estimate against the account's budget before a report starts:
--   available = tokens_limit - tokens_used
--               - reserved_tokens of the account's active, unexpired reservations
-- and grants when the estimate fits. The report row is created (status processing) when it
-- does not exist yet; a pending report becomes processing.
-- Locks: the account's active usage_periods row (FOR UPDATE). Every reserver of an account
--   takes it first, so reservation checks of one account run one at a time and never grant
--   together more than is available. No other row is locked (the report and reservation rows
--   are new, or only read).
-- Writes (only when granted): reports (insert or pending -> processing), one
--   report_reservations row (active, expires 2 hours later).
-- Idempotent: reserving again for a report whose reservation is active and unexpired returns
--   that reservation and reserves nothing more.
-- Refusals (success false, nothing written), checked in this order: account_not_found,
--   report_account_mismatch, no_active_period, report_finalized, insufficient_tokens.
--   report_finalized's message says which case it is: the report has an outcome; its
--   reservation is completed (billed by finalize); expired (billed by the sweep); or active but
--   past expires_at (holds nothing, not billed yet: the sweep will bill it).
-- Errors: 25000 when run under REPEATABLE READ or SERIALIZABLE (READ COMMITTED only, see
--   docs/REVIEW.md); 22004 a NULL argument; 22023 a non-positive estimate.
-- Assumes READ COMMITTED (each statement sees what committed before it): the reservation sum
--   is read after the period lock is granted, so it includes every reservation committed
--   before that.
CREATE OR REPLACE FUNCTION tokentrack.try_reserve_tokens(
    p_account_id uuid, p_report_id uuid, p_estimated_tokens integer
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_period tokentrack.usage_periods%ROWTYPE;
    v_report tokentrack.reports%ROWTYPE;
    v_reservation tokentrack.report_reservations%ROWTYPE;
    v_held bigint;
    v_available bigint;
BEGIN
    -- READ COMMITTED only: see require_read_committed.
    PERFORM tokentrack.require_read_committed('try_reserve_tokens');
    IF p_account_id IS NULL THEN
        RAISE EXCEPTION 'p_account_id must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_account_id';
    END IF;
    IF p_report_id IS NULL THEN
        RAISE EXCEPTION 'p_report_id must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_report_id';
    END IF;
    IF p_estimated_tokens IS NULL THEN
        RAISE EXCEPTION 'p_estimated_tokens must not be NULL'
            USING ERRCODE = '22004', COLUMN = 'p_estimated_tokens';
    END IF;
    IF p_estimated_tokens <= 0 THEN
        RAISE EXCEPTION 'p_estimated_tokens must be positive (got %)', p_estimated_tokens
            USING ERRCODE = '22023', COLUMN = 'p_estimated_tokens';
    END IF;

    IF NOT EXISTS (SELECT FROM tokentrack.accounts AS a WHERE a.id = p_account_id) THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'account_not_found',
            'message', pg_catalog.format('account %s does not exist', p_account_id)
        );
    END IF;

    SELECT r.* INTO v_report FROM tokentrack.reports AS r WHERE r.id = p_report_id;
    IF FOUND AND v_report.account_id <> p_account_id THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'report_account_mismatch',
            'message', pg_catalog.format('report %s belongs to another account', p_report_id)
        );
    END IF;

    v_period := tokentrack.lock_active_period(p_account_id);
    IF v_period.id IS NULL THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'no_active_period',
            'message', pg_catalog.format('account %s has no active usage period', p_account_id)
        );
    END IF;

    -- Under the period lock: what the account's active, unexpired reservations hold.
    SELECT COALESCE(pg_catalog.sum(rr.reserved_tokens), 0) INTO v_held
    FROM tokentrack.report_reservations AS rr
    WHERE rr.account_id = p_account_id AND rr.status = 'active' AND rr.expires_at > pg_catalog.now();
    v_available := v_period.tokens_limit - v_period.tokens_used - v_held;

    SELECT rr.* INTO v_reservation FROM tokentrack.report_reservations AS rr WHERE rr.report_id = p_report_id;
    IF FOUND AND v_reservation.account_id <> p_account_id THEN
        -- The report was created by another account's reservation after the check above.
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'report_account_mismatch',
            'message', pg_catalog.format('report %s belongs to another account', p_report_id)
        );
    END IF;
    IF FOUND THEN
        IF v_reservation.status = 'active' AND v_reservation.expires_at > pg_catalog.now() THEN
            RETURN pg_catalog.jsonb_build_object(
                'success', true,
                'reservation_id', v_reservation.id,
                'reserved_tokens', v_reservation.reserved_tokens,
                'available_tokens', GREATEST(v_available, 0),
                'expires_at', v_reservation.expires_at,
                'period_id', v_reservation.period_id,
                'existing', true
            );
        END IF;
        -- report_finalized in each case (the report's one reservation is used up: an expired
        -- one holds nothing, whether or not the sweep has run), with a message that says which.
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'report_finalized',
            'message', CASE v_reservation.status
                WHEN 'completed' THEN pg_catalog.format(
                    'report %s was already billed (its reservation is completed)', p_report_id
                )
                WHEN 'expired' THEN pg_catalog.format(
                    'report %s was already billed by the expiry sweep (its reservation expired at %s)',
                    p_report_id, v_reservation.expires_at
                )
                ELSE pg_catalog.format(
                    'report %s cannot be reserved again: its reservation expired at %s and holds '
                    'nothing; the expiry sweep has not billed it yet and will bill its recorded steps',
                    p_report_id, v_reservation.expires_at
                )
            END
        );
    END IF;
    IF v_report.status IN ('complete', 'failed', 'cancelled') THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'report_finalized',
            'message', pg_catalog.format('report %s already ended as %s', p_report_id, v_report.status)
        );
    END IF;

    IF p_estimated_tokens > v_available THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'insufficient_tokens',
            'message', pg_catalog.format(
                'requested %s tokens, %s available', p_estimated_tokens, GREATEST(v_available, 0)
            ),
            'available_tokens', GREATEST(v_available, 0),
            'requested_tokens', p_estimated_tokens
        );
    END IF;

    IF v_report.id IS NULL THEN
        INSERT INTO tokentrack.reports (id, account_id, status)
        VALUES (p_report_id, p_account_id, 'processing')
        ON CONFLICT (id) DO NOTHING;
        IF NOT FOUND THEN
            -- Created at this moment by another account's reservation (same-account callers
            -- are serialised by the period lock and would have seen it above).
            RETURN pg_catalog.jsonb_build_object(
                'success', false, 'error', 'report_account_mismatch',
                'message', pg_catalog.format('report %s belongs to another account', p_report_id)
            );
        END IF;
    ELSIF v_report.status = 'pending' THEN
        UPDATE tokentrack.reports AS r SET status = 'processing' WHERE r.id = p_report_id;
    END IF;

    INSERT INTO tokentrack.report_reservations (report_id, account_id, period_id, reserved_tokens)
    VALUES (p_report_id, p_account_id, v_period.id, p_estimated_tokens)
    RETURNING * INTO v_reservation;

    RETURN pg_catalog.jsonb_build_object(
        'success', true,
        'reservation_id', v_reservation.id,
        'reserved_tokens', v_reservation.reserved_tokens,
        'available_tokens', v_available - p_estimated_tokens,
        'expires_at', v_reservation.expires_at,
        'period_id', v_reservation.period_id,
        'existing', false
    );
END
$function$;

COMMENT ON FUNCTION tokentrack.try_reserve_tokens(uuid, uuid, integer) IS
'Reserves an estimate of tokens for a report against the account''s budget; refused with a code '
'when it does not fit. Idempotent per report while the reservation is active.';

REVOKE ALL ON FUNCTION tokentrack.try_reserve_tokens(uuid, uuid, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.try_reserve_tokens(uuid, uuid, integer) TO tokentrack_service;
