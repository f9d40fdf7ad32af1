-- Version 20261213000000: metrics
--
-- What `tokentrack exporter` serves besides health() (issue #15):
--   * refusal counters. A refusal writes nothing (Part 1: "Refused, nothing written"), and
--     counting it must not add a write to the transaction of the call that refused. Each
--     counter is an UNLOGGED SEQUENCE, bumped with nextval() on the refusal path only
--     (count_refusal): nextval is not transactional (a rolled-back refusal still counts, as
--     it happened), takes no row lock and never waits for another transaction (a short buffer
--     lock on the sequence's one page); unlogged, it writes no WAL at all, so the refusal's
--     transaction gets no transaction id and its commit flushes nothing (a logged sequence
--     WAL-logs every 32nd value, and that call's commit then waits for a WAL flush: it halved
--     the rate of cheap refusals in bench/results/metrics.md). The price: after a crash
--     (not after a clean shutdown) the counters start again from 0, which Prometheus reads
--     as a counter reset; a standby has no counts. Counts are monitoring figures, never
--     billing data.
--   * refusal_counters: a view over constants naming which sequence counts what, one row per
--     (operation, code, budget kind), so the label sets are bounded (the cardinality is documented in
--     docs/API.md): 68 counters.
--       operation reserve (reserve, try_reserve_tokens) and extend (extend_reservation):
--         their refusal codes, and insufficient_budget by the refusing budget's kind
--         (unit x window x scope: 2 x 6 x 2 = 24), plus other
--       operation finalize (finalize_report_usage, finish_report) and step (record_step,
--         persist_step_usage): their refusal codes, plus other
--     "Which budget" beyond its kind is not counted (per budget id it would be unbounded);
--     the budgets refusing now are named by health()'s and metrics()'s exhausted windows.
-- The functions (count_refusal, metrics, billing_totals; health, reserve, try_reserve_tokens,
-- extend_reservation, finalize_report_usage, finish_report, record_step and
-- persist_step_usage reworked) live in sql/functions/.
-- No table: a table would be billing data to the rollback's check, and the counts live in the
-- sequences anyway. Nothing here holds account data; no grant to the application roles.
-- Locks: creating the view and the sequences locks nothing that exists.

-- Pin name resolution for this version's transaction (see version 20251219000000).
SET LOCAL search_path = pg_catalog, pg_temp;

CREATE VIEW tokentrack.refusal_counters AS
SELECT
    k.operation,
    k.code,
    k.budget_unit,
    k.budget_window,
    k.budget_scope,
    -- As count_refusal names it: refusal_<operation>_<code>, and for insufficient_budget
    -- refusal_<operation>_budget_<unit>_<window>_<scope> (at most 50 characters).
    CASE
        WHEN k.code = 'insufficient_budget'
            THEN pg_catalog.format(
                'tokentrack.refusal_%s_budget_%s_%s_%s',
                k.operation, k.budget_unit, k.budget_window, k.budget_scope
            )
        ELSE pg_catalog.format('tokentrack.refusal_%s_%s', k.operation, k.code)
    END AS counter
FROM (
    SELECT
        o.operation,
        o.code,
        '' AS budget_unit,
        '' AS budget_window,
        '' AS budget_scope
    FROM (
        VALUES
        ('reserve', 'account_not_found'), ('reserve', 'report_account_mismatch'),
        ('reserve', 'no_active_period'), ('reserve', 'report_finalized'),
        ('reserve', 'insufficient_tokens'), ('reserve', 'other'),
        ('extend', 'reservation_not_found'), ('extend', 'report_account_mismatch'),
        ('extend', 'report_finalized'), ('extend', 'no_active_period'),
        ('extend', 'insufficient_tokens'), ('extend', 'other'),
        ('finalize', 'reservation_not_found'), ('finalize', 'report_account_mismatch'),
        ('finalize', 'report_finalized'), ('finalize', 'other'),
        ('step', 'reservation_not_found'), ('step', 'report_account_mismatch'),
        ('step', 'step_conflict'), ('step', 'other')
    ) AS o (operation, code)
    UNION ALL
    SELECT
        op.operation,
        'insufficient_budget' AS code,
        u.budget_unit,
        w.budget_window,
        s.budget_scope
    FROM (VALUES ('reserve'), ('extend')) AS op (operation)
    CROSS JOIN (VALUES ('tokens'), ('cost_micros')) AS u (budget_unit)
    CROSS JOIN (VALUES ('minute'), ('hour'), ('day'), ('week'), ('month'), ('total')) AS w (budget_window)
    CROSS JOIN (VALUES ('account'), ('subject')) AS s (budget_scope)
) AS k;

COMMENT ON VIEW tokentrack.refusal_counters IS
'Which sequence counts which refusals: operation, code, and for insufficient_budget the '
'refusing budget''s unit, window and scope (otherwise empty); count_refusal bumps it with '
'nextval on the refusal path, health() reads the counts. Fixed by version 20261213000000 '
'(a view over constants, so the label sets are bounded).';

DO $counters$
DECLARE
    v_row record;
BEGIN
    FOR v_row IN SELECT c.* FROM tokentrack.refusal_counters AS c LOOP
        EXECUTE pg_catalog.format('CREATE UNLOGGED SEQUENCE %s AS bigint', v_row.counter);
        EXECUTE pg_catalog.format(
            'COMMENT ON SEQUENCE %s IS %L', v_row.counter,
            pg_catalog.format(
                'Refusals of %s with code %s%s (tokentrack.refusal_counters)', v_row.operation, v_row.code,
                CASE WHEN v_row.budget_unit = '' THEN '' ELSE pg_catalog.format(
                    ' by a %s %s budget of the %s', v_row.budget_unit, v_row.budget_window, v_row.budget_scope
                ) END
            )
        );
    END LOOP;
END
$counters$;

REVOKE ALL ON tokentrack.refusal_counters FROM PUBLIC;
