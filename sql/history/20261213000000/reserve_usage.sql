-- version: 20261210000000
--
-- tokentrack.reserve_usage(p_account_id uuid, p_report_id uuid, p_tokens integer,
--     p_cost_micros bigint, p_subjects text[], p_mode text) -> jsonb
--
-- Internal (no EXECUTE for application roles): the one implementation behind
-- try_reserve_tokens and reserve, which check their arguments first (ids not NULL, p_tokens
-- positive, p_cost_micros NULL or not negative, p_subjects without NULL or blank entries,
-- p_mode NULL or one of the report modes).
-- Grants when the estimate fits the account's active usage period
--   available = tokens_limit - tokens_used - reserved_tokens of the account's other active,
--               unexpired reservations
-- and every budget that applies (the account's budgets, subject NULL, and those of each subject
-- in p_subjects), each in its current window:
--   available = limit - used in the window - what active, unexpired reservations hold there
-- where limit is the budget's effective limit in that window (budget_limit: its limit_amount
-- plus its unexpired credit grants that overlap the window; since version 20261211000000)
-- with p_tokens against a tokens budget and p_cost_micros (NULL: 0) against a cost budget; a
-- budget whose window has nothing left refuses even an estimate of 0.
-- The report row is created (status processing, mode p_mode, or standard when p_mode is NULL)
-- when it does not exist yet; a pending report becomes processing, with mode p_mode unless
-- p_mode is NULL (try_reserve_tokens: the report keeps its mode, as in Part 1).
-- Locks, in order: the account's active usage_periods row (FOR UPDATE, rank 3 of the global
--   order, docs/REVIEW.md), then every budget that applies (lock_budgets: FOR UPDATE in id
--   order, rank 4), both before any sum is read, so the period's holds and the budgets' use
--   and holds come from one moment (a finish committing while this call waits for a budget
--   shows as billed in both). A budget created after its ids were read does not apply to
--   this reservation (as if it had been created after it).
--   Every reserver of an account takes the period first, so reservation checks of one
--   account run one at a time and never grant together more than is available, for every
--   budget at once; billing (finalize, the sweep, a late step) and extend_reservation take the
--   same budget locks before they change a window's use or holds.
-- Writes (only when granted): reports (insert or pending -> processing), one
--   report_reservations row (active, expires 2 hours later, its holds), a budget_windows
--   row for each window it holds that has none yet, and (since version 20261212000000) a
--   notification for each threshold the hold takes a window's used + held across
--   (note_crossings, after every budget granted it: rank 7 of the lock order).
-- Idempotent: reserving again for a report whose reservation is active and unexpired returns
--   that reservation and reserves nothing more ("existing": true; its "budgets" list what it
--   holds, without "available").
-- Refusals (success false, nothing written), checked in this order: account_not_found,
--   report_account_mismatch, no_active_period, report_finalized, insufficient_tokens (the
--   period; with period_id), insufficient_budget (the first budget, in id order, that cannot
--   hold it: budget_id, subject, window, unit, window_start, available, requested).
-- Assumes READ COMMITTED (its callers check): the sums are read after the locks are granted,
--   so they include every reservation and billing committed before that.
CREATE OR REPLACE FUNCTION tokentrack.reserve_usage(
    p_account_id uuid,
    p_report_id uuid,
    p_tokens integer,
    p_cost_micros bigint,
    p_subjects text[],
    p_mode text
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_period tokentrack.usage_periods%ROWTYPE;
    v_report tokentrack.reports%ROWTYPE;
    v_reservation tokentrack.report_reservations%ROWTYPE;
    v_held bigint;
    v_available bigint;
    v_budget_ids uuid[];
    v_budget record;
    v_requested bigint;
    v_holds jsonb := '[]'::jsonb;
    v_new_windows jsonb := '[]'::jsonb;
    v_budgets jsonb := '[]'::jsonb;
    v_rises jsonb := '[]'::jsonb;
    v_rise record;
BEGIN
    IF NOT EXISTS (SELECT FROM tokentrack.accounts AS a WHERE a.id = p_account_id) THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'account_not_found',
            'message', pg_catalog.format('account %s does not exist', p_account_id)
        );
    END IF;

    SELECT r.* INTO v_report FROM tokentrack.reports AS r WHERE r.id = p_report_id;
    IF FOUND AND v_report.account_id <> p_account_id THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'report_account_mismatch',
            'message', pg_catalog.format('report %s belongs to another account', p_report_id)
        );
    END IF;

    v_period := tokentrack.lock_active_period(p_account_id);
    IF v_period.id IS NULL THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'no_active_period',
            'message', pg_catalog.format('account %s has no active usage period', p_account_id)
        );
    END IF;

    -- Every budget that applies (the account's own and those of p_subjects), locked now (rank
    -- 4, after the period: lock_budgets), before anything is read under the period lock: each
    -- statement below then sees what a finish or sweep holding those budgets committed, for
    -- the period as for the budgets (one serial order; reading the period's holds first, a
    -- report billed meanwhile showed as held in the period and billed in its budget).
    SELECT pg_catalog.array_agg(b.id) INTO v_budget_ids FROM tokentrack.budgets AS b
    WHERE b.account_id = p_account_id AND (b.subject IS NULL OR b.subject = ANY (p_subjects));
    IF v_budget_ids IS NOT NULL THEN
        PERFORM tokentrack.lock_budgets(p_account_id, v_budget_ids);
    END IF;

    -- Under the period and budget locks: what the account's active, unexpired reservations hold.
    SELECT COALESCE(pg_catalog.sum(rr.reserved_tokens), 0) INTO v_held
    FROM tokentrack.report_reservations AS rr
    WHERE rr.account_id = p_account_id AND rr.status = 'active' AND rr.expires_at > pg_catalog.now();
    v_available := v_period.tokens_limit - v_period.tokens_used - v_held;

    SELECT rr.* INTO v_reservation FROM tokentrack.report_reservations AS rr WHERE rr.report_id = p_report_id;
    IF FOUND AND v_reservation.account_id <> p_account_id THEN
        -- The report was created by another account's reservation after the check above.
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'report_account_mismatch',
            'message', pg_catalog.format('report %s belongs to another account', p_report_id)
        );
    END IF;
    IF FOUND THEN
        IF v_reservation.status = 'active' AND v_reservation.expires_at > pg_catalog.now() THEN
            RETURN pg_catalog.jsonb_build_object(
                'success', true,
                'reservation_id', v_reservation.id,
                'reserved_tokens', v_reservation.reserved_tokens,
                'available_tokens', GREATEST(v_available, 0),
                'expires_at', v_reservation.expires_at,
                'period_id', v_reservation.period_id,
                'existing', true,
                -- What it holds (unlocked: a retry's answer, not a check).
                'budgets', COALESCE((
                    SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
                        'budget_id', b.id,
                        'subject', b.subject,
                        'window', b.budget_window,
                        'unit', b.unit,
                        'window_start', h.window_start,
                        'held', CASE WHEN b.unit = 'tokens' THEN v_reservation.reserved_tokens::bigint
                            ELSE COALESCE(v_reservation.reserved_cost_micros, 0) END
                    ) ORDER BY b.id)
                    FROM pg_catalog.jsonb_to_recordset(v_reservation.holds) AS h (budget_id uuid, window_start timestamptz)
                    INNER JOIN tokentrack.budgets AS b ON b.account_id = p_account_id AND b.id = h.budget_id
                ), '[]'::jsonb)
            );
        END IF;
        -- report_finalized in each case (the report's one reservation is used up: an expired
        -- one holds nothing, whether or not the sweep has run), with a message that says which.
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'report_finalized',
            'message', CASE v_reservation.status
                WHEN 'completed' THEN pg_catalog.format(
                    'report %s was already billed (its reservation is completed)', p_report_id
                )
                WHEN 'expired' THEN pg_catalog.format(
                    'report %s was already billed by the expiry sweep (its reservation expired at %s)',
                    p_report_id, v_reservation.expires_at
                )
                ELSE pg_catalog.format(
                    'report %s cannot be reserved again: its reservation expired at %s and holds '
                    'nothing; the expiry sweep has not billed it yet and will bill its recorded steps',
                    p_report_id, v_reservation.expires_at
                )
            END
        );
    END IF;
    IF v_report.status IN ('complete', 'failed', 'cancelled') THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'report_finalized',
            'message', pg_catalog.format('report %s already ended as %s', p_report_id, v_report.status)
        );
    END IF;

    IF p_tokens > v_available THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'insufficient_tokens',
            'message', pg_catalog.format(
                'requested %s tokens, %s available', p_tokens, GREATEST(v_available, 0)
            ),
            'available_tokens', GREATEST(v_available, 0),
            'requested_tokens', p_tokens,
            'period_id', v_period.id
        );
    END IF;


    -- Under the budget locks (taken above), each budget's limit, current
    -- window, what it has used there and what active, unexpired reservations hold there, read
    -- in one more (the holds from one scan of the account's active reservations).
    IF v_budget_ids IS NOT NULL THEN
        FOR v_budget IN
            WITH current_windows AS (
                SELECT
                    b.id,
                    b.subject,
                    b.unit,
                    b.budget_window,
                    CASE
                        WHEN b.budget_window = 'total' THEN b.created_at
                        ELSE pg_catalog.date_trunc(b.budget_window, pg_catalog.now(), b.timezone)
                    END AS window_start
                FROM tokentrack.budgets AS b
                WHERE b.account_id = p_account_id AND b.id = ANY (v_budget_ids)
            ),

            holds AS (
                SELECT
                    h.budget_id,
                    h.window_start,
                    pg_catalog.sum(rr.reserved_tokens::bigint) AS tokens,
                    pg_catalog.sum(COALESCE(rr.reserved_cost_micros, 0)) AS cost
                FROM tokentrack.report_reservations AS rr
                CROSS JOIN LATERAL pg_catalog.jsonb_to_recordset(rr.holds) AS h (budget_id uuid, window_start timestamptz)
                WHERE
                    rr.account_id = p_account_id AND rr.status = 'active'
                    AND rr.expires_at > pg_catalog.now() AND rr.holds IS NOT NULL
                GROUP BY h.budget_id, h.window_start
            )

            SELECT
                c.id,
                c.subject,
                c.unit,
                c.budget_window,
                c.window_start,
                tokentrack.budget_limit(p_account_id, c.id, c.window_start) - COALESCE(w.used, 0)
                - COALESCE(CASE WHEN c.unit = 'tokens' THEN hd.tokens ELSE hd.cost END, 0) AS available,
                COALESCE(w.used, 0)
                + COALESCE(CASE WHEN c.unit = 'tokens' THEN hd.tokens ELSE hd.cost END, 0) AS before,
                w.budget_id IS NULL AS new_window,
                -- As budget_hold builds it (inline: no function call per budget).
                pg_catalog.jsonb_build_object(
                    'budget_id', c.id,
                    'window_start', pg_catalog.to_char(
                        c.window_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'
                    )
                ) AS hold
            FROM current_windows AS c
            LEFT JOIN tokentrack.budget_windows AS w
                ON w.account_id = p_account_id AND w.budget_id = c.id AND w.window_start = c.window_start
            LEFT JOIN holds AS hd ON hd.budget_id = c.id AND hd.window_start = c.window_start
            ORDER BY c.id
        LOOP
            v_requested := CASE WHEN v_budget.unit = 'tokens' THEN p_tokens::bigint ELSE COALESCE(p_cost_micros, 0) END;
            -- A reservation with no cost estimate holds 0 in a cost budget: refused by it only
            -- when the window is exhausted.
            IF v_requested > v_budget.available OR v_budget.available <= 0 THEN
                RETURN pg_catalog.jsonb_build_object(
                    'success', false, 'error', 'insufficient_budget',
                    'message', pg_catalog.format(
                        'requested %s %s, %s available in the %s budget of %s (window from %s)',
                        v_requested, v_budget.unit, GREATEST(v_budget.available, 0), v_budget.budget_window,
                        COALESCE(v_budget.subject, 'the account'), v_budget.window_start
                    ),
                    'budget_id', v_budget.id,
                    'subject', v_budget.subject,
                    'window', v_budget.budget_window,
                    'unit', v_budget.unit,
                    'window_start', v_budget.window_start,
                    'available', GREATEST(v_budget.available, 0),
                    'requested', v_requested
                );
            END IF;
            v_holds := v_holds || pg_catalog.jsonb_build_array(v_budget.hold);
            IF v_budget.new_window THEN
                v_new_windows := v_new_windows || pg_catalog.jsonb_build_array(v_budget.hold);
            END IF;
            IF v_requested > 0 THEN
                v_rises := v_rises || pg_catalog.jsonb_build_array(pg_catalog.jsonb_build_object(
                    'budget_id', v_budget.id, 'window_start', v_budget.window_start,
                    'before', v_budget.before, 'after', v_budget.before + v_requested
                ));
            END IF;
            v_budgets := v_budgets || pg_catalog.jsonb_build_array(pg_catalog.jsonb_build_object(
                'budget_id', v_budget.id,
                'subject', v_budget.subject,
                'window', v_budget.budget_window,
                'unit', v_budget.unit,
                'window_start', v_budget.window_start,
                'held', v_requested,
                'available', v_budget.available - v_requested
            ));
        END LOOP;
    END IF;

    IF v_report.id IS NULL THEN
        INSERT INTO tokentrack.reports (id, account_id, status, mode)
        VALUES (p_report_id, p_account_id, 'processing', COALESCE(p_mode, 'standard'))
        ON CONFLICT (id) DO NOTHING;
        IF NOT FOUND THEN
            -- Created at this moment by another account's reservation (same-account callers
            -- are serialised by the period lock and would have seen it above).
            RETURN pg_catalog.jsonb_build_object(
                'success', false, 'error', 'report_account_mismatch',
                'message', pg_catalog.format('report %s belongs to another account', p_report_id)
            );
        END IF;
    ELSIF v_report.status = 'pending' THEN
        UPDATE tokentrack.reports AS r SET status = 'processing', mode = COALESCE(p_mode, r.mode) WHERE r.id = p_report_id;
    END IF;

    INSERT INTO tokentrack.report_reservations (
        report_id, account_id, period_id, reserved_tokens, reserved_cost_micros, holds
    )
    VALUES (
        p_report_id, p_account_id, v_period.id, p_tokens, p_cost_micros,
        CASE WHEN v_holds = '[]'::jsonb THEN NULL ELSE v_holds END
    )
    RETURNING * INTO v_reservation;

    -- The rows of the windows that have none yet, so that billing finds them (under the budget
    -- locks: no two inserts race).
    IF v_new_windows <> '[]'::jsonb THEN
        INSERT INTO tokentrack.budget_windows (account_id, budget_id, window_start)
        SELECT p_account_id, h.budget_id, h.window_start
        FROM pg_catalog.jsonb_to_recordset(v_new_windows) AS h (budget_id uuid, window_start timestamptz)
        ON CONFLICT ON CONSTRAINT budget_windows_pkey DO NOTHING;
    END IF;

    -- Since version 20261212000000: the thresholds this hold takes its windows across, now that
    -- it is granted (a refusal above returns before any is recorded), still under the locks.
    FOR v_rise IN
        SELECT r.budget_id, r.window_start, r.before, r.after
        FROM pg_catalog.jsonb_to_recordset(v_rises) AS r (budget_id uuid, window_start timestamptz, before bigint, after bigint)
    LOOP
        PERFORM tokentrack.note_crossings(p_account_id, v_rise.budget_id, v_rise.window_start, v_rise.before, v_rise.after);
    END LOOP;

    RETURN pg_catalog.jsonb_build_object(
        'success', true,
        'reservation_id', v_reservation.id,
        'reserved_tokens', v_reservation.reserved_tokens,
        'available_tokens', v_available - p_tokens,
        'expires_at', v_reservation.expires_at,
        'period_id', v_reservation.period_id,
        'existing', false,
        'budgets', v_budgets
    );
END
$function$;

COMMENT ON FUNCTION tokentrack.reserve_usage(uuid, uuid, integer, bigint, text[], text) IS
'Internal: reserves an estimate against the account''s usage period and every budget that '
'applies, atomically (try_reserve_tokens and reserve check their arguments and call it).';

REVOKE ALL ON FUNCTION tokentrack.reserve_usage(uuid, uuid, integer, bigint, text[], text) FROM PUBLIC;
