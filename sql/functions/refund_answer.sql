-- version: 20261211000000
--
-- tokentrack.refund_answer(p_refund tokentrack.report_refunds, p_duplicate boolean) -> jsonb
--
-- Internal (no EXECUTE for application roles). refund_report's success answer, built from the
-- refund's record, so that a retry answers exactly as the first call did (but "duplicate").
-- Locks nothing, writes nothing.
CREATE OR REPLACE FUNCTION tokentrack.refund_answer(p_refund tokentrack.report_refunds, p_duplicate boolean)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
    RETURN pg_catalog.jsonb_build_object(
        'success', true,
        'refund_id', p_refund.id,
        'report_id', p_refund.report_id,
        'tokens', p_refund.tokens,
        'cost_micros', p_refund.cost_micros,
        'periods', p_refund.periods,
        'windows', p_refund.windows,
        'refunded_at', p_refund.created_at,
        'duplicate', p_duplicate
    );
END
$function$;

COMMENT ON FUNCTION tokentrack.refund_answer(tokentrack.report_refunds, boolean) IS
'Internal: refund_report''s answer from a refund record.';

REVOKE ALL ON FUNCTION tokentrack.refund_answer(tokentrack.report_refunds, boolean) FROM PUBLIC;
