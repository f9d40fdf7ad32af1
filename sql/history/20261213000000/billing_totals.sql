-- version: 20261213000000
--
-- tokentrack.billing_totals(p_after_entry bigint DEFAULT 0, p_settle_through bigint DEFAULT 0)
--     -> jsonb
--
-- What was billed, read from the append-only usage ledger, so that a reader can keep
-- monotonic counters: the billing entries (kinds report_billed, report_expired and
-- late_step) with id > p_after_entry, summed twice: all of them, and those with id <=
-- p_settle_through (the part the reader settles; the rest it reads again next time, as
-- entries with a lower id may still commit after a higher one):
--   {"last_entry": the highest billing entry id seen (p_after_entry when none),
--    "all": {entries, reports_billed, reservations_expired, late_steps, tokens, late_tokens,
--            cost_micros}, "settled": {the same for id <= p_settle_through},
--    "snapshot_xmin", "snapshot_xmax": this snapshot's bounds (pg_current_snapshot) as text}
-- cost_micros sums the cost of the steps each entry billed (steps without a price add 0).
-- tokentrack exporter starts with p_after_entry 0 (the whole ledger once), then reads only
-- the entries after the last settled one: it settles through the last_entry of an earlier
-- read once snapshot_xmin has passed that read's snapshot_xmax (every transaction that could
-- still insert an entry with a lower id has ended).
-- Reads: usage_ledger by its primary key (id > p_after_entry), each entry's steps by
--   report_step_usage_billing_entry_idx. Locks nothing, writes nothing (STABLE). Sees every
--   account (SECURITY DEFINER): EXECUTE for tokentrack_service only, as health().
-- Errors: 22004 a NULL argument; 22023 a negative argument.
CREATE OR REPLACE FUNCTION tokentrack.billing_totals(
    p_after_entry bigint DEFAULT 0, p_settle_through bigint DEFAULT 0
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
    IF p_after_entry IS NULL THEN
        RAISE EXCEPTION 'p_after_entry must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_after_entry';
    END IF;
    IF p_after_entry < 0 THEN
        RAISE EXCEPTION 'p_after_entry must not be negative (got %)', p_after_entry
            USING ERRCODE = '22023', COLUMN = 'p_after_entry';
    END IF;
    IF p_settle_through IS NULL THEN
        RAISE EXCEPTION 'p_settle_through must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_settle_through';
    END IF;
    IF p_settle_through < 0 THEN
        RAISE EXCEPTION 'p_settle_through must not be negative (got %)', p_settle_through
            USING ERRCODE = '22023', COLUMN = 'p_settle_through';
    END IF;

    WITH entries AS (
        SELECT
            l.id,
            l.kind,
            l.tokens,
            COALESCE((
                SELECT pg_catalog.sum(s.cost_micros)
                FROM tokentrack.report_step_usage AS s
                WHERE s.billing_entry_id = l.id
            ), 0) AS cost
        FROM tokentrack.usage_ledger AS l
        WHERE l.id > p_after_entry AND l.kind IN ('report_billed', 'report_expired', 'late_step')
    )

    SELECT pg_catalog.jsonb_build_object(
        'last_entry', COALESCE(pg_catalog.max(e.id), p_after_entry),
        'all', pg_catalog.jsonb_build_object(
            'entries', pg_catalog.count(*),
            'reports_billed', pg_catalog.count(*) FILTER (WHERE e.kind = 'report_billed'),
            'reservations_expired', pg_catalog.count(*) FILTER (WHERE e.kind = 'report_expired'),
            'late_steps', pg_catalog.count(*) FILTER (WHERE e.kind = 'late_step'),
            'tokens', COALESCE(pg_catalog.sum(e.tokens), 0),
            'late_tokens', COALESCE(pg_catalog.sum(e.tokens) FILTER (WHERE e.kind = 'late_step'), 0),
            'cost_micros', COALESCE(pg_catalog.sum(e.cost), 0)
        ),
        'settled', pg_catalog.jsonb_build_object(
            'entries', pg_catalog.count(*) FILTER (WHERE e.id <= p_settle_through),
            'reports_billed', pg_catalog.count(*) FILTER (
                WHERE e.id <= p_settle_through AND e.kind = 'report_billed'
            ),
            'reservations_expired', pg_catalog.count(*) FILTER (
                WHERE e.id <= p_settle_through AND e.kind = 'report_expired'
            ),
            'late_steps', pg_catalog.count(*) FILTER (WHERE e.id <= p_settle_through AND e.kind = 'late_step'),
            'tokens', COALESCE(pg_catalog.sum(e.tokens) FILTER (WHERE e.id <= p_settle_through), 0),
            'late_tokens', COALESCE(pg_catalog.sum(e.tokens) FILTER (
                WHERE e.id <= p_settle_through AND e.kind = 'late_step'
            ), 0),
            'cost_micros', COALESCE(pg_catalog.sum(e.cost) FILTER (WHERE e.id <= p_settle_through), 0)
        ),
        'snapshot_xmin', pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::text,
        'snapshot_xmax', pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::text
    ) INTO v_result
    FROM entries AS e;
    RETURN v_result;
END
$function$;

COMMENT ON FUNCTION tokentrack.billing_totals(bigint, bigint) IS
'Read-only: the billing entries of the usage ledger after an id (reports billed, reservations '
'expired, late steps, tokens, cost), for monotonic counters (tokentrack exporter).';

REVOKE ALL ON FUNCTION tokentrack.billing_totals(bigint, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.billing_totals(bigint, bigint) TO tokentrack_service;
