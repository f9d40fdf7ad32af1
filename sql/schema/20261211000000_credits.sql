-- Version 20261211000000: credits
--
-- Credits, adjustments and refunds (Part 2 of the contract, "Credits, adjustments and
-- refunds"): billing is corrected with new records, never by editing old ones.
--   * credit_grants: grant_credits raises a budget's limit by an amount until expires_at (NULL:
--     never), in every window the grant overlaps while it is unexpired
--     (tokentrack.budget_limit computes the effective limit).
--   * usage_adjustments: adjust_usage adds a signed correction to a budget's current window
--     (budget_id, window_start) or to the account's active usage period (period_id).
--   * report_refunds: refund_report takes a billed report's usage back out of the period(s) it
--     was billed into (periods: [{"period_id", "tokens"}]) and out of every budget window its
--     reservation held (windows: [{"budget_id", "window_start", "amount"}]), once per report.
-- The three tables are append-only (a trigger refuses UPDATE, DELETE and TRUNCATE with 55000)
-- and each row carries the idempotency key of the call that wrote it, unique per account in
-- its table: keys are scoped per account and per operation.
-- Citus: every key and foreign key of the new tables leads with account_id; usage_periods
-- gains the unique key (account_id, id) that usage_adjustments references (a period is opened
-- once a month per account: one more index entry per period). report_refunds has no foreign key
-- to reports, whose key is id alone: a refunded report has a billed reservation, which
-- references it ON DELETE RESTRICT and is never deleted. Row level security policies call
-- current_account_id() without a subquery.
-- Locks: building usage_periods_account_id_key takes a SHARE lock on usage_periods while it
-- scans the table (one row per account and month).

-- Pin name resolution for this version's transaction (see version 20251219000000).
SET LOCAL search_path = pg_catalog, pg_temp;

ALTER TABLE tokentrack.usage_periods
ADD CONSTRAINT usage_periods_account_id_key UNIQUE (account_id, id);

CREATE TABLE tokentrack.credit_grants (
    account_id uuid NOT NULL,
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    budget_id uuid NOT NULL,
    amount bigint NOT NULL CONSTRAINT credit_grants_amount_positive CHECK (amount > 0),
    expires_at timestamptz,
    idempotency_key text NOT NULL
    CONSTRAINT credit_grants_key_valid CHECK (pg_catalog.length(idempotency_key) BETWEEN 1 AND 200),
    reason text NOT NULL CONSTRAINT credit_grants_reason_valid CHECK (pg_catalog.length(reason) BETWEEN 1 AND 1000),
    granted_by text NOT NULL DEFAULT session_user,
    granted_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT credit_grants_pkey PRIMARY KEY (account_id, id),
    CONSTRAINT credit_grants_one_per_key UNIQUE (account_id, idempotency_key),
    CONSTRAINT credit_grants_budget_fk FOREIGN KEY (account_id, budget_id)
    REFERENCES tokentrack.budgets (account_id, id) ON DELETE RESTRICT,
    CONSTRAINT credit_grants_expiry_after_grant CHECK (expires_at > granted_at)
);

COMMENT ON TABLE tokentrack.credit_grants IS
'Credits granted to a budget (grant_credits): amount raises its limit in every window the grant '
'overlaps ([granted_at, expires_at)) while it is unexpired; append-only.';

CREATE INDEX credit_grants_budget_idx ON tokentrack.credit_grants (account_id, budget_id, granted_at);

CREATE TABLE tokentrack.usage_adjustments (
    account_id uuid NOT NULL,
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    -- A budget's window (budget_id and window_start) or a usage period (period_id), never both.
    budget_id uuid,
    window_start timestamptz,
    period_id uuid,
    delta bigint NOT NULL CONSTRAINT usage_adjustments_delta_non_zero CHECK (delta <> 0),
    idempotency_key text NOT NULL
    CONSTRAINT usage_adjustments_key_valid CHECK (pg_catalog.length(idempotency_key) BETWEEN 1 AND 200),
    reason text NOT NULL
    CONSTRAINT usage_adjustments_reason_valid CHECK (pg_catalog.length(reason) BETWEEN 1 AND 1000),
    adjusted_by text NOT NULL DEFAULT session_user,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT usage_adjustments_pkey PRIMARY KEY (account_id, id),
    CONSTRAINT usage_adjustments_one_per_key UNIQUE (account_id, idempotency_key),
    CONSTRAINT usage_adjustments_budget_fk FOREIGN KEY (account_id, budget_id)
    REFERENCES tokentrack.budgets (account_id, id) ON DELETE RESTRICT,
    CONSTRAINT usage_adjustments_period_fk FOREIGN KEY (account_id, period_id)
    REFERENCES tokentrack.usage_periods (account_id, id) ON DELETE RESTRICT,
    CONSTRAINT usage_adjustments_one_target CHECK (
        (budget_id IS NOT NULL AND window_start IS NOT NULL AND period_id IS NULL)
        OR (budget_id IS NULL AND window_start IS NULL AND period_id IS NOT NULL)
    )
);

COMMENT ON TABLE tokentrack.usage_adjustments IS
'Signed corrections (adjust_usage) of a budget window''s used (budget_id, window_start) or of a '
'usage period''s tokens_used (period_id); append-only.';

CREATE INDEX usage_adjustments_budget_idx ON tokentrack.usage_adjustments (account_id, budget_id, window_start)
WHERE budget_id IS NOT NULL;
CREATE INDEX usage_adjustments_period_idx ON tokentrack.usage_adjustments (account_id, period_id)
WHERE period_id IS NOT NULL;

CREATE TABLE tokentrack.report_refunds (
    account_id uuid NOT NULL,
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    report_id uuid NOT NULL,
    tokens bigint NOT NULL CONSTRAINT report_refunds_tokens_non_negative CHECK (tokens >= 0),
    cost_micros bigint NOT NULL CONSTRAINT report_refunds_cost_non_negative CHECK (cost_micros >= 0),
    -- [{"period_id", "tokens"}]: what was taken out of each period's tokens_used.
    periods jsonb NOT NULL CONSTRAINT report_refunds_periods_array CHECK (pg_catalog.jsonb_typeof(periods) = 'array'),
    -- [{"budget_id", "window_start", "amount"}]: what was taken out of each window's used.
    windows jsonb NOT NULL CONSTRAINT report_refunds_windows_array CHECK (pg_catalog.jsonb_typeof(windows) = 'array'),
    idempotency_key text NOT NULL
    CONSTRAINT report_refunds_key_valid CHECK (pg_catalog.length(idempotency_key) BETWEEN 1 AND 200),
    reason text NOT NULL CONSTRAINT report_refunds_reason_valid CHECK (pg_catalog.length(reason) BETWEEN 1 AND 1000),
    refunded_by text NOT NULL DEFAULT session_user,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT report_refunds_pkey PRIMARY KEY (account_id, id),
    CONSTRAINT report_refunds_one_per_key UNIQUE (account_id, idempotency_key),
    CONSTRAINT report_refunds_one_per_report UNIQUE (account_id, report_id),
    CONSTRAINT report_refunds_account_fk FOREIGN KEY (account_id)
    REFERENCES tokentrack.accounts (id) ON DELETE RESTRICT
);

COMMENT ON TABLE tokentrack.report_refunds IS
'Refunds of billed reports (refund_report), at most one per report: what was taken back out of '
'each period (periods) and budget window (windows); append-only.';

CREATE FUNCTION tokentrack.credit_records_are_append_only()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
    RAISE EXCEPTION '% of tokentrack.% is not allowed: credits, adjustments and refunds are append-only',
        tg_op, tg_table_name
        USING ERRCODE = '55000',
        HINT = 'Correct billing with tokentrack.grant_credits, adjust_usage or refund_report: they record new rows.';
END
$function$;

COMMENT ON FUNCTION tokentrack.credit_records_are_append_only() IS
'Trigger function refusing UPDATE, DELETE and TRUNCATE of tokentrack.credit_grants, '
'usage_adjustments and report_refunds (SQLSTATE 55000).';

REVOKE ALL ON FUNCTION tokentrack.credit_records_are_append_only() FROM PUBLIC;

CREATE TRIGGER credit_grants_append_only
BEFORE UPDATE OR DELETE ON tokentrack.credit_grants
FOR EACH ROW EXECUTE FUNCTION tokentrack.credit_records_are_append_only();
CREATE TRIGGER credit_grants_no_truncate
BEFORE TRUNCATE ON tokentrack.credit_grants
FOR EACH STATEMENT EXECUTE FUNCTION tokentrack.credit_records_are_append_only();
CREATE TRIGGER usage_adjustments_append_only
BEFORE UPDATE OR DELETE ON tokentrack.usage_adjustments
FOR EACH ROW EXECUTE FUNCTION tokentrack.credit_records_are_append_only();
CREATE TRIGGER usage_adjustments_no_truncate
BEFORE TRUNCATE ON tokentrack.usage_adjustments
FOR EACH STATEMENT EXECUTE FUNCTION tokentrack.credit_records_are_append_only();
CREATE TRIGGER report_refunds_append_only
BEFORE UPDATE OR DELETE ON tokentrack.report_refunds
FOR EACH ROW EXECUTE FUNCTION tokentrack.credit_records_are_append_only();
CREATE TRIGGER report_refunds_no_truncate
BEFORE TRUNCATE ON tokentrack.report_refunds
FOR EACH STATEMENT EXECUTE FUNCTION tokentrack.credit_records_are_append_only();

-- Row level security: readers see their own account's rows. No subquery in the policies
-- (Citus refuses them): current_account_id() is STABLE, so the planner may evaluate it once.
ALTER TABLE tokentrack.credit_grants ENABLE ROW LEVEL SECURITY;
ALTER TABLE tokentrack.usage_adjustments ENABLE ROW LEVEL SECURITY;
ALTER TABLE tokentrack.report_refunds ENABLE ROW LEVEL SECURITY;

CREATE POLICY credit_grants_reader_own ON tokentrack.credit_grants
FOR SELECT TO tokentrack_reader USING (account_id = tokentrack.current_account_id());
CREATE POLICY usage_adjustments_reader_own ON tokentrack.usage_adjustments
FOR SELECT TO tokentrack_reader USING (account_id = tokentrack.current_account_id());
CREATE POLICY report_refunds_reader_own ON tokentrack.report_refunds
FOR SELECT TO tokentrack_reader USING (account_id = tokentrack.current_account_id());
CREATE POLICY credit_grants_service_read ON tokentrack.credit_grants
FOR SELECT TO tokentrack_service USING (TRUE);
CREATE POLICY usage_adjustments_service_read ON tokentrack.usage_adjustments
FOR SELECT TO tokentrack_service USING (TRUE);
CREATE POLICY report_refunds_service_read ON tokentrack.report_refunds
FOR SELECT TO tokentrack_service USING (TRUE);

REVOKE ALL ON tokentrack.credit_grants, tokentrack.usage_adjustments, tokentrack.report_refunds FROM PUBLIC;
GRANT SELECT ON tokentrack.credit_grants, tokentrack.usage_adjustments, tokentrack.report_refunds
TO tokentrack_service, tokentrack_reader;
