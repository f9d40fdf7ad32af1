-- Version 20260108000000: antifragile_token_tracking
--
-- Reservations taken before a report starts, per-step usage recorded as it happens, and
-- the row level security of both. The functions of this version (try_reserve_tokens,
-- persist_step_usage, finalize_report_usage, finish_report, cleanup_expired_reservations,
-- sweep_expired_reservations, reconcile and their internal helpers) live in sql/functions/
-- with a `-- version: 20260108000000` header.
--
-- This version changes no table of version 20251219000000: its rollback leaves
-- usage_periods, reports, usage_ledger and increment_usage exactly as they were.

-- Security review: pin name resolution for this version's transaction (see version
-- 20251219000000): every type, default, constraint and function body below resolves in
-- pg_catalog, whatever search_path the installing session has.
SET LOCAL search_path = pg_catalog, pg_temp;

CREATE TABLE tokentrack.report_reservations (
    id uuid NOT NULL DEFAULT gen_random_uuid() CONSTRAINT report_reservations_pkey PRIMARY KEY,
    report_id uuid NOT NULL
    CONSTRAINT report_reservations_report_fk REFERENCES tokentrack.reports (id) ON DELETE RESTRICT,
    account_id uuid NOT NULL
    CONSTRAINT report_reservations_account_fk REFERENCES tokentrack.accounts (id) ON DELETE RESTRICT,
    period_id uuid NOT NULL
    CONSTRAINT report_reservations_period_fk REFERENCES tokentrack.usage_periods (id) ON DELETE RESTRICT,
    status text NOT NULL DEFAULT 'active'
    CONSTRAINT report_reservations_status_valid CHECK (status IN ('active', 'completed', 'expired')),
    reserved_tokens integer NOT NULL
    CONSTRAINT report_reservations_reserved_positive CHECK (reserved_tokens > 0),
    billed_tokens bigint CONSTRAINT report_reservations_billed_non_negative CHECK (billed_tokens >= 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL DEFAULT now() + interval '2 hours',
    finalized_at timestamptz,
    -- One reservation per report: a report is billed once, through its reservation.
    CONSTRAINT report_reservations_one_per_report UNIQUE (report_id),
    CONSTRAINT report_reservations_expires_after_created CHECK (expires_at > created_at),
    -- An active reservation is unbilled; a finished one carries what it billed and when.
    CONSTRAINT report_reservations_finished_consistently CHECK (
        (status = 'active') = (finalized_at IS NULL)
        AND (status = 'active') = (billed_tokens IS NULL)
    )
);

COMMENT ON TABLE tokentrack.report_reservations IS
'One reservation per report: the estimate held against the account''s budget while the report '
'runs. active until finalized (completed) or swept after expires_at (expired); billed_tokens is '
'what finalize or the sweep billed.';

-- The reservation check: active reservations of an account (with what they hold).
CREATE INDEX report_reservations_active_by_account
ON tokentrack.report_reservations (account_id, expires_at) INCLUDE (reserved_tokens)
WHERE status = 'active';

-- The sweep: active reservations by expires_at.
CREATE INDEX report_reservations_active_by_expiry
ON tokentrack.report_reservations (expires_at) WHERE status = 'active';

CREATE INDEX report_reservations_period_idx ON tokentrack.report_reservations (period_id);

CREATE TABLE tokentrack.report_step_usage (
    id uuid NOT NULL DEFAULT gen_random_uuid() CONSTRAINT report_step_usage_pkey PRIMARY KEY,
    report_id uuid NOT NULL
    CONSTRAINT report_step_usage_report_fk REFERENCES tokentrack.reports (id) ON DELETE RESTRICT,
    account_id uuid NOT NULL
    CONSTRAINT report_step_usage_account_fk REFERENCES tokentrack.accounts (id) ON DELETE RESTRICT,
    step_name text NOT NULL CONSTRAINT report_step_usage_step_name_valid CHECK (
        pg_catalog.length(step_name) BETWEEN 1 AND 200 AND pg_catalog.btrim(step_name) <> ''
    ),
    input_tokens integer NOT NULL CONSTRAINT report_step_usage_input_non_negative CHECK (input_tokens >= 0),
    output_tokens integer NOT NULL
    CONSTRAINT report_step_usage_output_non_negative CHECK (output_tokens >= 0),
    total_tokens integer NOT NULL,
    model text CONSTRAINT report_step_usage_model_length CHECK (pg_catalog.length(model) <= 200),
    completed_at timestamptz NOT NULL DEFAULT now(),
    -- Billing: set once, by finalize, the sweep, or at once for a late step.
    billed_at timestamptz,
    billed_period_id uuid
    CONSTRAINT report_step_usage_billed_period_fk REFERENCES tokentrack.usage_periods (id) ON DELETE RESTRICT,
    billing_entry_id bigint
    CONSTRAINT report_step_usage_billing_entry_fk REFERENCES tokentrack.usage_ledger (id) ON DELETE RESTRICT,
    late boolean NOT NULL DEFAULT FALSE,
    CONSTRAINT report_step_usage_one_per_step UNIQUE (report_id, step_name),
    CONSTRAINT report_step_usage_total_covers_parts CHECK (
        total_tokens::bigint >= input_tokens::bigint + output_tokens::bigint
    ),
    CONSTRAINT report_step_usage_billed_consistently CHECK (
        (billed_at IS NULL) = (billed_period_id IS NULL)
        AND (billed_at IS NULL) = (billing_entry_id IS NULL)
    )
);

COMMENT ON TABLE tokentrack.report_step_usage IS
'One row per finished step of a report (report_id, step_name). Billed exactly once: by '
'finalize, by the expiry sweep, or at once when the step arrives after its report was billed '
'(late). billing_entry_id points at the usage_ledger row that billed it.';

-- Per-report step lookups are served by report_step_usage_one_per_step (report_id, step_name).
-- reconcile() joins the ledger entries to the steps they billed.
CREATE INDEX report_step_usage_billing_entry_idx
ON tokentrack.report_step_usage (billing_entry_id) WHERE billing_entry_id IS NOT NULL;
CREATE INDEX report_step_usage_account_idx ON tokentrack.report_step_usage (account_id);
-- reconcile(one account) finds the steps billed into that account's periods.
CREATE INDEX report_step_usage_billed_period_idx
ON tokentrack.report_step_usage (billed_period_id) WHERE billed_period_id IS NOT NULL;

-- The reader policies call current_account_id() through a scalar subquery, evaluated once
-- per statement (see version 20251219000000).
ALTER TABLE tokentrack.report_reservations ENABLE ROW LEVEL SECURITY;
ALTER TABLE tokentrack.report_step_usage ENABLE ROW LEVEL SECURITY;

CREATE POLICY report_reservations_reader_own ON tokentrack.report_reservations
FOR SELECT TO tokentrack_reader USING (account_id = (SELECT tokentrack.current_account_id()));
CREATE POLICY report_step_usage_reader_own ON tokentrack.report_step_usage
FOR SELECT TO tokentrack_reader USING (account_id = (SELECT tokentrack.current_account_id()));
CREATE POLICY report_reservations_service_read ON tokentrack.report_reservations
FOR SELECT TO tokentrack_service USING (TRUE);
CREATE POLICY report_step_usage_service_read ON tokentrack.report_step_usage
FOR SELECT TO tokentrack_service USING (TRUE);

REVOKE ALL ON tokentrack.report_reservations, tokentrack.report_step_usage FROM PUBLIC;
GRANT SELECT ON tokentrack.report_reservations, tokentrack.report_step_usage
TO tokentrack_service, tokentrack_reader;
