-- Rollback of version 20261213000000: metrics
--
-- billing-tables: none
--
-- Refusal counts are operational figures, not billing data: rolling back drops them (a
-- Prometheus counter that starts again from zero is read as a reset).
--
-- Removes exactly what that version added: the refusal_counters view and its sequences. The
-- functions that version introduced (count_refusal, metrics, billing_totals) are dropped by
-- the migrator before this file runs; the functions it reworked get their previous
-- definitions back after it.

DO $counters$
DECLARE
    v_counter text;
BEGIN
    FOR v_counter IN SELECT c.counter FROM tokentrack.refusal_counters AS c LOOP
        EXECUTE pg_catalog.format('DROP SEQUENCE %s', v_counter);
    END LOOP;
END
$counters$;

DROP VIEW tokentrack.refusal_counters;
