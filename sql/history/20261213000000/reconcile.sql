-- version: 20260108000000
--
-- tokentrack.reconcile(p_account_id uuid DEFAULT NULL) -> jsonb
--
-- Read-only audit of every usage period (of one account, or of all). For each period:
--   tokens_used     = sum of its usage_ledger rows' tokens   (check "tokens_used")
--   reports_count   = sum of its usage_ledger rows' reports  (check "reports_count")
--   each billing ledger row (report_billed, report_expired, late_step) = the total_tokens of
--   the step rows it billed                                  (check "ledger_entry")
--   every billed step row points at a billing ledger row of its period (check "billed_steps")
-- and, for every step with a stored cost (of the account, or of all), that the cost follows
-- from its tokens and the price of its model in effect at its completed_at (check
-- "step_cost", with step_id; "expected" is absent when no price was in effect). A step
-- without a cost is unpriced: monitor reports those (health()'s "steps").
-- Since version 20261210000000, for every budget window (of the account, or of all): its used
-- equals what the billed steps of the reports whose reservations hold that window were billed,
-- their total_tokens for a tokens budget, their cost_micros for a cost budget, late steps
-- included (check "budget_used", with budget_id and window_start); every budget's limit is the
-- limit of its newest budget_changes row (check "budget_limit", with budget_id); and every
-- window a reservation holds has its budget_windows row (check "budget_hold_window": expected
-- 1, actual 0, with budget_id and window_start).
-- Since version 20261211000000 the corrections count too, each from its append-only record:
--   tokens_used     = its ledger rows' tokens + its adjustments' deltas (usage_adjustments with
--                     that period_id) - what refunds took out of it (report_refunds.periods)
--   budget_used     = what the held reports' billed steps were billed there + the window's
--                     adjustments - what refunds took out of it (report_refunds.windows)
-- and a budget's effective limit is explained by its records: limit_amount is its newest
-- budget_changes row's limit (check "budget_limit"), and the grants (credit_grants) add to it
-- where they overlap a window while unexpired (budget_limit()). Every refund's tokens are the
-- sum of its periods' (check "refund_record", with refund_id).
-- The ledger and the correction records are append-only (UPDATE, DELETE and TRUNCATE are
-- refused), so any change of tokens_used or used made outside the functions shows up here.
-- Returns {"ok", "periods_checked", "costs_checked", "budget_windows_checked",
--   "budgets_checked", "corrections_checked" (adjustments, grants and refunds of the account,
--   or of all; since version 20261211000000), "discrepancies": [{"period_id",
--   "account_id", "check", "expected", "actual", ...}]}; an unknown account is refused with account_not_found.
-- Locks nothing: one statement, one snapshot, so concurrent billing never shows as a
-- discrepancy (each billing writes its ledger row and tokens_used in one transaction).
-- Errors: none beyond the refusal.
CREATE OR REPLACE FUNCTION tokentrack.reconcile(p_account_id uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_result jsonb;
BEGIN
    IF p_account_id IS NOT NULL
        AND NOT EXISTS (SELECT FROM tokentrack.accounts AS a WHERE a.id = p_account_id) THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'account_not_found',
            'message', pg_catalog.format('account %s does not exist', p_account_id)
        );
    END IF;

    WITH periods AS (
        SELECT p.id, p.account_id, p.tokens_used, p.reports_count
        FROM tokentrack.usage_periods AS p
        WHERE p_account_id IS NULL OR p.account_id = p_account_id
    ),

    ledger AS (
        SELECT
            l.period_id,
            pg_catalog.sum(l.tokens) AS tokens,
            pg_catalog.sum(l.reports) AS reports
        FROM tokentrack.usage_ledger AS l
        WHERE l.period_id IN (SELECT periods.id FROM periods)
        GROUP BY l.period_id
    ),

    -- Adjustments and refunds of each period (signed: a refund takes tokens out).
    period_corrections AS (
        SELECT c.period_id, pg_catalog.sum(c.tokens) AS tokens
        FROM (
            SELECT ua.period_id, ua.delta AS tokens
            FROM tokentrack.usage_adjustments AS ua
            WHERE ua.period_id IN (SELECT periods.id FROM periods)
            UNION ALL
            SELECT (e.value ->> 'period_id')::uuid, -(e.value ->> 'tokens')::bigint
            FROM tokentrack.report_refunds AS rf
            CROSS JOIN LATERAL pg_catalog.jsonb_array_elements(rf.periods) AS e (value)
            WHERE p_account_id IS NULL OR rf.account_id = p_account_id
        ) AS c
        GROUP BY c.period_id
    ),

    -- Adjustments and refunds of each budget window (signed).
    window_corrections AS (
        SELECT c.account_id, c.budget_id, c.window_start, pg_catalog.sum(c.amount) AS amount
        FROM (
            SELECT ua.account_id, ua.budget_id, ua.window_start, ua.delta AS amount
            FROM tokentrack.usage_adjustments AS ua
            WHERE ua.budget_id IS NOT NULL AND (p_account_id IS NULL OR ua.account_id = p_account_id)
            UNION ALL
            SELECT
                rf.account_id, (e.value ->> 'budget_id')::uuid, (e.value ->> 'window_start')::timestamptz,
                -(e.value ->> 'amount')::bigint
            FROM tokentrack.report_refunds AS rf
            CROSS JOIN LATERAL pg_catalog.jsonb_array_elements(rf.windows) AS e (value)
            WHERE p_account_id IS NULL OR rf.account_id = p_account_id
        ) AS c
        GROUP BY c.account_id, c.budget_id, c.window_start
    ),

    refund_records AS (
        SELECT
            rf.account_id,
            rf.id AS refund_id,
            rf.tokens AS actual,
            COALESCE((
                SELECT pg_catalog.sum((e.value ->> 'tokens')::bigint)
                FROM pg_catalog.jsonb_array_elements(rf.periods) AS e (value)
            ), 0) AS expected
        FROM tokentrack.report_refunds AS rf
        WHERE p_account_id IS NULL OR rf.account_id = p_account_id
    ),

    entries AS (
        SELECT
            l.id AS entry_id,
            l.period_id,
            l.tokens AS expected,
            COALESCE((
                SELECT pg_catalog.sum(s.total_tokens) FROM tokentrack.report_step_usage AS s
                WHERE s.billing_entry_id = l.id
            ), 0) AS actual
        FROM tokentrack.usage_ledger AS l
        WHERE
            l.period_id IN (SELECT periods.id FROM periods)
            AND l.kind IN ('report_billed', 'report_expired', 'late_step')
    ),

    stray_steps AS (
        SELECT
            s.billed_period_id AS period_id,
            pg_catalog.count(*) AS steps,
            pg_catalog.sum(s.total_tokens) AS tokens
        FROM tokentrack.report_step_usage AS s
        LEFT JOIN tokentrack.usage_ledger AS l ON l.id = s.billing_entry_id
        WHERE
            s.billed_period_id IN (SELECT periods.id FROM periods)
            AND (
                l.id IS NULL
                OR l.period_id <> s.billed_period_id
                OR l.kind NOT IN ('report_billed', 'report_expired', 'late_step')
            )
        GROUP BY s.billed_period_id
    ),

    costs AS (
        SELECT
            s.id AS step_id,
            s.account_id,
            s.billed_period_id AS period_id,
            s.cost_micros AS actual,
            tokentrack.step_cost_micros(
                tokentrack.model_price_at(s.model, s.completed_at),
                s.input_tokens, s.cached_input_tokens, s.cache_write_tokens,
                s.output_tokens, s.reasoning_tokens
            ) AS expected
        FROM tokentrack.report_step_usage AS s
        WHERE
            s.cost_micros IS NOT NULL
            AND (p_account_id IS NULL OR s.account_id = p_account_id)
    ),

    -- What the billed steps of the reservations holding each window were billed, summed once.
    held_use AS (
        SELECT
            rr.account_id,
            h.budget_id,
            h.window_start,
            pg_catalog.sum(s.total_tokens::bigint) AS tokens,
            pg_catalog.sum(COALESCE(s.cost_micros, 0)) AS cost
        FROM tokentrack.report_reservations AS rr
        CROSS JOIN LATERAL pg_catalog.jsonb_to_recordset(rr.holds) AS h (budget_id uuid, window_start timestamptz)
        INNER JOIN tokentrack.report_step_usage AS s ON s.report_id = rr.report_id AND s.billed_at IS NOT NULL
        -- The account's reservations by their periods (report_reservations_period_idx).
        WHERE rr.holds IS NOT NULL AND rr.period_id IN (SELECT periods.id FROM periods)
        GROUP BY rr.account_id, h.budget_id, h.window_start
    ),

    budget_use AS (
        SELECT
            w.account_id,
            w.budget_id,
            w.window_start,
            w.used AS actual,
            COALESCE(CASE WHEN b.unit = 'tokens' THEN hu.tokens ELSE hu.cost END, 0)
            + COALESCE(wc.amount, 0) AS expected
        FROM tokentrack.budget_windows AS w
        INNER JOIN tokentrack.budgets AS b ON b.account_id = w.account_id AND b.id = w.budget_id
        LEFT JOIN held_use AS hu
            ON hu.account_id = w.account_id AND hu.budget_id = w.budget_id AND hu.window_start = w.window_start
        LEFT JOIN window_corrections AS wc
            ON wc.account_id = w.account_id AND wc.budget_id = w.budget_id AND wc.window_start = w.window_start
        WHERE p_account_id IS NULL OR w.account_id = p_account_id
    ),

    budget_limits AS (
        SELECT
            b.account_id,
            b.id AS budget_id,
            b.limit_amount AS actual,
            (
                SELECT c.limit_amount FROM tokentrack.budget_changes AS c
                WHERE c.account_id = b.account_id AND c.budget_id = b.id
                ORDER BY c.id DESC
                LIMIT 1
            ) AS expected
        FROM tokentrack.budgets AS b
        WHERE p_account_id IS NULL OR b.account_id = p_account_id
    ),

    -- Holds whose window has no row (billing would have nowhere to count them).
    lost_holds AS (
        SELECT
            rr.account_id,
            h.budget_id,
            h.window_start,
            pg_catalog.count(*) AS reservations
        FROM tokentrack.report_reservations AS rr
        CROSS JOIN LATERAL pg_catalog.jsonb_to_recordset(rr.holds) AS h (budget_id uuid, window_start timestamptz)
        WHERE
            rr.holds IS NOT NULL AND rr.period_id IN (SELECT periods.id FROM periods)
            AND NOT EXISTS (
                SELECT FROM tokentrack.budget_windows AS w
                WHERE w.account_id = rr.account_id AND w.budget_id = h.budget_id AND w.window_start = h.window_start
            )
        GROUP BY rr.account_id, h.budget_id, h.window_start
    ),

    found AS (
        SELECT
            p.id AS period_id, p.account_id, 'tokens_used' AS check_name,
            COALESCE(l.tokens, 0) + COALESCE(pc.tokens, 0) AS expected, p.tokens_used AS actual,
            NULL::bigint AS entry_id, NULL::uuid AS step_id, NULL::uuid AS budget_id,
            NULL::timestamptz AS window_start, NULL::uuid AS refund_id
        FROM periods AS p
        LEFT JOIN ledger AS l ON l.period_id = p.id
        LEFT JOIN period_corrections AS pc ON pc.period_id = p.id
        WHERE p.tokens_used <> COALESCE(l.tokens, 0) + COALESCE(pc.tokens, 0)
        UNION ALL
        SELECT
            p.id, p.account_id, 'reports_count', COALESCE(l.reports, 0), p.reports_count, NULL, NULL,
            NULL, NULL, NULL
        FROM periods AS p LEFT JOIN ledger AS l ON l.period_id = p.id
        WHERE p.reports_count <> COALESCE(l.reports, 0)
        UNION ALL
        SELECT e.period_id, p.account_id, 'ledger_entry', e.expected, e.actual, e.entry_id, NULL, NULL, NULL, NULL
        FROM entries AS e INNER JOIN periods AS p ON p.id = e.period_id
        WHERE e.expected <> e.actual
        UNION ALL
        SELECT st.period_id, p.account_id, 'billed_steps', 0, st.tokens, NULL, NULL, NULL, NULL, NULL
        FROM stray_steps AS st INNER JOIN periods AS p ON p.id = st.period_id
        UNION ALL
        SELECT c.period_id, c.account_id, 'step_cost', c.expected, c.actual, NULL, c.step_id, NULL, NULL, NULL
        FROM costs AS c
        WHERE c.expected IS DISTINCT FROM c.actual
        UNION ALL
        SELECT NULL, u.account_id, 'budget_used', u.expected, u.actual, NULL, NULL, u.budget_id, u.window_start, NULL
        FROM budget_use AS u
        WHERE u.expected <> u.actual
        UNION ALL
        SELECT NULL, bl.account_id, 'budget_limit', bl.expected, bl.actual, NULL, NULL, bl.budget_id, NULL, NULL
        FROM budget_limits AS bl
        WHERE bl.expected IS DISTINCT FROM bl.actual
        UNION ALL
        SELECT NULL, lh.account_id, 'budget_hold_window', 1, 0, NULL, NULL, lh.budget_id, lh.window_start, NULL
        FROM lost_holds AS lh
        UNION ALL
        SELECT NULL, rr.account_id, 'refund_record', rr.expected, rr.actual, NULL, NULL, NULL, NULL, rr.refund_id
        FROM refund_records AS rr
        WHERE rr.expected <> rr.actual
    )

    SELECT pg_catalog.jsonb_build_object(
        'success', true,
        'ok', NOT EXISTS (SELECT FROM found),
        'periods_checked', (SELECT pg_catalog.count(*) FROM periods),
        'costs_checked', (SELECT pg_catalog.count(*) FROM costs),
        'budget_windows_checked', (SELECT pg_catalog.count(*) FROM budget_use),
        'budgets_checked', (SELECT pg_catalog.count(*) FROM budget_limits),
        'corrections_checked', (
            SELECT pg_catalog.count(*) FROM tokentrack.usage_adjustments AS ua
            WHERE p_account_id IS NULL OR ua.account_id = p_account_id
        ) + (
            SELECT pg_catalog.count(*) FROM tokentrack.credit_grants AS g
            WHERE p_account_id IS NULL OR g.account_id = p_account_id
        ) + (SELECT pg_catalog.count(*) FROM refund_records),
        'discrepancies', COALESCE((
            SELECT pg_catalog.jsonb_agg(
                pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
                    'period_id', f.period_id,
                    'account_id', f.account_id,
                    'check', f.check_name,
                    'expected', f.expected,
                    'actual', f.actual,
                    'ledger_entry_id', f.entry_id,
                    'step_id', f.step_id,
                    'budget_id', f.budget_id,
                    'window_start', f.window_start,
                    'refund_id', f.refund_id
                ))
                ORDER BY
                    f.account_id, f.period_id, f.check_name, f.step_id, f.budget_id, f.window_start,
                    f.refund_id
            )
            FROM found AS f
        ), '[]'::jsonb)
    ) INTO v_result;

    RETURN v_result;
END
$function$;

COMMENT ON FUNCTION tokentrack.reconcile(uuid) IS
'Read-only audit: checks every period''s tokens_used and reports_count against the append-only '
'usage ledger and its adjustments and refunds, the ledger''s billing rows against the steps they '
'billed, every stored step cost against its tokens and the price in effect at its completed_at, '
'and every budget''s limit and windows'' used against their records.';

REVOKE ALL ON FUNCTION tokentrack.reconcile(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.reconcile(uuid) TO tokentrack_service;
