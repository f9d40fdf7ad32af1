-- version: 20251219000000
--
-- tokentrack.increment_usage(p_account_id, p_tokens, p_is_report, p_is_chat) -> jsonb
--
-- The legacy path: adds p_tokens to the account's active period, and 1 to reports_count
-- when p_is_report. p_is_chat is recorded on the ledger row; it changes no counter.
-- Locks: the account's active usage_periods row (FOR UPDATE), through lock_active_period.
-- Writes: usage_periods.tokens_used / reports_count, and one usage_ledger row (kind
--   'increment') in the same transaction, so reconcile() can explain the change.
-- Idempotent: no. Every call adds; callers that retry must know whether the call committed.
-- Refusals (success false): account_not_found, no_active_period.
-- Errors: 22004 a NULL argument; 22023 p_tokens negative.
CREATE OR REPLACE FUNCTION tokentrack.increment_usage(
    p_account_id uuid, p_tokens integer, p_is_report boolean, p_is_chat boolean
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_period tokentrack.usage_periods%ROWTYPE;
    v_reports integer;
BEGIN
    IF p_account_id IS NULL THEN
        RAISE EXCEPTION 'p_account_id must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_account_id';
    END IF;
    IF p_tokens IS NULL THEN
        RAISE EXCEPTION 'p_tokens must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_tokens';
    END IF;
    IF p_tokens < 0 THEN
        RAISE EXCEPTION 'p_tokens must not be negative (got %)', p_tokens
            USING ERRCODE = '22023', COLUMN = 'p_tokens';
    END IF;
    IF p_is_report IS NULL THEN
        RAISE EXCEPTION 'p_is_report must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_is_report';
    END IF;
    IF p_is_chat IS NULL THEN
        RAISE EXCEPTION 'p_is_chat must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_is_chat';
    END IF;

    IF NOT EXISTS (SELECT FROM tokentrack.accounts AS a WHERE a.id = p_account_id) THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'account_not_found',
            'message', pg_catalog.format('account %s does not exist', p_account_id)
        );
    END IF;

    v_period := tokentrack.lock_active_period(p_account_id);
    IF v_period.id IS NULL THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'no_active_period',
            'message', pg_catalog.format('account %s has no active usage period', p_account_id)
        );
    END IF;

    v_reports := CASE WHEN p_is_report THEN 1 ELSE 0 END;

    UPDATE tokentrack.usage_periods AS p
    SET tokens_used = p.tokens_used + p_tokens, reports_count = p.reports_count + v_reports
    WHERE p.id = v_period.id
    RETURNING p.* INTO v_period;

    INSERT INTO tokentrack.usage_ledger (account_id, period_id, kind, tokens, reports, is_chat)
    VALUES (p_account_id, v_period.id, 'increment', p_tokens, v_reports, p_is_chat);

    RETURN pg_catalog.jsonb_build_object(
        'success', true,
        'period_id', v_period.id,
        'tokens_used', v_period.tokens_used,
        'tokens_limit', v_period.tokens_limit,
        'reports_count', v_period.reports_count
    );
END
$function$;

COMMENT ON FUNCTION tokentrack.increment_usage(uuid, integer, boolean, boolean) IS
'Legacy path: adds tokens (and a report when p_is_report) to the active period, with a ledger row. '
'Returns success, period_id, tokens_used, tokens_limit, reports_count.';

REVOKE ALL ON FUNCTION tokentrack.increment_usage(uuid, integer, boolean, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.increment_usage(uuid, integer, boolean, boolean) TO tokentrack_service;
