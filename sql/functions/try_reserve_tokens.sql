-- version: 20260108000000
--
-- tokentrack.try_reserve_tokens(p_account_id, p_report_id, p_estimated_tokens) -> jsonb
--
-- Since version 20261210000000: reserve(p_account_id, p_report_id, {"tokens":
-- p_estimated_tokens}) (reserve_usage does the work): the account's budgets apply too, and an
-- answer may carry insufficient_budget; granted answers gain "budgets" (what each holds),
-- insufficient_tokens gains period_id. Before that version:
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
-- Since version 20261213000000 its refusals are counted (count_refusal, operation reserve): no
--   write to the transaction; see sql/schema/20261213000000_metrics.sql. Since version
--   20261214000000 a granted answer makes no call of count_refusal or require_read_committed
--   (their tests are made inline).
CREATE OR REPLACE FUNCTION tokentrack.try_reserve_tokens(
    p_account_id uuid, p_report_id uuid, p_estimated_tokens integer
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_answer jsonb;
BEGIN
    -- READ COMMITTED only: see require_read_committed (called to raise its error; since version
    -- 20261214000000 the test is made here first, no call when it passes).
    IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
        PERFORM tokentrack.require_read_committed('try_reserve_tokens');
    END IF;
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

    v_answer := tokentrack.reserve_usage(p_account_id, p_report_id, p_estimated_tokens, NULL, '{}', NULL);
    -- count_refusal returns a granted answer unchanged: called for refusals only (since
    -- version 20261214000000).
    IF (v_answer ->> 'success') = 'false' THEN
        RETURN tokentrack.count_refusal('reserve', v_answer);
    END IF;
    RETURN v_answer;
END
$function$;

COMMENT ON FUNCTION tokentrack.try_reserve_tokens(uuid, uuid, integer) IS
'Reserves an estimate of tokens for a report against the account''s budget; refused with a code '
'when it does not fit. Idempotent per report while the reservation is active.';

REVOKE ALL ON FUNCTION tokentrack.try_reserve_tokens(uuid, uuid, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.try_reserve_tokens(uuid, uuid, integer) TO tokentrack_service;
