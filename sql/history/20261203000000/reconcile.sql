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
-- The ledger is append-only (UPDATE, DELETE and TRUNCATE are refused), so any change of
-- tokens_used made outside the functions shows up here.
-- Returns {"ok", "periods_checked", "costs_checked", "discrepancies": [{"period_id",
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

    found AS (
        SELECT
            p.id AS period_id, p.account_id, 'tokens_used' AS check_name,
            COALESCE(l.tokens, 0) AS expected, p.tokens_used AS actual, NULL::bigint AS entry_id,
            NULL::uuid AS step_id
        FROM periods AS p LEFT JOIN ledger AS l ON l.period_id = p.id
        WHERE p.tokens_used <> COALESCE(l.tokens, 0)
        UNION ALL
        SELECT
            p.id, p.account_id, 'reports_count', COALESCE(l.reports, 0), p.reports_count, NULL, NULL
        FROM periods AS p LEFT JOIN ledger AS l ON l.period_id = p.id
        WHERE p.reports_count <> COALESCE(l.reports, 0)
        UNION ALL
        SELECT e.period_id, p.account_id, 'ledger_entry', e.expected, e.actual, e.entry_id, NULL
        FROM entries AS e INNER JOIN periods AS p ON p.id = e.period_id
        WHERE e.expected <> e.actual
        UNION ALL
        SELECT st.period_id, p.account_id, 'billed_steps', 0, st.tokens, NULL, NULL
        FROM stray_steps AS st INNER JOIN periods AS p ON p.id = st.period_id
        UNION ALL
        SELECT c.period_id, c.account_id, 'step_cost', c.expected, c.actual, NULL, c.step_id
        FROM costs AS c
        WHERE c.expected IS DISTINCT FROM c.actual
    )

    SELECT pg_catalog.jsonb_build_object(
        'success', true,
        'ok', NOT EXISTS (SELECT FROM found),
        'periods_checked', (SELECT pg_catalog.count(*) FROM periods),
        'costs_checked', (SELECT pg_catalog.count(*) FROM costs),
        'discrepancies', COALESCE((
            SELECT pg_catalog.jsonb_agg(
                pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
                    'period_id', f.period_id,
                    'account_id', f.account_id,
                    'check', f.check_name,
                    'expected', f.expected,
                    'actual', f.actual,
                    'ledger_entry_id', f.entry_id,
                    'step_id', f.step_id
                ))
                ORDER BY f.account_id, f.period_id, f.check_name, f.step_id
            )
            FROM found AS f
        ), '[]'::jsonb)
    ) INTO v_result;

    RETURN v_result;
END
$function$;

COMMENT ON FUNCTION tokentrack.reconcile(uuid) IS
'Read-only audit: checks every period''s tokens_used and reports_count against the append-only '
'usage ledger, the ledger''s billing rows against the steps they billed, and every stored step '
'cost against its tokens and the price in effect at its completed_at.';

REVOKE ALL ON FUNCTION tokentrack.reconcile(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.reconcile(uuid) TO tokentrack_service;
