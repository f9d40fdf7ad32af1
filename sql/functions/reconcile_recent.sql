-- version: 20261214000000
--
-- tokentrack.reconcile_recent(p_account_id uuid DEFAULT NULL) -> jsonb
--
-- The incremental reconcile: what changed since the verified point, checked as reconcile()
-- checks it, so that its cost follows the changes, not the history. The point
-- (reconcile_point.through_entry, advanced by advance_reconcile_point()) sums, per period, the
-- usage_ledger rows with id <= through_entry (reconcile_periods) and, per budget window, what
-- the steps those billing entries billed add to its used (reconcile_windows). The ledger is
-- append-only, so those sums stay true; only the rows after the point are read.
-- For the account (or all accounts) it checks, in one statement (one snapshot):
--   tokens_used and reports_count of every active period and of every period with ledger rows
--     after the point: tokens_used = the point's sum + the ledger rows after it + the period's
--     adjustments - what refunds took out of it; reports_count = the point's + the rows after
--     (checks "tokens_used", "reports_count");
--   every billing entry after the point against the steps it billed, reached through its
--     report (check "ledger_entry"), the billed steps of those reports (check "billed_steps"),
--     the cost of the steps those entries billed (check "step_cost");
--   every budget window held by the reservations of those entries' reports: used = the point's
--     amount + what those entries billed there + the window's adjustments - its refunds (check
--     "budget_used"), that it has its budget_windows row (check "budget_hold_window"), and the
--     limit of its budget (check "budget_limit").
-- A discrepancy is reported exactly as reconcile() reports it (same keys, same order).
-- Before the point ever moved (through_entry 0, e.g. right after the install) everything is
-- after it: the answer is reconcile()'s, with the keys below added (the full audit reads the
-- history by sets, where this check would read it report by report).
-- What only the full audit, reconcile(), catches: a change made outside the functions to a row
-- that nothing has touched since the point (a hand edit of a completed period's tokens_used,
-- of a window no billing has reached since, of a billed step's cost or of a ledger row before
-- the point), unbilled steps' costs, refunds' own sums (check "refund_record"), corrections
-- of a period or window that no ledger row after the point reaches (adjust_usage on a period
-- always targets the active one, which is always checked), and budgets no billing reached.
-- The corrections of each checked period and window are read whole (by their (account_id, ...)
-- indexes): corrections are operators' records, few, and are not what grows with traffic.
-- Returns reconcile()'s keys {"success", "ok", "periods_checked", "costs_checked",
--   "budget_windows_checked", "budgets_checked", "corrections_checked", "discrepancies"} and
--   "through_entry" (the point checked against), "entries_checked" (ledger rows after it),
--   "advanced_at" (when the point last moved; null: never, so everything is after it);
--   an unknown account is refused with account_not_found.
-- Reads: reconcile_point; usage_ledger by its primary key (id > through_entry); the periods by
--   primary key and usage_periods_one_active_per_account; reconcile_periods and
--   reconcile_windows by primary key; steps by report_step_usage_one_per_step (report_id),
--   reservations by report_reservations_one_per_report; corrections by their account indexes.
-- Locks nothing, writes nothing (STABLE): it never waits for billing, nor billing for it, and a
--   read-only transaction (tokentrack monitor's) may call it. Sees every account (SECURITY
--   DEFINER): EXECUTE for tokentrack_service only.
-- Errors: none beyond the refusal.
-- Plans: SET plan_cache_mode = force_custom_plan. Its statement reads the ledger after the
--   point (id > through_entry); a generic plan, which PL/pgSQL switches to after five calls of
--   a session, cannot know how few rows that is and, on PostgreSQL 17 and 18, estimated a third
--   of the ledger and read 330 buffers where the custom plan reads 53 (the cost would then
--   follow the history: tests/sql/test_reconcile_recent.py). Planning each call costs well under
--   a millisecond, once per monitor or exporter run.
CREATE OR REPLACE FUNCTION tokentrack.reconcile_recent(p_account_id uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_custom_plan
AS $function$
DECLARE
    v_through bigint;
    v_advanced_at timestamptz;
    v_result jsonb;
BEGIN
    IF p_account_id IS NOT NULL
        AND NOT EXISTS (SELECT FROM tokentrack.accounts AS a WHERE a.id = p_account_id) THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'account_not_found',
            'message', pg_catalog.format('account %s does not exist', p_account_id)
        );
    END IF;

    -- No row yet (the point never advanced): everything is after it. A variable, so that the
    -- plan of the statement below knows how few ledger rows follow the point. Both statements
    -- read the caller's snapshot (a STABLE PL/pgSQL function takes no snapshot of its own), so
    -- a point advanced meanwhile is seen by neither or by both.
    SELECT COALESCE(pg_catalog.max(rp.through_entry), 0), pg_catalog.max(rp.advanced_at)
    INTO v_through, v_advanced_at
    FROM tokentrack.reconcile_point AS rp;

    -- Before the point ever moved everything is after it: the full audit is that check, and
    -- reads the history by sets rather than report by report.
    IF v_through = 0 THEN
        RETURN tokentrack.reconcile(p_account_id) || pg_catalog.jsonb_build_object(
            'entries_checked', (
                SELECT pg_catalog.count(*) FROM tokentrack.usage_ledger AS l
                WHERE p_account_id IS NULL OR l.account_id = p_account_id
            ),
            'through_entry', 0,
            'advanced_at', NULL
        );
    END IF;

    -- The steps and reservations of the entries after the point are reached by report, in
    -- LATERAL subqueries kept apart by OFFSET 0: one index probe per report, whatever the
    -- planner estimates of the rows after the point.
    -- The ledger rows after the point (usage_ledger_pkey).
    WITH recent AS (
        SELECT l.id, l.account_id, l.period_id, l.kind, l.tokens, l.reports, l.report_id
        FROM tokentrack.usage_ledger AS l
        WHERE l.id > v_through AND (p_account_id IS NULL OR l.account_id = p_account_id)
    ),

    billed_reports AS (
        SELECT DISTINCT recent.report_id
        FROM recent
        WHERE recent.kind IN ('report_billed', 'report_expired', 'late_step') AND recent.report_id IS NOT NULL
    ),

    billing AS (
        SELECT recent.id, recent.period_id, recent.tokens, recent.report_id
        FROM recent
        WHERE recent.kind IN ('report_billed', 'report_expired', 'late_step')
    ),

    -- The active periods (usage_periods_one_active_per_account) and those the rows after the
    -- point reach (usage_periods_pkey).
    periods AS (
        SELECT p.id, p.account_id, p.tokens_used, p.reports_count
        FROM tokentrack.usage_periods AS p
        WHERE p.status = 'active' AND (p_account_id IS NULL OR p.account_id = p_account_id)
        UNION
        SELECT p.id, p.account_id, p.tokens_used, p.reports_count
        FROM tokentrack.usage_periods AS p
        WHERE p.id IN (SELECT recent.period_id FROM recent)
    ),

    deltas AS (
        SELECT
            recent.period_id,
            pg_catalog.sum(recent.tokens) AS tokens,
            pg_catalog.sum(recent.reports) AS reports
        FROM recent
        GROUP BY recent.period_id
    ),

    -- Adjustments and refunds of the checked periods (signed), read whole.
    period_corrections AS (
        SELECT c.period_id, pg_catalog.sum(c.tokens) AS tokens, pg_catalog.count(*) AS records
        FROM (
            SELECT ua.period_id, ua.delta AS tokens
            FROM periods AS p
            INNER JOIN tokentrack.usage_adjustments AS ua ON ua.account_id = p.account_id AND ua.period_id = p.id
            UNION ALL
            SELECT (e.value ->> 'period_id')::uuid, -(e.value ->> 'tokens')::bigint
            FROM tokentrack.report_refunds AS rf
            CROSS JOIN LATERAL pg_catalog.jsonb_array_elements(rf.periods) AS e (value)
            WHERE
                rf.account_id IN (SELECT periods.account_id FROM periods)
                AND (e.value ->> 'period_id')::uuid IN (SELECT periods.id FROM periods)
        ) AS c
        GROUP BY c.period_id
    ),

    -- Each billing entry after the point against the steps it billed, through its report.
    entries AS (
        SELECT
            b.id AS entry_id,
            b.period_id,
            b.tokens AS expected,
            COALESCE((
                SELECT pg_catalog.sum(s.total_tokens) FROM tokentrack.report_step_usage AS s
                WHERE s.report_id = b.report_id AND s.billing_entry_id = b.id
            ), 0) AS actual
        FROM billing AS b
    ),

    -- The billed steps of the reports those entries billed.
    stray_steps AS (
        SELECT
            s.billed_period_id AS period_id,
            pg_catalog.sum(s.total_tokens) AS tokens
        FROM billed_reports AS br
        CROSS JOIN LATERAL (
            SELECT rs.billed_period_id, rs.billing_entry_id, rs.report_id, rs.total_tokens
            FROM tokentrack.report_step_usage AS rs
            WHERE rs.report_id = br.report_id AND rs.billed_period_id IS NOT NULL
            OFFSET 0
        ) AS s
        LEFT JOIN tokentrack.usage_ledger AS l ON l.id = s.billing_entry_id
        WHERE
            (
                l.id IS NULL
                OR l.period_id <> s.billed_period_id
                OR l.report_id IS DISTINCT FROM s.report_id
                OR l.kind NOT IN ('report_billed', 'report_expired', 'late_step')
            )
        GROUP BY s.billed_period_id
    ),

    -- The steps those entries billed.
    billed AS (
        SELECT
            b.id AS entry_id,
            b.report_id,
            s.id AS step_id,
            s.account_id,
            s.billed_period_id,
            s.total_tokens,
            s.cost_micros,
            s.model,
            s.completed_at,
            s.input_tokens,
            s.cached_input_tokens,
            s.cache_write_tokens,
            s.output_tokens,
            s.reasoning_tokens
        FROM billing AS b
        CROSS JOIN LATERAL (
            SELECT rs.* FROM tokentrack.report_step_usage AS rs
            WHERE rs.report_id = b.report_id AND rs.billing_entry_id = b.id
            OFFSET 0
        ) AS s
    ),

    costs AS (
        SELECT
            bd.step_id,
            bd.account_id,
            bd.billed_period_id AS period_id,
            bd.cost_micros AS actual,
            tokentrack.step_cost_micros(
                tokentrack.model_price_at(bd.model, bd.completed_at),
                bd.input_tokens, bd.cached_input_tokens, bd.cache_write_tokens,
                bd.output_tokens, bd.reasoning_tokens
            ) AS expected
        FROM billed AS bd
        WHERE bd.cost_micros IS NOT NULL
    ),

    -- The windows held by the reservations of the reports those entries billed.
    holds AS (
        SELECT DISTINCT rr.account_id, h.budget_id, h.window_start, rr.report_id
        FROM billed_reports AS br
        CROSS JOIN LATERAL (
            SELECT r.account_id, r.report_id, r.holds FROM tokentrack.report_reservations AS r
            WHERE r.report_id = br.report_id AND r.holds IS NOT NULL
            OFFSET 0
        ) AS rr
        CROSS JOIN LATERAL pg_catalog.jsonb_to_recordset(rr.holds) AS h (budget_id uuid, window_start timestamptz)
    ),

    held_use AS (
        SELECT
            h.account_id,
            h.budget_id,
            h.window_start,
            pg_catalog.sum(bd.total_tokens::bigint) AS tokens,
            pg_catalog.sum(COALESCE(bd.cost_micros, 0)) AS cost
        FROM holds AS h
        INNER JOIN billed AS bd ON bd.report_id = h.report_id
        GROUP BY h.account_id, h.budget_id, h.window_start
    ),

    windows AS (
        SELECT DISTINCT h.account_id, h.budget_id, h.window_start FROM holds AS h
    ),

    -- Adjustments and refunds of the checked windows (signed), read whole.
    window_corrections AS (
        SELECT c.account_id, c.budget_id, c.window_start, pg_catalog.sum(c.amount) AS amount,
            pg_catalog.count(*) AS records
        FROM (
            SELECT ua.account_id, ua.budget_id, ua.window_start, ua.delta AS amount
            FROM windows AS w
            INNER JOIN tokentrack.usage_adjustments AS ua
                ON ua.account_id = w.account_id AND ua.budget_id = w.budget_id AND ua.window_start = w.window_start
            UNION ALL
            SELECT
                rf.account_id, (e.value ->> 'budget_id')::uuid, (e.value ->> 'window_start')::timestamptz,
                -(e.value ->> 'amount')::bigint
            FROM tokentrack.report_refunds AS rf
            CROSS JOIN LATERAL pg_catalog.jsonb_array_elements(rf.windows) AS e (value)
            WHERE rf.account_id IN (SELECT windows.account_id FROM windows)
        ) AS c
        GROUP BY c.account_id, c.budget_id, c.window_start
    ),

    budget_use AS (
        SELECT
            bw.account_id,
            bw.budget_id,
            bw.window_start,
            bw.used AS actual,
            COALESCE(pw.amount, 0)
            + COALESCE(CASE WHEN b.unit = 'tokens' THEN hu.tokens ELSE hu.cost END, 0)
            + COALESCE(wc.amount, 0) AS expected
        FROM windows AS w
        INNER JOIN tokentrack.budget_windows AS bw
            ON bw.account_id = w.account_id AND bw.budget_id = w.budget_id AND bw.window_start = w.window_start
        INNER JOIN tokentrack.budgets AS b ON b.account_id = bw.account_id AND b.id = bw.budget_id
        LEFT JOIN tokentrack.reconcile_windows AS pw
            ON pw.account_id = w.account_id AND pw.budget_id = w.budget_id AND pw.window_start = w.window_start
        LEFT JOIN held_use AS hu
            ON hu.account_id = w.account_id AND hu.budget_id = w.budget_id AND hu.window_start = w.window_start
        LEFT JOIN window_corrections AS wc
            ON wc.account_id = w.account_id AND wc.budget_id = w.budget_id AND wc.window_start = w.window_start
    ),

    lost_holds AS (
        SELECT w.account_id, w.budget_id, w.window_start
        FROM windows AS w
        WHERE NOT EXISTS (
            SELECT FROM tokentrack.budget_windows AS bw
            WHERE bw.account_id = w.account_id AND bw.budget_id = w.budget_id AND bw.window_start = w.window_start
        )
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
        WHERE (b.account_id, b.id) IN (SELECT windows.account_id, windows.budget_id FROM windows)
    ),

    found AS (
        SELECT
            p.id AS period_id, p.account_id, 'tokens_used' AS check_name,
            COALESCE(pp.tokens, 0) + COALESCE(d.tokens, 0) + COALESCE(pc.tokens, 0) AS expected,
            p.tokens_used AS actual,
            NULL::bigint AS entry_id, NULL::uuid AS step_id, NULL::uuid AS budget_id,
            NULL::timestamptz AS window_start, NULL::uuid AS refund_id
        FROM periods AS p
        LEFT JOIN tokentrack.reconcile_periods AS pp ON pp.account_id = p.account_id AND pp.period_id = p.id
        LEFT JOIN deltas AS d ON d.period_id = p.id
        LEFT JOIN period_corrections AS pc ON pc.period_id = p.id
        WHERE p.tokens_used <> COALESCE(pp.tokens, 0) + COALESCE(d.tokens, 0) + COALESCE(pc.tokens, 0)
        UNION ALL
        SELECT
            p.id, p.account_id, 'reports_count', COALESCE(pp.reports, 0) + COALESCE(d.reports, 0),
            p.reports_count, NULL, NULL, NULL, NULL, NULL
        FROM periods AS p
        LEFT JOIN tokentrack.reconcile_periods AS pp ON pp.account_id = p.account_id AND pp.period_id = p.id
        LEFT JOIN deltas AS d ON d.period_id = p.id
        WHERE p.reports_count <> COALESCE(pp.reports, 0) + COALESCE(d.reports, 0)
        UNION ALL
        SELECT e.period_id, p.account_id, 'ledger_entry', e.expected, e.actual, e.entry_id, NULL, NULL, NULL, NULL
        FROM entries AS e INNER JOIN tokentrack.usage_periods AS p ON p.id = e.period_id
        WHERE e.expected <> e.actual
        UNION ALL
        SELECT st.period_id, p.account_id, 'billed_steps', 0, st.tokens, NULL, NULL, NULL, NULL, NULL
        FROM stray_steps AS st INNER JOIN tokentrack.usage_periods AS p ON p.id = st.period_id
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
    )

    SELECT pg_catalog.jsonb_build_object(
        'success', true,
        'ok', NOT EXISTS (SELECT FROM found),
        'periods_checked', (SELECT pg_catalog.count(*) FROM periods),
        'costs_checked', (SELECT pg_catalog.count(*) FROM costs),
        'budget_windows_checked', (SELECT pg_catalog.count(*) FROM budget_use),
        'budgets_checked', (SELECT pg_catalog.count(*) FROM budget_limits),
        'corrections_checked', COALESCE((SELECT pg_catalog.sum(pc.records) FROM period_corrections AS pc), 0)
        + COALESCE((SELECT pg_catalog.sum(wc.records) FROM window_corrections AS wc), 0),
        'entries_checked', (SELECT pg_catalog.count(*) FROM recent),
        'through_entry', v_through,
        'advanced_at', v_advanced_at,
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

COMMENT ON FUNCTION tokentrack.reconcile_recent(uuid) IS
'Incremental reconcile (read-only): checks what changed since the verified point '
'(reconcile_point, advanced by advance_reconcile_point()) as reconcile() checks it; '
'reconcile() stays the full audit.';

REVOKE ALL ON FUNCTION tokentrack.reconcile_recent(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.reconcile_recent(uuid) TO tokentrack_service;
