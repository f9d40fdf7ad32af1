-- version: 20261213000000
--
-- tokentrack.metrics(p_hours integer DEFAULT 1, p_top_accounts integer DEFAULT 10,
--     p_top_subjects integer DEFAULT 5) -> jsonb
--
-- The figures `tokentrack exporter` serves besides health()'s, with bounded label sets:
--   budgets          every budget in its current window (used, held and the effective limit,
--                    budget_limit, as health() reads them), in at most p_top_accounts * (24 + p_top_subjects) + 12
--                    groups: [{account, subject, unit, window, budgets, exhausted, used, held,
--                    limit}], where
--                      * the p_top_accounts accounts whose fullest window is fullest ((used +
--                        held) / limit; a limit of 0 is full; ties: more used first, then the
--                        account id) have one group per account-wide budget (subject "",
--                        at most 12: one per unit and window) and per subject budget of their
--                        p_top_subjects fullest, and their other subject budgets summed per
--                        unit and window under subject "other";
--                      * every other account's budgets are summed per unit and window under
--                        account "other", subject "other".
--                    budgets counts the windows of the group, exhausted those with used + held
--                    >= limit; used, held and limit are sums. Ordered by account, subject,
--                    unit, window.
--   budget_accounts  how many accounts have a budget (so the reader sees how many are summed)
--   report_durations the reports created in the last p_hours hours whose reservation is
--                    completed: count, avg_seconds and max_seconds of finalized_at - the
--                    reservation's created_at (null when there is none)
-- Reads: every budget with its current window (budget_windows by primary key) and, per
--   budget, the account's active reservations (budget_held), as health()'s budgets do;
--   reports by reports_created_at_idx and each one's reservation by its unique index.
-- Locks nothing, writes nothing (STABLE: one snapshot). Sees every account (SECURITY
--   DEFINER): EXECUTE for tokentrack_service only, as health() (docs/SECURITY.md).
-- Errors: 22004 a NULL argument; 22023 p_hours below 1, p_top_accounts or p_top_subjects
--   below 0 or above 1000.
CREATE OR REPLACE FUNCTION tokentrack.metrics(
    p_hours integer DEFAULT 1, p_top_accounts integer DEFAULT 10, p_top_subjects integer DEFAULT 5
)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_result jsonb;
BEGIN
    IF p_hours IS NULL THEN
        RAISE EXCEPTION 'p_hours must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_hours';
    END IF;
    IF p_hours < 1 THEN
        RAISE EXCEPTION 'p_hours must be at least 1 (got %)', p_hours
            USING ERRCODE = '22023', COLUMN = 'p_hours';
    END IF;
    IF p_top_accounts IS NULL THEN
        RAISE EXCEPTION 'p_top_accounts must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_top_accounts';
    END IF;
    IF p_top_accounts NOT BETWEEN 0 AND 1000 THEN
        RAISE EXCEPTION 'p_top_accounts must be between 0 and 1000 (got %)', p_top_accounts
            USING ERRCODE = '22023', COLUMN = 'p_top_accounts';
    END IF;
    IF p_top_subjects IS NULL THEN
        RAISE EXCEPTION 'p_top_subjects must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_top_subjects';
    END IF;
    IF p_top_subjects NOT BETWEEN 0 AND 1000 THEN
        RAISE EXCEPTION 'p_top_subjects must be between 0 and 1000 (got %)', p_top_subjects
            USING ERRCODE = '22023', COLUMN = 'p_top_subjects';
    END IF;

    WITH budget_state AS (
        SELECT
            s.*,
            CASE
                WHEN s.limit_amount = 0 THEN 'Infinity'::numeric
                ELSE (s.used + s.held)::numeric / s.limit_amount::numeric
            END AS fill
        FROM (
            SELECT
                c.account_id,
                c.subject,
                c.unit,
                c.budget_window,
                -- The effective limit: limit_amount plus unexpired grants (version 20261211000000).
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
        ) AS s
    ),

    top_accounts AS (
        SELECT a.account_id
        FROM (
            SELECT
                bs.account_id,
                pg_catalog.max(bs.fill) AS fill,
                pg_catalog.sum(bs.used) AS used
            FROM budget_state AS bs
            GROUP BY bs.account_id
        ) AS a
        ORDER BY a.fill DESC, a.used DESC, a.account_id
        LIMIT p_top_accounts
    ),

    ranked AS (
        SELECT
            bs.*,
            t.account_id IS NOT NULL AS top,
            pg_catalog.row_number() OVER (
                PARTITION BY bs.account_id, bs.subject IS NULL
                ORDER BY bs.fill DESC, bs.used DESC, bs.subject, bs.unit, bs.budget_window
            ) AS subject_rank
        FROM budget_state AS bs
        LEFT JOIN top_accounts AS t ON t.account_id = bs.account_id
    ),

    labelled AS (
        SELECT
            r.*,
            CASE WHEN r.top THEN r.account_id::text ELSE 'other' END AS account_label,
            CASE
                WHEN NOT r.top THEN 'other'
                WHEN r.subject IS NULL THEN ''
                WHEN r.subject_rank <= p_top_subjects THEN r.subject
                ELSE 'other'
            END AS subject_label
        FROM ranked AS r
    ),

    groups AS (
        SELECT
            l.account_label,
            l.subject_label,
            l.unit,
            l.budget_window,
            pg_catalog.count(*) AS budgets,
            pg_catalog.count(*) FILTER (WHERE l.used + l.held >= l.limit_amount) AS exhausted,
            pg_catalog.sum(l.used) AS used,
            pg_catalog.sum(l.held) AS held,
            pg_catalog.sum(l.limit_amount) AS limit_amount
        FROM labelled AS l
        GROUP BY l.account_label, l.subject_label, l.unit, l.budget_window
    ),

    durations AS (
        SELECT
            pg_catalog.count(*) AS n,
            pg_catalog.avg(pg_catalog.date_part('epoch', x.finalized_at - x.created_at)) AS avg_seconds,
            pg_catalog.max(pg_catalog.date_part('epoch', x.finalized_at - x.created_at)) AS max_seconds
        FROM tokentrack.reports AS r
        CROSS JOIN LATERAL (
            SELECT
                rr.created_at,
                rr.finalized_at
            FROM tokentrack.report_reservations AS rr
            WHERE rr.report_id = r.id AND rr.status = 'completed'
            LIMIT 1
        ) AS x
        WHERE r.created_at >= pg_catalog.now() - pg_catalog.make_interval(hours => p_hours)
    )

    SELECT pg_catalog.jsonb_build_object(
        'taken_at', pg_catalog.now(),
        'budget_accounts', (SELECT pg_catalog.count(DISTINCT bs.account_id) FROM budget_state AS bs),
        'budgets', COALESCE((
            SELECT pg_catalog.jsonb_agg(
                pg_catalog.jsonb_build_object(
                    'account', g.account_label,
                    'subject', g.subject_label,
                    'unit', g.unit,
                    'window', g.budget_window,
                    'budgets', g.budgets,
                    'exhausted', g.exhausted,
                    'used', g.used,
                    'held', g.held,
                    'limit', g.limit_amount
                )
                ORDER BY g.account_label, g.subject_label, g.unit, g.budget_window
            )
            FROM groups AS g
        ), '[]'::jsonb),
        'report_durations', (
            SELECT pg_catalog.jsonb_build_object(
                'hours', p_hours, 'count', d.n, 'avg_seconds', d.avg_seconds, 'max_seconds', d.max_seconds
            )
            FROM durations AS d
        )
    ) INTO v_result;
    RETURN v_result;
END
$function$;

COMMENT ON FUNCTION tokentrack.metrics(integer, integer, integer) IS
'Read-only exporter figures with bounded labels: budget windows of the top accounts (the rest '
'summed under "other") and report durations of the last p_hours hours. EXECUTE for '
'tokentrack_service, or a monitoring role granted it (docs/SECURITY.md).';

REVOKE ALL ON FUNCTION tokentrack.metrics(integer, integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.metrics(integer, integer, integer) TO tokentrack_service;
