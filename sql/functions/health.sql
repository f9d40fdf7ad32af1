-- version: 20261201000000
--
-- tokentrack.health(p_hours integer DEFAULT 24) -> jsonb
--
-- The figures of `tokentrack monitor` in one read-only call, so that the CLI, a Prometheus
-- exporter and a dashboard read the same numbers (pgmq's metrics() is the model). The window
-- is the last p_hours hours (by reports.created_at). Returns:
--   taken_at, window_hours   now() and p_hours
--   active_reservations      every active reservation: count, older_than_2h and older_than_3h
--                            (by created_at; 2 hours is a reservation's lifetime), past_expiry
--                            (expires_at <= now(): the sweep has not run since), oldest and
--                            newest created_at, oldest_age_seconds (0 when none)
--   reservations_by_status   {"active", "completed", "expired"} -> {count, oldest, newest}:
--                            every active reservation; the others of the window's reports
--   reports_without_steps    {count, examples}: completed reports of the window that have a
--                            reservation but no recorded step (usage being lost); examples are
--                            the 5 newest ids
--   reports_by_hour          [{hour, pending, processing, complete, failed, cancelled}], one per
--                            hour that has reports (date_trunc in the session's TimeZone),
--                            oldest first
--   reports_window           {pending, processing, complete, failed, cancelled}: the window's
--                            reports by status
--   failure_rate, completion_rate   failed and complete / the window's reports with an outcome
--                            (complete, failed, cancelled); null when there is none
--   steps                    the steps of the window's reports: count, tokens (total_tokens),
--                            cost_micros (of the priced ones), and unpriced: {count, tokens,
--                            models: [{model, steps, tokens}]} for the steps without a cost,
--                            the 10 models with the most unpriced tokens first (model null:
--                            steps recorded without a model) (since version 20261203000000)
--   model_prices             how many prices model_prices holds (0: costs are not in use, so
--                            unpriced steps are expected)
--   budgets                  every budget in its current window (since version 20261210000000):
--                            count, exhausted (used + held >= limit: it refuses every new
--                            reservation that needs it), over_limit (used > limit: billed past
--                            it, which billing may do), and nearest: the 10 nearest their
--                            limits, [{account_id, budget_id, subject, unit, window,
--                            window_start, used, held, limit}], by (used + held) / limit;
--                            limit is the effective limit (budget_limit: limit_amount plus the
--                            unexpired credit grants overlapping the window; since version
--                            20261211000000)
-- Figures, not verdicts: alert thresholds are the reader's (tokentrack monitor compares them).
-- reconcile() is not part of it: it audits every period, so its cost grows with the history,
-- while every figure here is read by index and costs what the window's traffic and the active
-- reservations cost; an exporter can scrape health() often and reconcile() rarely. monitor
-- calls both in one snapshot.
-- Reads, by index: report_reservations (the partial active index; report_reservations_one_per_report
--   for each report of the window), reports (reports_created_at_idx), report_step_usage
--   (report_step_usage_one_per_step, for each report of the window), model_prices (its
--   size). It sees every account (SECURITY DEFINER): EXECUTE is for
--   tokentrack_service only; docs/SECURITY.md shows how to grant it to a monitoring role.
-- Locks nothing, writes nothing (STABLE: every statement reads the caller's snapshot, so the
--   figures agree with each other).
-- Errors: 22004 a NULL p_hours; 22023 a p_hours below 1.
CREATE OR REPLACE FUNCTION tokentrack.health(p_hours integer DEFAULT 24)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_since timestamptz;
    v_result jsonb;
BEGIN
    IF p_hours IS NULL THEN
        RAISE EXCEPTION 'p_hours must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_hours';
    END IF;
    IF p_hours < 1 THEN
        RAISE EXCEPTION 'p_hours must be at least 1 (got %)', p_hours
            USING ERRCODE = '22023', COLUMN = 'p_hours';
    END IF;
    v_since := pg_catalog.now() - pg_catalog.make_interval(hours => p_hours);

    WITH active AS (
        SELECT
            pg_catalog.count(*) AS n,
            pg_catalog.count(*) FILTER (
                WHERE rr.created_at < pg_catalog.now() - INTERVAL '2 hours'
            ) AS older_than_2h,
            pg_catalog.count(*) FILTER (
                WHERE rr.created_at < pg_catalog.now() - INTERVAL '3 hours'
            ) AS older_than_3h,
            pg_catalog.count(*) FILTER (WHERE rr.expires_at <= pg_catalog.now()) AS past_expiry,
            pg_catalog.min(rr.created_at) AS oldest,
            pg_catalog.max(rr.created_at) AS newest
        FROM tokentrack.report_reservations AS rr
        WHERE rr.status = 'active'
    ),

    -- The LATERAL ... LIMIT 1 (one reservation per report anyway) keeps the lookup of each
    -- window report's reservation on the unique (report_id) index, whatever the table sizes.
    window_reservations AS (
        SELECT
            x.status,
            pg_catalog.count(*) AS n,
            pg_catalog.min(x.created_at) AS oldest,
            pg_catalog.max(x.created_at) AS newest
        FROM tokentrack.reports AS r
        CROSS JOIN LATERAL (
            SELECT
                rr.status,
                rr.created_at
            FROM tokentrack.report_reservations AS rr
            WHERE rr.report_id = r.id
            LIMIT 1
        ) AS x
        WHERE r.created_at >= v_since AND x.status <> 'active'
        GROUP BY x.status
    ),

    -- Correlated one-row lookups (not EXISTS, which the planner may turn into a hash join over
    -- a whole table): each completed report of the window costs two index probes.
    without_steps AS (
        SELECT
            r.id,
            r.created_at
        FROM tokentrack.reports AS r
        WHERE
            r.created_at >= v_since
            AND r.status = 'complete'
            AND (
                SELECT 1 FROM tokentrack.report_reservations AS rr
                WHERE rr.report_id = r.id LIMIT 1
            ) = 1
            AND (
                SELECT 1 FROM tokentrack.report_step_usage AS s
                WHERE s.report_id = r.id LIMIT 1
            ) IS NULL
    ),

    window_steps AS (
        SELECT
            s.model,
            pg_catalog.count(*) AS n,
            COALESCE(pg_catalog.sum(s.total_tokens), 0) AS tokens,
            pg_catalog.sum(s.cost_micros) AS cost,
            pg_catalog.count(*) FILTER (WHERE s.cost_micros IS NULL) AS unpriced,
            COALESCE(pg_catalog.sum(s.total_tokens) FILTER (WHERE s.cost_micros IS NULL), 0)
            AS unpriced_tokens
        FROM tokentrack.reports AS r
        -- OFFSET 0 keeps the subquery from being pulled up into a join the planner may hash
        -- over the whole step table: each report of the window costs one index range scan.
        CROSS JOIN LATERAL (
            SELECT
                st.model,
                st.total_tokens,
                st.cost_micros
            FROM tokentrack.report_step_usage AS st
            WHERE st.report_id = r.id
            OFFSET 0
        ) AS s
        WHERE r.created_at >= v_since
        GROUP BY s.model
    ),

    budget_state AS (
        SELECT
            c.*,
            -- The effective limit: limit_amount plus unexpired grants (since version 20261211000000).
            tokentrack.budget_limit(c.account_id, c.id, c.window_start) AS limit_amount,
            COALESCE(w.used, 0) AS used,
            tokentrack.budget_held(c.account_id, c.id, c.unit, c.window_start) AS held
        FROM (
            SELECT
                b.account_id,
                b.id,
                b.subject,
                b.unit,
                b.budget_window,
                tokentrack.budget_window_start(
                    b.budget_window, b.timezone, b.created_at, pg_catalog.now()
                ) AS window_start
            FROM tokentrack.budgets AS b
        ) AS c
        LEFT JOIN tokentrack.budget_windows AS w
            ON w.account_id = c.account_id AND w.budget_id = c.id AND w.window_start = c.window_start
    ),

    by_hour AS (
        SELECT
            pg_catalog.date_trunc('hour', r.created_at) AS hour,
            pg_catalog.count(*) FILTER (WHERE r.status = 'pending') AS pending,
            pg_catalog.count(*) FILTER (WHERE r.status = 'processing') AS processing,
            pg_catalog.count(*) FILTER (WHERE r.status = 'complete') AS complete,
            pg_catalog.count(*) FILTER (WHERE r.status = 'failed') AS failed,
            pg_catalog.count(*) FILTER (WHERE r.status = 'cancelled') AS cancelled
        FROM tokentrack.reports AS r
        WHERE r.created_at >= v_since
        GROUP BY 1
    ),

    totals AS (
        SELECT
            COALESCE(pg_catalog.sum(h.pending), 0)::bigint AS pending,
            COALESCE(pg_catalog.sum(h.processing), 0)::bigint AS processing,
            COALESCE(pg_catalog.sum(h.complete), 0)::bigint AS complete,
            COALESCE(pg_catalog.sum(h.failed), 0)::bigint AS failed,
            COALESCE(pg_catalog.sum(h.cancelled), 0)::bigint AS cancelled,
            COALESCE(pg_catalog.sum(h.complete + h.failed + h.cancelled), 0)::bigint AS finished
        FROM by_hour AS h
    )

    SELECT pg_catalog.jsonb_build_object(
        'taken_at', pg_catalog.now(),
        'window_hours', p_hours,
        'active_reservations', (
            SELECT pg_catalog.jsonb_build_object(
                'count', a.n,
                'older_than_2h', a.older_than_2h,
                'older_than_3h', a.older_than_3h,
                'past_expiry', a.past_expiry,
                'oldest', a.oldest,
                'newest', a.newest,
                'oldest_age_seconds',
                COALESCE(pg_catalog.date_part('epoch', pg_catalog.now() - a.oldest), 0)
            )
            FROM active AS a
        ),
        'reservations_by_status', (
            SELECT pg_catalog.jsonb_build_object(
                'active', pg_catalog.jsonb_build_object(
                    'count', a.n, 'oldest', a.oldest, 'newest', a.newest
                ),
                'completed', COALESCE((
                    SELECT pg_catalog.jsonb_build_object(
                        'count', w.n, 'oldest', w.oldest, 'newest', w.newest
                    )
                    FROM window_reservations AS w WHERE w.status = 'completed'
                ), '{"count": 0, "oldest": null, "newest": null}'::jsonb),
                'expired', COALESCE((
                    SELECT pg_catalog.jsonb_build_object(
                        'count', w.n, 'oldest', w.oldest, 'newest', w.newest
                    )
                    FROM window_reservations AS w WHERE w.status = 'expired'
                ), '{"count": 0, "oldest": null, "newest": null}'::jsonb)
            )
            FROM active AS a
        ),
        'reports_without_steps', pg_catalog.jsonb_build_object(
            'count', (SELECT pg_catalog.count(*) FROM without_steps),
            'examples', COALESCE((
                SELECT pg_catalog.jsonb_agg(e.id ORDER BY e.created_at DESC, e.id)
                FROM (
                    SELECT
                        ws.id,
                        ws.created_at
                    FROM without_steps AS ws
                    ORDER BY ws.created_at DESC, ws.id
                    LIMIT 5
                ) AS e
            ), '[]'::jsonb)
        ),
        'reports_by_hour', COALESCE((
            SELECT pg_catalog.jsonb_agg(
                pg_catalog.jsonb_build_object(
                    'hour', h.hour,
                    'pending', h.pending,
                    'processing', h.processing,
                    'complete', h.complete,
                    'failed', h.failed,
                    'cancelled', h.cancelled
                )
                ORDER BY h.hour
            )
            FROM by_hour AS h
        ), '[]'::jsonb),
        'reports_window', (
            SELECT pg_catalog.jsonb_build_object(
                'pending', t.pending,
                'processing', t.processing,
                'complete', t.complete,
                'failed', t.failed,
                'cancelled', t.cancelled
            )
            FROM totals AS t
        ),
        'steps', (
            SELECT pg_catalog.jsonb_build_object(
                'count', COALESCE(pg_catalog.sum(ws.n), 0),
                'tokens', COALESCE(pg_catalog.sum(ws.tokens), 0),
                'cost_micros', COALESCE(pg_catalog.sum(ws.cost), 0),
                'unpriced', pg_catalog.jsonb_build_object(
                    'count', COALESCE(pg_catalog.sum(ws.unpriced), 0),
                    'tokens', COALESCE(pg_catalog.sum(ws.unpriced_tokens), 0),
                    'models', COALESCE((
                        SELECT pg_catalog.jsonb_agg(
                            pg_catalog.jsonb_build_object(
                                'model', u.model, 'steps', u.unpriced, 'tokens', u.unpriced_tokens
                            )
                            ORDER BY u.unpriced_tokens DESC, u.model ASC NULLS FIRST
                        )
                        FROM (
                            SELECT
                                w.model,
                                w.unpriced,
                                w.unpriced_tokens
                            FROM window_steps AS w
                            WHERE w.unpriced > 0
                            ORDER BY w.unpriced_tokens DESC, w.model ASC NULLS FIRST
                            LIMIT 10
                        ) AS u
                    ), '[]'::jsonb)
                )
            )
            FROM window_steps AS ws
        ),
        'model_prices', (SELECT pg_catalog.count(*) FROM tokentrack.model_prices),
        'budgets', pg_catalog.jsonb_build_object(
            'count', (SELECT pg_catalog.count(*) FROM budget_state),
            'exhausted', (
                SELECT pg_catalog.count(*) FROM budget_state AS bs
                WHERE bs.used + bs.held >= bs.limit_amount
            ),
            'over_limit', (
                SELECT pg_catalog.count(*) FROM budget_state AS bs WHERE bs.used > bs.limit_amount
            ),
            'nearest', COALESCE((
                SELECT pg_catalog.jsonb_agg(
                    pg_catalog.jsonb_build_object(
                        'account_id', n.account_id,
                        'budget_id', n.id,
                        'subject', n.subject,
                        'unit', n.unit,
                        'window', n.budget_window,
                        'window_start', n.window_start,
                        'used', n.used,
                        'held', n.held,
                        'limit', n.limit_amount
                    )
                    ORDER BY n.ratio DESC, n.account_id, n.id
                )
                FROM (
                    SELECT
                        bs.*,
                        (bs.used + bs.held)::numeric / NULLIF(bs.limit_amount, 0)::numeric AS ratio
                    FROM budget_state AS bs
                    ORDER BY ratio DESC NULLS FIRST, bs.account_id, bs.id
                    LIMIT 10
                ) AS n
            ), '[]'::jsonb)
        ),
        'failure_rate', (
            SELECT t.failed::float8 / NULLIF(t.finished, 0)::float8 FROM totals AS t
        ),
        'completion_rate', (
            SELECT t.complete::float8 / NULLIF(t.finished, 0)::float8 FROM totals AS t
        )
    ) INTO v_result;

    RETURN v_result;
END
$function$;

COMMENT ON FUNCTION tokentrack.health(integer) IS
'Read-only monitoring figures of the last p_hours hours (active and stale reservations, '
'completed reports without steps, reports per hour and status, failure and completion rates), '
'read by index; what tokentrack monitor reports besides reconcile(). Sees every account: '
'EXECUTE for tokentrack_service, or a monitoring role granted it (docs/SECURITY.md).';

REVOKE ALL ON FUNCTION tokentrack.health(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.health(integer) TO tokentrack_service;
