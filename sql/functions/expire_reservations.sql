-- version: 20260108000000
--
-- tokentrack.expire_reservations(p_limit integer) -> jsonb
--
-- The sweep's work, for at most p_limit reservations (NULL: all of them): finds active
-- reservations past expires_at, bills their recorded steps exactly as finalize would
-- (finalize_reservation(id, 'expired'), ledger kind report_expired) and marks them expired.
-- Since version 20261214000000 it bills the batch set-based: one statement per kind of write
-- for the whole batch (the periods: one UPDATE each, by primary key) instead of about ten per
-- reservation, writing the rows and values that finalize_reservation(id, 'expired') writes
-- for each: one usage_ledger row per reservation
-- (report_expired; the sum of its report's unbilled steps; 1 report when the report's status
-- is complete), its report's unbilled steps marked billed by that row (billed_at,
-- billed_period_id = the reservation's period, billing_entry_id), each period's tokens_used
-- and reports_count raised once by the sums of the batch's reservations in it, the
-- reservations set expired with billed_tokens and finalized_at, and each report's token_usage
-- (totalTokens, inputTokens, outputTokens, cachedInputTokens, cacheWriteTokens,
-- reasoningTokens, costMicros, unpricedSteps, steps, billedAt). Budget windows and
-- notifications: for each reservation that holds budgets and billed tokens or cost, one after
-- the other in (period_id, id) order, bill_budget_windows as finalize_reservation calls it
-- (releasing nothing: past expiry a reservation holds nothing), so each sees the windows as
-- the one before left them and records the notifications the per-reservation sweep recorded.
-- Returns {"success", "expired", "billed_tokens", "steps"}.
-- Locks, in the global order (docs/REVIEW.md), ranks 2 to 5 each in one statement: every chosen
--   reservation row (FOR UPDATE, in (expires_at, id) order, rank 2; a reservation that a
--   concurrent finalize or sweep billed meanwhile drops out when its lock is granted), then
--   every period of the batch (FOR UPDATE, ascending id, rank 3), every budget the batch
--   holds, of every account (FOR UPDATE, (account_id, id) order, rank 4), every report of the
--   batch (FOR UPDATE, ascending id, rank 5), then the reports' unbilled step rows (one
--   UPDATE) and the held budget windows (bill_budget_windows, rank 6), then the notifications
--   of the crossings (rank 7). The UPDATEs of periods, reservations and reports touch only
--   rows it holds already (periods and reservations are written right after the ledger rows,
--   before the steps). Taking all reservation locks before any period lock keeps the global
--   order, so the sweep cannot deadlock with finalize, finish_report or
--   persist_step_usage. A sweep is the only caller that holds several period rows at once; it
--   takes them in ascending order, so two sweeps cannot deadlock on periods either (in the
--   order its batch was chosen, sweep A could hold period 1 and wait for period 2 while sweep
--   B held period 2 and waited for period 1). Since version 20261210000000 it locks every
--   period of the batch and then every budget the batch holds before it bills any
--   reservation, so that no period is locked after a budget; since version 20261214000000
--   every report too before any step, so that no report is locked after a step or window
--   (the per-reservation sweep went on to the next report after the previous one's steps).
-- Why it cannot double-bill: as finalize_reservation: only steps with billed_at IS NULL are
--   billed, under the reservation locks that every new unbilled step must share, and every
--   billed reservation leaves 'active' in the same transaction; only reservations still
--   active under the lock are billed.
-- Batch: the longest-expired first, (expires_at, id), which report_reservations_active_by_expiry
--   serves by a range scan of the due reservations only (ORDER BY id would walk the whole
--   primary key, every reservation ever made, to find the due ones).
-- Runs with the caller's transaction: cleanup_expired_reservations() calls it once for all;
--   sweep_expired_reservations() and `tokentrack cleanup` call it per batch, committing in
--   between, until a batch expires nothing ('expired' 0: nothing was due at its now()). A
--   short batch does not mean nothing is left: rows billed by a concurrent finalize drop out,
--   and reservations that came due after the batch's now() are not in it.
-- Errors: 25000 when run under REPEATABLE READ or SERIALIZABLE (READ COMMITTED only, see
--   docs/REVIEW.md); 22023 a p_limit below 1.
CREATE OR REPLACE FUNCTION tokentrack.expire_reservations(p_limit integer)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    -- The reservations chosen and locked.
    v_chosen uuid[];
    -- One element per reservation billed, the arrays aligned with each other (aggregated in one
    -- pass over the same rows, in no particular order).
    v_ids uuid[];
    v_accounts uuid[];
    v_periods uuid[];
    v_report_ids uuid[];
    v_reports integer[];
    v_steps bigint[];
    v_tokens bigint[];
    v_input bigint[];
    v_output bigint[];
    v_cached bigint[];
    v_cache_write bigint[];
    v_reasoning bigint[];
    v_cost bigint[];
    v_unpriced bigint[];
    v_held boolean;
    -- The ledger rows, aligned with each other (not with v_ids).
    v_entry_ids bigint[];
    v_entry_reports uuid[];
    v_entry_periods uuid[];
    v_period record;
    v_hold record;
BEGIN
    -- READ COMMITTED only: see require_read_committed.
    PERFORM tokentrack.require_read_committed('expire_reservations');
    IF p_limit < 1 THEN
        RAISE EXCEPTION 'p_limit must be at least 1 (got %)', p_limit USING ERRCODE = '22023', COLUMN = 'p_limit';
    END IF;

    -- Rank 2: the whole batch in one statement, longest expired first.
    SELECT pg_catalog.array_agg(due.id) INTO v_chosen
    FROM (
        SELECT rr.id FROM tokentrack.report_reservations AS rr
        WHERE rr.status = 'active' AND rr.expires_at <= pg_catalog.now()
        ORDER BY rr.expires_at, rr.id
        LIMIT p_limit
        FOR UPDATE
    ) AS due;

    IF v_chosen IS NULL THEN
        RETURN pg_catalog.jsonb_build_object('success', true, 'expired', 0, 'billed_tokens', 0, 'steps', 0);
    END IF;

    -- Rank 3: every period of the batch, ascending (the sort is below the row locking, so the
    -- rows are locked in id order).
    PERFORM FROM tokentrack.usage_periods AS p
    WHERE p.id IN (
        SELECT rr.period_id FROM tokentrack.report_reservations AS rr
        WHERE rr.id = ANY (v_chosen) AND rr.status = 'active'
    )
    ORDER BY p.id
    FOR UPDATE;
    -- Rank 4: every budget the batch holds, of every account, in (account_id, id) order.
    PERFORM FROM tokentrack.budgets AS b
    WHERE (b.account_id, b.id) IN (
        SELECT rr.account_id, h.budget_id
        FROM tokentrack.report_reservations AS rr
        CROSS JOIN LATERAL pg_catalog.jsonb_to_recordset(rr.holds) AS h (budget_id uuid)
        WHERE rr.id = ANY (v_chosen) AND rr.status = 'active' AND rr.holds IS NOT NULL
    )
    ORDER BY b.account_id, b.id
    FOR UPDATE;
    -- Rank 5: every report of the batch, ascending (finalize_reservation reads its status
    -- under this lock).
    PERFORM FROM tokentrack.reports AS r
    WHERE r.id IN (
        SELECT rr.report_id FROM tokentrack.report_reservations AS rr
        WHERE rr.id = ANY (v_chosen) AND rr.status = 'active'
    )
    ORDER BY r.id
    FOR UPDATE;

    -- What finalize_reservation reads, for the whole batch: each report's status and the sums
    -- of its unbilled steps.
    SELECT
        pg_catalog.array_agg(x.id),
        pg_catalog.array_agg(x.account_id),
        pg_catalog.array_agg(x.period_id),
        pg_catalog.array_agg(x.report_id),
        pg_catalog.array_agg(x.reports),
        pg_catalog.array_agg(x.steps),
        pg_catalog.array_agg(x.tokens),
        pg_catalog.array_agg(x.input),
        pg_catalog.array_agg(x.output),
        pg_catalog.array_agg(x.cached),
        pg_catalog.array_agg(x.cache_write),
        pg_catalog.array_agg(x.reasoning),
        pg_catalog.array_agg(x.cost),
        pg_catalog.array_agg(x.unpriced),
        COALESCE(pg_catalog.bool_or(x.held), false)
    INTO
        v_ids, v_accounts, v_periods, v_report_ids, v_reports, v_steps, v_tokens, v_input,
        v_output, v_cached, v_cache_write, v_reasoning, v_cost, v_unpriced, v_held
    FROM (
        SELECT
            rr.id,
            rr.account_id,
            rr.period_id,
            rr.report_id,
            CASE WHEN r.status = 'complete' THEN 1 ELSE 0 END AS reports,
            rr.holds IS NOT NULL AS held,
            st.steps,
            st.tokens,
            st.input,
            st.output,
            st.cached,
            st.cache_write,
            st.reasoning,
            st.cost,
            st.unpriced
        FROM tokentrack.report_reservations AS rr
        INNER JOIN tokentrack.reports AS r ON r.id = rr.report_id
        CROSS JOIN LATERAL (
            SELECT
                pg_catalog.count(*) AS steps,
                COALESCE(pg_catalog.sum(s.total_tokens), 0)::bigint AS tokens,
                COALESCE(pg_catalog.sum(s.input_tokens), 0)::bigint AS input,
                COALESCE(pg_catalog.sum(s.output_tokens), 0)::bigint AS output,
                COALESCE(pg_catalog.sum(s.cached_input_tokens), 0)::bigint AS cached,
                COALESCE(pg_catalog.sum(s.cache_write_tokens), 0)::bigint AS cache_write,
                COALESCE(pg_catalog.sum(s.reasoning_tokens), 0)::bigint AS reasoning,
                -- sum(bigint) is numeric; a report's cost stays far within bigint.
                COALESCE(pg_catalog.sum(s.cost_micros), 0)::bigint AS cost,
                pg_catalog.count(*) FILTER (WHERE s.cost_micros IS NULL) AS unpriced
            FROM tokentrack.report_step_usage AS s
            WHERE s.report_id = rr.report_id AND s.billed_at IS NULL
        ) AS st
        WHERE rr.id = ANY (v_chosen) AND rr.status = 'active'
    ) AS x;

    IF v_ids IS NULL THEN
        RETURN pg_catalog.jsonb_build_object('success', true, 'expired', 0, 'billed_tokens', 0, 'steps', 0);
    END IF;

    -- The ledger rows, in (period_id, id) order: the order in which the per-reservation sweep
    -- wrote them.
    WITH entries AS (
        INSERT INTO tokentrack.usage_ledger (account_id, period_id, kind, tokens, reports, report_id)
        SELECT b.account_id, b.period_id, 'report_expired', b.tokens, b.reports, b.report_id
        FROM ROWS FROM (
            pg_catalog.unnest(v_ids),
            pg_catalog.unnest(v_accounts),
            pg_catalog.unnest(v_periods),
            pg_catalog.unnest(v_tokens),
            pg_catalog.unnest(v_reports),
            pg_catalog.unnest(v_report_ids)
        ) AS b (id, account_id, period_id, tokens, reports, report_id)
        ORDER BY b.period_id, b.id
        RETURNING id, report_id, period_id
    )
    SELECT pg_catalog.array_agg(e.id), pg_catalog.array_agg(e.report_id), pg_catalog.array_agg(e.period_id)
    INTO v_entry_ids, v_entry_reports, v_entry_periods
    FROM entries AS e;

    -- Each period once, by the sums of the batch's reservations in it (held since rank 3), by
    -- its primary key: one UPDATE per period, not one join of the batch's sums with the
    -- periods, which the planner serves by reading the whole table once a batch's periods are
    -- a tenth of it.
    FOR v_period IN
        SELECT
            b.period_id,
            pg_catalog.sum(b.tokens)::bigint AS tokens,
            pg_catalog.sum(b.reports)::integer AS reports
        FROM ROWS FROM (
            pg_catalog.unnest(v_periods),
            pg_catalog.unnest(v_tokens),
            pg_catalog.unnest(v_reports)
        ) AS b (period_id, tokens, reports)
        GROUP BY b.period_id
        ORDER BY b.period_id
    LOOP
        UPDATE tokentrack.usage_periods AS p
        SET tokens_used = p.tokens_used + v_period.tokens, reports_count = p.reports_count + v_period.reports
        WHERE p.id = v_period.period_id;
    END LOOP;

    -- Rank 2 (held by the caller): the reservations leave 'active'. Like the periods above, rows
    -- it holds already: writing them before the steps takes no lock out of order. (budget_held,
    -- which the windows below read, counts only unexpired reservations: none of the batch,
    -- whatever its status.)
    UPDATE tokentrack.report_reservations AS rr
    SET status = 'expired', billed_tokens = b.tokens, finalized_at = pg_catalog.now()
    FROM ROWS FROM (pg_catalog.unnest(v_ids), pg_catalog.unnest(v_tokens)) AS b (id, tokens)
    WHERE rr.id = b.id;

    -- Rank 6: the steps, each marked billed by its reservation's ledger row.
    UPDATE tokentrack.report_step_usage AS s
    SET billed_at = pg_catalog.now(), billed_period_id = e.period_id, billing_entry_id = e.id
    FROM ROWS FROM (
        pg_catalog.unnest(v_entry_ids),
        pg_catalog.unnest(v_entry_reports),
        pg_catalog.unnest(v_entry_periods)
    ) AS e (id, report_id, period_id)
    WHERE s.report_id = e.report_id AND s.billed_at IS NULL;

    -- Rank 6 and 7: the held windows and their notifications, one reservation after the other
    -- in (period_id, id) order, with what finalize_reservation passes (past expiry a
    -- reservation held nothing, so it releases nothing).
    IF v_held THEN
        FOR v_hold IN
            SELECT rr.account_id, rr.holds, rr.expires_at, rr.reserved_tokens, rr.reserved_cost_micros,
                b.tokens, b.cost
            FROM
                ROWS FROM (
                    pg_catalog.unnest(v_ids),
                    pg_catalog.unnest(v_tokens),
                    pg_catalog.unnest(v_cost)
                ) AS b (id, tokens, cost)
            INNER JOIN tokentrack.report_reservations AS rr ON rr.id = b.id
            WHERE rr.holds IS NOT NULL AND (b.tokens <> 0 OR b.cost <> 0)
            ORDER BY rr.period_id, rr.id
        LOOP
            PERFORM tokentrack.bill_budget_windows(
                v_hold.account_id, v_hold.holds, v_hold.tokens, v_hold.cost,
                CASE WHEN v_hold.expires_at > pg_catalog.now() THEN v_hold.reserved_tokens::bigint ELSE 0 END,
                CASE WHEN v_hold.expires_at > pg_catalog.now()
                    THEN COALESCE(v_hold.reserved_cost_micros, 0) ELSE 0 END
            );
        END LOOP;
    END IF;

    -- Rank 5 (held): the reports' token_usage, as finalize_reservation writes it.
    UPDATE tokentrack.reports AS r
    SET token_usage = pg_catalog.jsonb_build_object(
        'totalTokens', b.tokens,
        'inputTokens', b.input,
        'outputTokens', b.output,
        'cachedInputTokens', b.cached,
        'cacheWriteTokens', b.cache_write,
        'reasoningTokens', b.reasoning,
        'costMicros', b.cost,
        'unpricedSteps', b.unpriced,
        'steps', b.steps,
        'billedAt', pg_catalog.now()
    )
    FROM ROWS FROM (
        pg_catalog.unnest(v_report_ids),
        pg_catalog.unnest(v_tokens),
        pg_catalog.unnest(v_input),
        pg_catalog.unnest(v_output),
        pg_catalog.unnest(v_cached),
        pg_catalog.unnest(v_cache_write),
        pg_catalog.unnest(v_reasoning),
        pg_catalog.unnest(v_cost),
        pg_catalog.unnest(v_unpriced),
        pg_catalog.unnest(v_steps)
    ) AS b (report_id, tokens, input, output, cached, cache_write, reasoning, cost, unpriced, steps)
    WHERE r.id = b.report_id;

    RETURN pg_catalog.jsonb_build_object(
        'success', true,
        'expired', pg_catalog.cardinality(v_ids),
        'billed_tokens', (SELECT pg_catalog.sum(t.t) FROM pg_catalog.unnest(v_tokens) AS t (t))::bigint,
        'steps', (SELECT pg_catalog.sum(t.t) FROM pg_catalog.unnest(v_steps) AS t (t))::bigint
    );
END
$function$;

COMMENT ON FUNCTION tokentrack.expire_reservations(integer) IS
'Bills and expires at most p_limit active reservations past expires_at (NULL: all), in the '
'caller''s transaction. Used by cleanup_expired_reservations and sweep_expired_reservations.';

REVOKE ALL ON FUNCTION tokentrack.expire_reservations(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.expire_reservations(integer) TO tokentrack_service;
