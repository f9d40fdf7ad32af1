-- version: 20261211000000
--
-- tokentrack.refund_report(p_report_id uuid, p_account_id uuid, p_idempotency_key text,
--     p_reason text) -> jsonb
--
-- Takes a billed report's usage back out of everything it was billed into, once per report:
--   * each usage period its steps were billed into (their billed_period_id: finalize, the sweep
--     and late steps all bill the reservation's period, also when a period switch closed it
--     since), tokens_used minus the total_tokens of the report's billed steps there;
--   * each budget window its reservation holds (a report's usage counts in the windows in which
--     its reservation was granted, late steps included), used minus the total_tokens of its
--     billed steps (tokens budgets) or their cost_micros (cost budgets; an unpriced step 0):
--     exactly what billing added there.
-- One report_refunds row records the periods ([{"period_id", "tokens"}]) and windows
-- ([{"budget_id", "window_start", "unit", "amount"}]) and the totals. The report, its steps,
-- its reservation and the usage ledger are not touched (billing records are never edited);
-- reports_count keeps the report. A step recorded after the refund (a late step) is billed as
-- usual and stays billed: the refund took back what was billed when it ran.
-- Idempotent by p_idempotency_key, scoped to the account and to refunds: the same key for the
-- same report and reason is a retry and answers as the first call did, "duplicate": true,
-- nothing written; with another report or reason it is refused with idempotency_conflict
-- (refund_id names the first refund). A second refund of the report under another key is
-- refused with already_refunded (refund_id names the first).
-- Locks, in order: the report's reservation (lock_report_reservation: FOR UPDATE, rank 2 of the
--   global order, docs/REVIEW.md: refunds of one report run one at a time, and no step of the
--   report is recorded meanwhile), the periods it was billed into (FOR UPDATE in id order, rank
--   3), the budgets its reservation holds (lock_reservation_budgets: rank 4), then the held
--   windows' rows (rank 6, by the UPDATE). The report row (rank 5) is only read.
-- Writes: one report_refunds row, usage_periods.tokens_used of each period billed, and
--   budget_windows.used of each held window whose amount is not 0.
-- Answer: {"success": true, "refund_id", "report_id", "tokens" (the refunded total_tokens),
--   "cost_micros" (the refunded cost of the priced steps), "periods", "windows",
--   "refunded_at", "duplicate"}.
-- Refusals (success false, nothing written), in this order: account_not_found,
--   idempotency_conflict (with refund_id), report_not_found, report_account_mismatch,
--   report_not_billed (no reservation, or it is still active: finalize, finish_report or the
--   sweep bills it first), already_refunded (with refund_id), negative_usage (an adjustment
--   took a period or a window below what the report billed there; with used and amount, and
--   period_id or budget_id and window_start).
-- Errors: 25000 under REPEATABLE READ or SERIALIZABLE; 22004 a NULL id, key or reason; 22023
--   an empty key or reason; 22001 a key over 200 or a reason over 1000 characters.
CREATE OR REPLACE FUNCTION tokentrack.refund_report(
    p_report_id uuid,
    p_account_id uuid,
    p_idempotency_key text,
    p_reason text
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_refund tokentrack.report_refunds%ROWTYPE;
    v_report tokentrack.reports%ROWTYPE;
    v_reservation_id uuid;
    v_reservation tokentrack.report_reservations%ROWTYPE;
    v_periods jsonb;
    v_windows jsonb;
    v_tokens bigint;
    v_cost bigint;
    v_short record;
BEGIN
    -- READ COMMITTED only: see require_read_committed (a refund that waited for the
    -- reservation lock reads what its holder committed).
    PERFORM tokentrack.require_read_committed('refund_report');
    IF p_report_id IS NULL THEN
        RAISE EXCEPTION 'p_report_id must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_report_id';
    END IF;
    IF p_account_id IS NULL THEN
        RAISE EXCEPTION 'p_account_id must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_account_id';
    END IF;
    PERFORM tokentrack.check_correction_text(p_idempotency_key, 'p_idempotency_key', 200);
    PERFORM tokentrack.check_correction_text(p_reason, 'p_reason', 1000);

    IF NOT EXISTS (SELECT FROM tokentrack.accounts AS a WHERE a.id = p_account_id) THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'account_not_found',
            'message', pg_catalog.format('account %s does not exist', p_account_id)
        );
    END IF;

    SELECT rf.* INTO v_refund FROM tokentrack.report_refunds AS rf
    WHERE rf.account_id = p_account_id AND rf.idempotency_key = p_idempotency_key;
    IF NOT FOUND THEN
        SELECT r.* INTO v_report FROM tokentrack.reports AS r WHERE r.id = p_report_id;
        IF NOT FOUND THEN
            RETURN pg_catalog.jsonb_build_object(
                'success', false, 'error', 'report_not_found',
                'message', pg_catalog.format('report %s does not exist', p_report_id)
            );
        END IF;
        IF v_report.account_id <> p_account_id THEN
            RETURN pg_catalog.jsonb_build_object(
                'success', false, 'error', 'report_account_mismatch',
                'message', pg_catalog.format('report %s belongs to another account', p_report_id)
            );
        END IF;
        v_reservation_id := tokentrack.lock_report_reservation(p_report_id, p_account_id);
        IF v_reservation_id IS NOT NULL THEN
            SELECT rr.* INTO STRICT v_reservation FROM tokentrack.report_reservations AS rr
            WHERE rr.id = v_reservation_id;
        END IF;
        IF v_reservation_id IS NULL OR v_reservation.status = 'active' THEN
            RETURN pg_catalog.jsonb_build_object(
                'success', false, 'error', 'report_not_billed',
                'message', CASE WHEN v_reservation_id IS NULL
                    THEN pg_catalog.format('report %s has no reservation: it was never billed', p_report_id)
                    ELSE pg_catalog.format(
                        'report %s is not billed yet (its reservation is active): finish or finalize it first',
                        p_report_id
                    ) END
            );
        END IF;
        SELECT rf.* INTO v_refund FROM tokentrack.report_refunds AS rf
        WHERE rf.account_id = p_account_id AND rf.report_id = p_report_id;
        -- Refunded under this key by a call that committed while this one waited for the
        -- lock: answered below, as a retry.
        IF FOUND AND v_refund.idempotency_key <> p_idempotency_key THEN
            RETURN pg_catalog.jsonb_build_object(
                'success', false, 'error', 'already_refunded',
                'message', pg_catalog.format(
                    'report %s was already refunded (refund %s, key %s)', p_report_id, v_refund.id,
                    v_refund.idempotency_key
                ),
                'refund_id', v_refund.id
            );
        END IF;
    END IF;

    IF v_refund.id IS NULL THEN
        -- Under the reservation lock no step of the report is recorded or billed: its billed
        -- steps are what billing added, per period and in every held window.
        SELECT
            COALESCE(pg_catalog.sum(s.total_tokens::bigint), 0)::bigint,
            COALESCE(pg_catalog.sum(s.cost_micros), 0)::bigint
        INTO v_tokens, v_cost
        FROM tokentrack.report_step_usage AS s
        WHERE s.report_id = p_report_id AND s.billed_at IS NOT NULL;
        SELECT COALESCE(pg_catalog.jsonb_agg(
            pg_catalog.jsonb_build_object('period_id', x.period_id, 'tokens', x.tokens) ORDER BY x.period_id
        ), '[]'::jsonb)
        INTO v_periods
        FROM (
            SELECT s.billed_period_id AS period_id, pg_catalog.sum(s.total_tokens::bigint) AS tokens
            FROM tokentrack.report_step_usage AS s
            WHERE s.report_id = p_report_id AND s.billed_at IS NOT NULL
            GROUP BY s.billed_period_id
        ) AS x;
        SELECT COALESCE(pg_catalog.jsonb_agg(
            pg_catalog.jsonb_build_object(
                'budget_id', b.id,
                -- The hold's own text (UTC, as budget_hold writes it).
                'window_start', h.value -> 'window_start',
                'unit', b.unit,
                'amount', CASE WHEN b.unit = 'tokens' THEN v_tokens ELSE v_cost END
            ) ORDER BY b.id
        ), '[]'::jsonb)
        INTO v_windows
        FROM pg_catalog.jsonb_array_elements(COALESCE(v_reservation.holds, '[]'::jsonb)) AS h (value)
        INNER JOIN tokentrack.budgets AS b
            ON b.account_id = p_account_id AND b.id = (h.value ->> 'budget_id')::uuid;

        -- Rank 3: the periods in id order; rank 4: the budgets held.
        PERFORM FROM tokentrack.usage_periods AS p
        WHERE p.id IN (SELECT (e.value ->> 'period_id')::uuid FROM pg_catalog.jsonb_array_elements(v_periods) AS e (value))
        ORDER BY p.id
        FOR UPDATE;
        IF v_reservation.holds IS NOT NULL THEN
            PERFORM tokentrack.lock_reservation_budgets(p_account_id, v_reservation.holds);
        END IF;

        -- Under those locks: an adjustment may have taken a period or window below the
        -- report's share, and a refund never takes either below 0.
        SELECT x.* INTO v_short FROM (
            SELECT
                p.id AS period_id, NULL::uuid AS budget_id, NULL::timestamptz AS window_start,
                p.tokens_used AS used, (e.value ->> 'tokens')::bigint AS amount
            FROM pg_catalog.jsonb_array_elements(v_periods) AS e (value)
            INNER JOIN tokentrack.usage_periods AS p ON p.id = (e.value ->> 'period_id')::uuid
            UNION ALL
            SELECT
                NULL, w.budget_id, w.window_start, w.used, (e.value ->> 'amount')::bigint
            FROM pg_catalog.jsonb_array_elements(v_windows) AS e (value)
            INNER JOIN tokentrack.budget_windows AS w
                ON
                    w.account_id = p_account_id AND w.budget_id = (e.value ->> 'budget_id')::uuid
                    AND w.window_start = (e.value ->> 'window_start')::timestamptz
        ) AS x
        WHERE x.used < x.amount
        ORDER BY x.period_id NULLS LAST, x.budget_id
        LIMIT 1;
        IF FOUND THEN
            RETURN pg_catalog.jsonb_build_object(
                'success', false, 'error', 'negative_usage',
                'message', pg_catalog.format(
                    'refunding report %s would take %s below 0 (it is %s, the report billed %s there)',
                    p_report_id,
                    CASE WHEN v_short.period_id IS NOT NULL
                        THEN pg_catalog.format('tokens_used of period %s', v_short.period_id)
                        ELSE pg_catalog.format('the used amount of budget %s''s window from %s', v_short.budget_id, v_short.window_start) END,
                    v_short.used, v_short.amount
                ),
                'used', v_short.used,
                'amount', v_short.amount,
                'period_id', v_short.period_id,
                'budget_id', v_short.budget_id,
                'window_start', v_short.window_start
            );
        END IF;

        INSERT INTO tokentrack.report_refunds (
            account_id, report_id, tokens, cost_micros, periods, windows, idempotency_key, reason
        )
        VALUES (p_account_id, p_report_id, v_tokens, v_cost, v_periods, v_windows, p_idempotency_key, p_reason)
        ON CONFLICT DO NOTHING
        RETURNING * INTO v_refund;
        IF FOUND THEN
            UPDATE tokentrack.usage_periods AS p SET tokens_used = p.tokens_used - (e.value ->> 'tokens')::bigint
            FROM pg_catalog.jsonb_array_elements(v_periods) AS e (value)
            WHERE p.id = (e.value ->> 'period_id')::uuid AND (e.value ->> 'tokens')::bigint <> 0;
            UPDATE tokentrack.budget_windows AS w SET used = w.used - (e.value ->> 'amount')::bigint
            FROM pg_catalog.jsonb_array_elements(v_windows) AS e (value)
            WHERE
                w.account_id = p_account_id AND w.budget_id = (e.value ->> 'budget_id')::uuid
                AND w.window_start = (e.value ->> 'window_start')::timestamptz
                AND (e.value ->> 'amount')::bigint <> 0;
            RETURN tokentrack.refund_answer(v_refund, false);
        END IF;
        -- The same key, inserted meanwhile by a refund of another report that committed: answered
        -- as below (the same report cannot race: its reservation lock is held).
        SELECT rf.* INTO STRICT v_refund FROM tokentrack.report_refunds AS rf
        WHERE rf.account_id = p_account_id AND rf.idempotency_key = p_idempotency_key;
    END IF;

    IF v_refund.report_id <> p_report_id OR v_refund.reason <> p_reason THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'idempotency_conflict',
            'message', pg_catalog.format(
                'idempotency key %s was used for refund %s with other arguments', p_idempotency_key, v_refund.id
            ),
            'refund_id', v_refund.id
        );
    END IF;
    RETURN tokentrack.refund_answer(v_refund, true);
END
$function$;

COMMENT ON FUNCTION tokentrack.refund_report(uuid, uuid, text, text) IS
'Refunds a billed report: takes its billed tokens and cost back out of every period and budget '
'window it was billed into, once per report; one append-only report_refunds row, idempotent by key.';

REVOKE ALL ON FUNCTION tokentrack.refund_report(uuid, uuid, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.refund_report(uuid, uuid, text, text) TO tokentrack_service;
