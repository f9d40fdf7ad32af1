-- version: 20261210000000
--
-- tokentrack.reserve(p_account_id uuid, p_report_id uuid, p_estimate jsonb,
--     p_subjects text[] DEFAULT '{}', p_mode text DEFAULT 'standard') -> jsonb
--
-- Reserves an estimate for a report against the account's usage period (as
-- try_reserve_tokens) and every budget that applies: the account's own budgets and those of
-- each subject in p_subjects (a subject without a budget is fine: nothing of it applies), each
-- in its current window. Atomic: granted only when the estimate fits all of them; of N racing
-- requests exactly as many as fit are granted, for every budget at once (reserve_usage).
-- p_estimate is a JSON object: tokens (required, a positive whole number) and, for cost
-- budgets, either cost_micros (a whole number, not negative) or model (a model name: the
-- tokens priced at that model's dearest class, from its price in effect now; an unpriced
-- model gives no cost estimate). Without one, the reservation holds 0 in cost budgets and is
-- refused by one only when its window is exhausted.
-- p_mode is the report's mode (standard, dd, discovery, hybrid): set when the report is
-- created, or when a pending report starts; NULL keeps a pending report's mode (a new report
-- is standard), as try_reserve_tokens does.
-- Answer: granted {"success": true, "reservation_id", "reserved_tokens", "available_tokens"
--   (the period's, after this one), "expires_at", "period_id", "existing", "budgets": [{
--   "budget_id", "subject", "window", "unit", "window_start", "held", "available"}]};
--   refusals as try_reserve_tokens, and insufficient_budget (budget_id, subject, window, unit,
--   window_start, available, requested).
-- Locks and writes: see reserve_usage (the period row, then the budgets in id order).
-- Errors: 25000 under REPEATABLE READ or SERIALIZABLE; 22004 a NULL id, p_estimate, p_subjects
--   or subject, or a missing p_estimate.tokens; 22023 p_estimate not an object, an unknown key,
--   tokens not a positive whole number, cost_micros not a whole number >= 0, both cost_micros
--   and model, model not a string, a blank subject, more than 32 subjects, an unknown mode;
--   22001 a subject or model over 200 characters; 22003 tokens beyond the integer range.
-- Since version 20261213000000 its refusals are counted (count_refusal, operation reserve): no
--   write to the transaction; see sql/schema/20261213000000_metrics.sql. Since version
--   20261214000000 a granted answer makes no call of count_refusal or require_read_committed
--   (their tests are made inline).
CREATE OR REPLACE FUNCTION tokentrack.reserve(
    p_account_id uuid,
    p_report_id uuid,
    p_estimate jsonb,
    p_subjects text[] DEFAULT '{}'::text[],
    p_mode text DEFAULT 'standard'
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_estimate tokentrack.reservation_estimate;
    v_subject text;
    v_answer jsonb;
BEGIN
    -- READ COMMITTED only: see require_read_committed (called to raise its error; since version
    -- 20261214000000 the test is made here first, no call when it passes).
    IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
        PERFORM tokentrack.require_read_committed('reserve');
    END IF;
    IF p_account_id IS NULL THEN
        RAISE EXCEPTION 'p_account_id must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_account_id';
    END IF;
    IF p_report_id IS NULL THEN
        RAISE EXCEPTION 'p_report_id must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_report_id';
    END IF;
    v_estimate := tokentrack.check_estimate(p_estimate, 'p_estimate');
    IF p_subjects IS NULL THEN
        RAISE EXCEPTION 'p_subjects must not be NULL (no subject: an empty array)'
            USING ERRCODE = '22004', COLUMN = 'p_subjects';
    END IF;
    IF pg_catalog.cardinality(p_subjects) > 32 THEN
        RAISE EXCEPTION 'p_subjects must hold at most 32 subjects (got %)', pg_catalog.cardinality(p_subjects)
            USING ERRCODE = '22023', COLUMN = 'p_subjects';
    END IF;
    FOREACH v_subject IN ARRAY p_subjects LOOP
        IF v_subject IS NULL THEN
            RAISE EXCEPTION 'p_subjects must not hold NULL' USING ERRCODE = '22004', COLUMN = 'p_subjects';
        END IF;
        IF pg_catalog.btrim(v_subject) = '' THEN
            RAISE EXCEPTION 'p_subjects must not hold an empty subject' USING ERRCODE = '22023', COLUMN = 'p_subjects';
        END IF;
        IF pg_catalog.length(v_subject) > 200 THEN
            RAISE EXCEPTION 'a subject of p_subjects must be at most 200 characters (got %)', pg_catalog.length(v_subject)
                USING ERRCODE = '22001', COLUMN = 'p_subjects';
        END IF;
    END LOOP;
    IF p_mode NOT IN ('standard', 'dd', 'discovery', 'hybrid') THEN
        RAISE EXCEPTION 'p_mode must be standard, dd, discovery or hybrid (got %)', p_mode
            USING ERRCODE = '22023', COLUMN = 'p_mode';
    END IF;

    v_answer := tokentrack.reserve_usage(
        p_account_id, p_report_id, v_estimate.tokens, v_estimate.cost_micros, p_subjects, p_mode
    );
    -- count_refusal returns a granted answer unchanged: called for refusals only (since
    -- version 20261214000000).
    IF (v_answer ->> 'success') = 'false' THEN
        RETURN tokentrack.count_refusal('reserve', v_answer);
    END IF;
    RETURN v_answer;
END
$function$;

COMMENT ON FUNCTION tokentrack.reserve(uuid, uuid, jsonb, text[], text) IS
'Reserves an estimate (tokens, and a cost) for a report against the account''s usage period and '
'every budget of the account and of the given subjects, atomically; refused with the budget '
'that cannot hold it.';

REVOKE ALL ON FUNCTION tokentrack.reserve(uuid, uuid, jsonb, text[], text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.reserve(uuid, uuid, jsonb, text[], text) TO tokentrack_service;
