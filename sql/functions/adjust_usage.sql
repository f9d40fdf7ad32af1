-- version: 20261211000000
--
-- tokentrack.adjust_usage(p_account_id uuid, p_budget_id uuid, p_delta bigint,
--     p_idempotency_key text, p_reason text) -> jsonb
--
-- Adds a signed correction: with p_budget_id, to the used amount of that budget's current
-- window (in the budget's unit; the window's row is created when it has none); with
-- p_budget_id NULL, to tokens_used of the account's active usage period. One
-- usage_adjustments row records it (the window or the period, the delta, the reason), and
-- reconcile counts it where it explains used or tokens_used. An adjustment never takes used or
-- tokens_used below 0: it is refused (negative_usage) instead, so a correction larger than
-- what is there must be found and made where the usage is.
-- Idempotent by p_idempotency_key, scoped to the account and to adjustments: a call with a key
-- the account already used for an adjustment with the same budget (or NULL), delta and reason
-- is a retry and answers "duplicate": true with the first call's record (its window or period;
-- "used" is the value now), nothing written; with other arguments it is refused with
-- idempotency_conflict (nothing written; adjustment_id names the first one).
-- Locks: a period adjustment, the account's active period (lock_active_period: FOR UPDATE,
--   rank 3 of the global order, docs/REVIEW.md); a budget adjustment, the budget
--   (lock_budgets: FOR UPDATE, rank 4), then its window row (rank 6, by the insert or update).
--   Under those locks no billing, refund or other adjustment changes the same amount.
-- Writes: one usage_adjustments row, then usage_periods.tokens_used or budget_windows.used.
-- Answer: {"success": true, "adjustment_id", "budget_id", "window_start", "period_id", "unit"
--   (tokens for a period), "delta", "used" (the window's used or the period's tokens_used
--   after the adjustment), "duplicate"}; budget_id and window_start are null for a period
--   adjustment, period_id null for a budget adjustment.
-- Refusals (success false, nothing written), in this order: account_not_found,
--   idempotency_conflict (with adjustment_id), no_active_period (p_budget_id NULL),
--   budget_not_found, negative_usage (with used and delta, and period_id or budget_id and
--   window_start).
-- Errors: 25000 under REPEATABLE READ or SERIALIZABLE; 22004 a NULL account, delta, key or
--   reason; 22023 a delta of 0, an empty key or reason; 22001 a key over 200 or a reason over
--   1000 characters; 22003 a delta that would take used past the bigint range.
CREATE OR REPLACE FUNCTION tokentrack.adjust_usage(
    p_account_id uuid,
    p_budget_id uuid,
    p_delta bigint,
    p_idempotency_key text,
    p_reason text
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_adjustment tokentrack.usage_adjustments%ROWTYPE;
    v_period tokentrack.usage_periods%ROWTYPE;
    v_budget tokentrack.budgets%ROWTYPE;
    v_window_start timestamptz;
    v_used bigint;
BEGIN
    -- READ COMMITTED only: see require_read_committed.
    PERFORM tokentrack.require_read_committed('adjust_usage');
    IF p_account_id IS NULL THEN
        RAISE EXCEPTION 'p_account_id must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_account_id';
    END IF;
    IF p_delta IS NULL THEN
        RAISE EXCEPTION 'p_delta must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_delta';
    END IF;
    IF p_delta = 0 THEN
        RAISE EXCEPTION 'p_delta must not be 0' USING ERRCODE = '22023', COLUMN = 'p_delta';
    END IF;
    PERFORM tokentrack.check_correction_text(p_idempotency_key, 'p_idempotency_key', 200);
    PERFORM tokentrack.check_correction_text(p_reason, 'p_reason', 1000);

    IF NOT EXISTS (SELECT FROM tokentrack.accounts AS a WHERE a.id = p_account_id) THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'account_not_found',
            'message', pg_catalog.format('account %s does not exist', p_account_id)
        );
    END IF;

    SELECT ua.* INTO v_adjustment FROM tokentrack.usage_adjustments AS ua
    WHERE ua.account_id = p_account_id AND ua.idempotency_key = p_idempotency_key;
    IF NOT FOUND THEN
        IF p_budget_id IS NULL THEN
            v_period := tokentrack.lock_active_period(p_account_id);
            IF v_period.id IS NULL THEN
                RETURN pg_catalog.jsonb_build_object(
                    'success', false, 'error', 'no_active_period',
                    'message', pg_catalog.format('account %s has no active usage period', p_account_id)
                );
            END IF;
            v_used := v_period.tokens_used;
        ELSE
            PERFORM tokentrack.lock_budgets(p_account_id, ARRAY[p_budget_id]);
            SELECT b.* INTO v_budget FROM tokentrack.budgets AS b
            WHERE b.account_id = p_account_id AND b.id = p_budget_id;
            IF NOT FOUND THEN
                RETURN pg_catalog.jsonb_build_object(
                    'success', false, 'error', 'budget_not_found',
                    'message', pg_catalog.format('account %s has no budget %s', p_account_id, p_budget_id)
                );
            END IF;
            v_window_start := tokentrack.budget_window_start(
                v_budget.budget_window, v_budget.timezone, v_budget.created_at, pg_catalog.now()
            );
            SELECT COALESCE(pg_catalog.max(w.used), 0) INTO v_used FROM tokentrack.budget_windows AS w
            WHERE w.account_id = p_account_id AND w.budget_id = p_budget_id AND w.window_start = v_window_start;
        END IF;
        -- A retry that waited for the lock while the first call committed: answered below.
        SELECT ua.* INTO v_adjustment FROM tokentrack.usage_adjustments AS ua
        WHERE ua.account_id = p_account_id AND ua.idempotency_key = p_idempotency_key;
    END IF;

    IF v_adjustment.id IS NULL THEN
        IF v_used::numeric + p_delta < 0 THEN
            RETURN pg_catalog.jsonb_build_object(
                'success', false, 'error', 'negative_usage',
                'message', pg_catalog.format(
                    'an adjustment of %s would take %s below 0 (it is %s)', p_delta,
                    CASE WHEN p_budget_id IS NULL THEN 'the period''s tokens_used'
                        ELSE pg_catalog.format('the used amount of budget %s''s window from %s', p_budget_id, v_window_start) END,
                    v_used
                ),
                'used', v_used,
                'delta', p_delta,
                'period_id', v_period.id,
                'budget_id', p_budget_id,
                'window_start', v_window_start
            );
        END IF;
        IF v_used::numeric + p_delta > 9223372036854775807 THEN
            RAISE EXCEPTION 'p_delta (%) would take the used amount past the bigint range (it is %)', p_delta, v_used
                USING ERRCODE = '22003', COLUMN = 'p_delta';
        END IF;

        INSERT INTO tokentrack.usage_adjustments (
            account_id, budget_id, window_start, period_id, delta, idempotency_key, reason
        )
        VALUES (p_account_id, p_budget_id, v_window_start, v_period.id, p_delta, p_idempotency_key, p_reason)
        ON CONFLICT ON CONSTRAINT usage_adjustments_one_per_key DO NOTHING
        RETURNING * INTO v_adjustment;
        IF FOUND THEN
            IF p_budget_id IS NULL THEN
                UPDATE tokentrack.usage_periods AS p SET tokens_used = p.tokens_used + p_delta
                WHERE p.id = v_period.id
                RETURNING p.tokens_used INTO v_used;
            ELSE
                UPDATE tokentrack.budget_windows AS w SET used = w.used + p_delta
                WHERE w.account_id = p_account_id AND w.budget_id = p_budget_id AND w.window_start = v_window_start
                RETURNING w.used INTO v_used;
                IF NOT FOUND THEN
                    -- No row yet (so p_delta > 0): opened here, under the budget lock, as
                    -- reserve_usage opens one.
                    INSERT INTO tokentrack.budget_windows (account_id, budget_id, window_start, used)
                    VALUES (p_account_id, p_budget_id, v_window_start, p_delta)
                    RETURNING used INTO v_used;
                END IF;
            END IF;
            RETURN pg_catalog.jsonb_build_object(
                'success', true,
                'adjustment_id', v_adjustment.id,
                'budget_id', v_adjustment.budget_id,
                'window_start', v_adjustment.window_start,
                'period_id', v_adjustment.period_id,
                'unit', COALESCE(v_budget.unit, 'tokens'),
                'delta', v_adjustment.delta,
                'used', v_used,
                'duplicate', false
            );
        END IF;
        -- The same key, inserted meanwhile by a call that committed: answered as below.
        SELECT ua.* INTO STRICT v_adjustment FROM tokentrack.usage_adjustments AS ua
        WHERE ua.account_id = p_account_id AND ua.idempotency_key = p_idempotency_key;
    END IF;

    IF v_adjustment.budget_id IS DISTINCT FROM p_budget_id OR v_adjustment.delta <> p_delta
        OR v_adjustment.reason <> p_reason THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'idempotency_conflict',
            'message', pg_catalog.format(
                'idempotency key %s was used for adjustment %s with other arguments',
                p_idempotency_key, v_adjustment.id
            ),
            'adjustment_id', v_adjustment.id
        );
    END IF;
    IF v_adjustment.budget_id IS NULL THEN
        SELECT p.tokens_used INTO STRICT v_used FROM tokentrack.usage_periods AS p WHERE p.id = v_adjustment.period_id;
    ELSE
        SELECT b.* INTO STRICT v_budget FROM tokentrack.budgets AS b
        WHERE b.account_id = p_account_id AND b.id = v_adjustment.budget_id;
        SELECT w.used INTO STRICT v_used FROM tokentrack.budget_windows AS w
        WHERE
            w.account_id = p_account_id AND w.budget_id = v_adjustment.budget_id
            AND w.window_start = v_adjustment.window_start;
    END IF;
    RETURN pg_catalog.jsonb_build_object(
        'success', true,
        'adjustment_id', v_adjustment.id,
        'budget_id', v_adjustment.budget_id,
        'window_start', v_adjustment.window_start,
        'period_id', v_adjustment.period_id,
        'unit', COALESCE(v_budget.unit, 'tokens'),
        'delta', v_adjustment.delta,
        'used', v_used,
        'duplicate', true
    );
END
$function$;

COMMENT ON FUNCTION tokentrack.adjust_usage(uuid, uuid, bigint, text, text) IS
'Adds a signed correction to a budget''s current window or to the account''s active period; one '
'append-only usage_adjustments row, idempotent by key; never below 0 (negative_usage).';

REVOKE ALL ON FUNCTION tokentrack.adjust_usage(uuid, uuid, bigint, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.adjust_usage(uuid, uuid, bigint, text, text) TO tokentrack_service;
