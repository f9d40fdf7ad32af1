-- Version 20251219000000: add_usage_tracking
--
-- Accounts, usage periods, reports, the append-only usage ledger and the roles and
-- row level security that protect them. The function of this version (increment_usage,
-- open_usage_period) lives in sql/functions/ with a `-- version: 20251219000000` header.
--
-- Every table that holds account data carries account_id, so that the tables can later
-- be distributed by account.

-- Security review: pin name resolution for this version's transaction, so that types,
-- functions and operators named below (uuid, now(), gen_random_uuid(), =, ...) resolve in
-- pg_catalog whatever search_path the installing session has (a schema of look-alikes placed
-- before pg_catalog cannot capture a column type, a default or a constraint). SET LOCAL lasts
-- until the version's transaction ends (the migrator applies each version in one).
SET LOCAL search_path = pg_catalog, pg_temp;

-- Roles are cluster-wide: create them only when missing, never drop them on rollback
-- (other databases of the cluster, or an application's login roles, may be members).
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'tokentrack_service') THEN
        CREATE ROLE tokentrack_service NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'tokentrack_reader') THEN
        CREATE ROLE tokentrack_reader NOLOGIN;
    END IF;
END
$roles$;

GRANT USAGE ON SCHEMA tokentrack TO tokentrack_service, tokentrack_reader;

CREATE TABLE tokentrack.accounts (
    id uuid CONSTRAINT accounts_pkey PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE tokentrack.accounts IS
'One row per billed account. Deleting an account that has billing rows is refused.';

CREATE TABLE tokentrack.usage_periods (
    id uuid NOT NULL DEFAULT gen_random_uuid() CONSTRAINT usage_periods_pkey PRIMARY KEY,
    account_id uuid NOT NULL
    CONSTRAINT usage_periods_account_fk REFERENCES tokentrack.accounts (id) ON DELETE RESTRICT,
    status text NOT NULL DEFAULT 'active'
    CONSTRAINT usage_periods_status_valid CHECK (status IN ('active', 'completed')),
    tokens_limit bigint NOT NULL CONSTRAINT usage_periods_limit_non_negative CHECK (tokens_limit >= 0),
    tokens_used bigint NOT NULL DEFAULT 0
    CONSTRAINT usage_periods_used_non_negative CHECK (tokens_used >= 0),
    reports_count integer NOT NULL DEFAULT 0
    CONSTRAINT usage_periods_reports_non_negative CHECK (reports_count >= 0),
    period_start timestamptz NOT NULL DEFAULT now(),
    period_end timestamptz NOT NULL DEFAULT now() + interval '1 month',
    CONSTRAINT usage_periods_end_after_start CHECK (period_end > period_start)
);

COMMENT ON TABLE tokentrack.usage_periods IS
'Billing periods. At most one active period per account; tokens_limit gates new reservations, '
'tokens_used is actual usage and may exceed it. Every change of tokens_used or reports_count '
'leaves a row in tokentrack.usage_ledger.';

-- At most one active period per account; also the lookup of every reservation check.
CREATE UNIQUE INDEX usage_periods_one_active_per_account
ON tokentrack.usage_periods (account_id) WHERE status = 'active';

CREATE INDEX usage_periods_account_idx ON tokentrack.usage_periods (account_id, period_start);

CREATE TABLE tokentrack.reports (
    id uuid CONSTRAINT reports_pkey PRIMARY KEY,
    account_id uuid NOT NULL
    CONSTRAINT reports_account_fk REFERENCES tokentrack.accounts (id) ON DELETE RESTRICT,
    mode text NOT NULL DEFAULT 'standard'
    CONSTRAINT reports_mode_valid CHECK (mode IN ('standard', 'dd', 'discovery', 'hybrid')),
    status text NOT NULL DEFAULT 'pending'
    CONSTRAINT reports_status_valid CHECK (
        status IN ('pending', 'processing', 'complete', 'failed', 'cancelled')
    ),
    error_message text,
    token_usage jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE tokentrack.reports IS
'Generated reports. token_usage holds totalTokens once the report is billed.';

CREATE INDEX reports_account_created_idx ON tokentrack.reports (account_id, created_at);
-- Monitoring reads the last hours' reports of every account (tokentrack monitor): by time alone.
CREATE INDEX reports_created_at_idx ON tokentrack.reports (created_at);

-- The append-only record behind reconcile(): whoever changes tokens_used or reports_count
-- of a period writes one row here in the same transaction.
CREATE TABLE tokentrack.usage_ledger (
    id bigint GENERATED ALWAYS AS IDENTITY CONSTRAINT usage_ledger_pkey PRIMARY KEY,
    account_id uuid NOT NULL
    CONSTRAINT usage_ledger_account_fk REFERENCES tokentrack.accounts (id) ON DELETE RESTRICT,
    period_id uuid NOT NULL
    CONSTRAINT usage_ledger_period_fk REFERENCES tokentrack.usage_periods (id) ON DELETE RESTRICT,
    kind text NOT NULL CONSTRAINT usage_ledger_kind_valid CHECK (
        kind IN (
            'increment', 'report_billed', 'report_expired', 'late_step', 'report_completed',
            'adjustment'
        )
    ),
    tokens bigint NOT NULL CONSTRAINT usage_ledger_tokens_non_negative CHECK (tokens >= 0),
    reports integer NOT NULL DEFAULT 0 CONSTRAINT usage_ledger_reports_valid CHECK (reports IN (0, 1)),
    report_id uuid CONSTRAINT usage_ledger_report_fk REFERENCES tokentrack.reports (id) ON DELETE RESTRICT,
    is_chat boolean NOT NULL DEFAULT FALSE,
    created_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE tokentrack.usage_ledger IS
'Append-only: one row per change of a period''s tokens_used or reports_count. UPDATE, DELETE '
'and TRUNCATE are refused. reconcile() checks the periods against it.';

CREATE INDEX usage_ledger_period_idx ON tokentrack.usage_ledger (period_id);
CREATE INDEX usage_ledger_account_idx ON tokentrack.usage_ledger (account_id);
CREATE INDEX usage_ledger_report_idx ON tokentrack.usage_ledger (report_id) WHERE report_id IS NOT NULL;

CREATE FUNCTION tokentrack.usage_ledger_is_append_only()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
    RAISE EXCEPTION 'tokentrack.usage_ledger is append-only: % is not allowed', tg_op
        USING ERRCODE = '55000', HINT = 'Record a correction as a new ledger row instead.';
END
$function$;

COMMENT ON FUNCTION tokentrack.usage_ledger_is_append_only() IS
'Trigger function refusing UPDATE, DELETE and TRUNCATE on tokentrack.usage_ledger (SQLSTATE 55000).';

REVOKE ALL ON FUNCTION tokentrack.usage_ledger_is_append_only() FROM PUBLIC;

CREATE TRIGGER usage_ledger_no_update_delete
BEFORE UPDATE OR DELETE ON tokentrack.usage_ledger
FOR EACH ROW EXECUTE FUNCTION tokentrack.usage_ledger_is_append_only();

CREATE TRIGGER usage_ledger_no_truncate
BEFORE TRUNCATE ON tokentrack.usage_ledger
FOR EACH STATEMENT EXECUTE FUNCTION tokentrack.usage_ledger_is_append_only();

-- The one replaceable function that says which account the current request acts for.
-- Default: the per-request setting tokentrack.account_id, set by the application with
-- SET LOCAL tokentrack.account_id = '<uuid>'. Installations may CREATE OR REPLACE it
-- (for example with Supabase's auth.uid()); the row level security policies call it.
CREATE FUNCTION tokentrack.current_account_id()
RETURNS uuid
LANGUAGE sql
STABLE
PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $function$
    SELECT NULLIF(pg_catalog.current_setting('tokentrack.account_id', true), '')::uuid
$function$;

COMMENT ON FUNCTION tokentrack.current_account_id() IS
'The account the current request acts for: the setting tokentrack.account_id (SET LOCAL it '
'per request). Replaceable: row level security policies call this function.';

-- Security review: EXECUTE is revoked from PUBLIC on every tokentrack function (a function
-- gets EXECUTE for PUBLIC when it is created); only the roles whose policies call it keep it.
REVOKE ALL ON FUNCTION tokentrack.current_account_id() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.current_account_id() TO tokentrack_service, tokentrack_reader;

-- Row level security: only the functions (running as the table owner) write. Readers see
-- their own account; the service role sees every account (it is the trusted backend).
-- Security review: the reader policies call current_account_id() through a scalar subquery,
-- (SELECT tokentrack.current_account_id()), which the planner runs once per statement (an
-- InitPlan) instead of once per row: the function carries SET search_path, so it is never
-- inlined, and a replacement such as Supabase's auth.uid() parses the JWT claims per call.
ALTER TABLE tokentrack.accounts ENABLE ROW LEVEL SECURITY;
ALTER TABLE tokentrack.usage_periods ENABLE ROW LEVEL SECURITY;
ALTER TABLE tokentrack.reports ENABLE ROW LEVEL SECURITY;
ALTER TABLE tokentrack.usage_ledger ENABLE ROW LEVEL SECURITY;

CREATE POLICY accounts_reader_own ON tokentrack.accounts
FOR SELECT TO tokentrack_reader USING (id = (SELECT tokentrack.current_account_id()));
CREATE POLICY usage_periods_reader_own ON tokentrack.usage_periods
FOR SELECT TO tokentrack_reader USING (account_id = (SELECT tokentrack.current_account_id()));
CREATE POLICY reports_reader_own ON tokentrack.reports
FOR SELECT TO tokentrack_reader USING (account_id = (SELECT tokentrack.current_account_id()));
CREATE POLICY usage_ledger_reader_own ON tokentrack.usage_ledger
FOR SELECT TO tokentrack_reader USING (account_id = (SELECT tokentrack.current_account_id()));

CREATE POLICY accounts_service_read ON tokentrack.accounts
FOR SELECT TO tokentrack_service USING (TRUE);
CREATE POLICY usage_periods_service_read ON tokentrack.usage_periods
FOR SELECT TO tokentrack_service USING (TRUE);
CREATE POLICY reports_service_read ON tokentrack.reports
FOR SELECT TO tokentrack_service USING (TRUE);
CREATE POLICY usage_ledger_service_read ON tokentrack.usage_ledger
FOR SELECT TO tokentrack_service USING (TRUE);

REVOKE ALL ON tokentrack.accounts, tokentrack.usage_periods, tokentrack.reports,
tokentrack.usage_ledger FROM PUBLIC;
GRANT SELECT ON tokentrack.accounts, tokentrack.usage_periods, tokentrack.reports,
tokentrack.usage_ledger TO tokentrack_service, tokentrack_reader;
