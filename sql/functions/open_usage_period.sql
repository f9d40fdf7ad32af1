-- version: 20251219000000
--
-- tokentrack.open_usage_period(p_account_id, p_tokens_limit, p_period_end DEFAULT NULL) -> jsonb
--
-- Opens a new active usage period for an account, creating the account when it does not
-- exist yet, and closes the active one (status completed, period_end brought forward to now).
-- Reservations and late steps of the closed period keep billing into it.
-- Locks, in order: the accounts row (FOR NO KEY UPDATE, which does not block the foreign-key
--   checks of other functions) so that two openers of one account serialise, then the active
--   usage_periods row (FOR UPDATE) so that reservations wait for the switch.
-- Writes: accounts (when missing), usage_periods (close + insert).
-- Idempotent: no; each call opens a new period.
-- Errors: 22004 a NULL p_account_id or p_tokens_limit; 22023 a negative limit or a
--   p_period_end that is not in the future.
CREATE OR REPLACE FUNCTION tokentrack.open_usage_period(
    p_account_id uuid, p_tokens_limit bigint, p_period_end timestamptz DEFAULT NULL
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_old tokentrack.usage_periods%ROWTYPE;
    v_new tokentrack.usage_periods%ROWTYPE;
BEGIN
    IF p_account_id IS NULL THEN
        RAISE EXCEPTION 'p_account_id must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_account_id';
    END IF;
    IF p_tokens_limit IS NULL THEN
        RAISE EXCEPTION 'p_tokens_limit must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_tokens_limit';
    END IF;
    IF p_tokens_limit < 0 THEN
        RAISE EXCEPTION 'p_tokens_limit must not be negative (got %)', p_tokens_limit
            USING ERRCODE = '22023', COLUMN = 'p_tokens_limit';
    END IF;
    IF p_period_end IS NOT NULL AND p_period_end <= pg_catalog.now() THEN
        RAISE EXCEPTION 'p_period_end must be in the future (got %)', p_period_end
            USING ERRCODE = '22023', COLUMN = 'p_period_end';
    END IF;

    INSERT INTO tokentrack.accounts (id) VALUES (p_account_id) ON CONFLICT (id) DO NOTHING;
    PERFORM FROM tokentrack.accounts AS a WHERE a.id = p_account_id FOR NO KEY UPDATE;

    v_old := tokentrack.lock_active_period(p_account_id);
    IF v_old.id IS NOT NULL THEN
        UPDATE tokentrack.usage_periods AS p
        SET status = 'completed',
            period_end = CASE
                WHEN pg_catalog.now() > p.period_start THEN LEAST(p.period_end, pg_catalog.now())
                ELSE p.period_end
            END
        WHERE p.id = v_old.id;
    END IF;

    INSERT INTO tokentrack.usage_periods (account_id, tokens_limit, period_end)
    VALUES (
        p_account_id, p_tokens_limit,
        COALESCE(p_period_end, pg_catalog.now() + pg_catalog.make_interval(months => 1))
    )
    RETURNING * INTO v_new;

    RETURN pg_catalog.jsonb_build_object(
        'success', true,
        'period_id', v_new.id,
        'previous_period_id', v_old.id,
        'tokens_limit', v_new.tokens_limit,
        'period_start', v_new.period_start,
        'period_end', v_new.period_end
    );
END
$function$;

COMMENT ON FUNCTION tokentrack.open_usage_period(uuid, bigint, timestamptz) IS
'Opens a new active usage period (creating the account if needed) and closes the active one.';

REVOKE ALL ON FUNCTION tokentrack.open_usage_period(uuid, bigint, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.open_usage_period(uuid, bigint, timestamptz) TO tokentrack_service;
